"""DVC stage ``kinship``: benchmark table -> S_pref, kinship matrix, global kin pairs, figures."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.kinship.kinship:STAGE")
