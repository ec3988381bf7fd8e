"""DVC stage ``base_model``: build ``models/base`` (safetensors + tokenizer with chat template)."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.models.base_model:STAGE")
