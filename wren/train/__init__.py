"""Training: one loop (loop.py) shared by every objective (objectives.py)."""
