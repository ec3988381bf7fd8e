"""DVC stage ``fetch``: the completions of ``fetch.dataset`` as a local Parquet."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.pairing.fetch:STAGE")
