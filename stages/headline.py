"""DVC stage ``headline``: the few metrics a reviewer compares, from ``diagnostics/*.json``."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.report.headline:STAGE")
