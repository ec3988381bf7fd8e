"""DVC stage ``sp_plan@r<k>`` (self-play round k)."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.selfplay.rounds:PLAN")
