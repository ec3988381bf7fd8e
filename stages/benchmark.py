"""DVC stage ``benchmark@<name>``: lm-eval on one origin model -> its flat score row."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.evaluation.evaluate:BENCHMARK")
