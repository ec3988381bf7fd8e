"""DVC stage ``sp_train@r<k>`` (self-play round k)."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.selfplay.policy:TRAIN")
