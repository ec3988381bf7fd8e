"""DVC stage ``scores``: the reported table + measured rows -> ``data/benchmark/scores.csv``."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.kinship.scores:STAGE")
