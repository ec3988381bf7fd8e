"""DVC stage ``train``: train a policy on the selected pairs with TRL (DPO or SFT)."""

from karma.command import stage_main

if __name__ == "__main__":
    stage_main("karma.training.train:STAGE")
