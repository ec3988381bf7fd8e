"""DVC stage ``reference``: the base model's log-probs of the pairs (TRL's precompute), once."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.training.reference:STAGE")
