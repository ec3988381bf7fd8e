"""DVC stage ``preferences``: pair the completions of ``preferences.dataset`` per instruction."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.pairing.preferences:STAGE")
