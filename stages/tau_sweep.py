"""DVC stage ``tau_sweep``: the pairing diagnostics over a grid of the kinship threshold."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.pairing.tau_sweep:STAGE")
