"""DVC stage ``fetch``: the completions of ``fetch.dataset`` as a local Parquet."""

from karma.pipeline import stage_main

if __name__ == "__main__":
    stage_main("karma.fetch:STAGE")
