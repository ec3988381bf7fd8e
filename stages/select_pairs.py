"""DVC stage ``select``: rank preference pairs by alignment potential (MAP), keep the top ratio.

(Named select_pairs.py: a script called select.py would shadow the standard library's
``select`` module for every import made from this folder.)
"""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.selection.select:STAGE")
