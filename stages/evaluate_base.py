"""DVC stage ``evaluate_base``: lm-eval on the base model (no paired-bootstrap settings)."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.evaluation.evaluate:EVALUATE_BASE")
