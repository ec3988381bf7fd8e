"""DVC stage ``preferences``: pair the completions of ``preferences.dataset`` per instruction."""

from karma.pipeline import stage_main

if __name__ == "__main__":
    stage_main("karma.preferences:STAGE")
