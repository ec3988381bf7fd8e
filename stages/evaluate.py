"""DVC stages ``evaluate_base`` and ``evaluate``: lm-eval on the base model / the policy."""

from karma.pipeline import stage_main

if __name__ == "__main__":
    stage_main("karma.evaluation:EVALUATE")
