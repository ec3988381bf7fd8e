"""Generated DVC stage entry points (python -m stages.NAME)."""
