"""DVC stage ``evaluate``: lm-eval on the policy, compared with the base model's evaluation."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.evaluation.evaluate:EVALUATE")
