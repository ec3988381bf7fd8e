"""DVC stage ``scores``: the reported table + measured rows -> ``data/benchmark/scores.csv``."""

from karma.pipeline import stage_main

if __name__ == "__main__":
    stage_main("karma.scores:STAGE")
