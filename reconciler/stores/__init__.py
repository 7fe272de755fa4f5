"""State stores: the seam between commands and where the state lives (see stores/base.py)."""
