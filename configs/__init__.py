"""Run configurations for ``main.py --config``: ``cringe.py`` (the main job), ``bb3x_table.py`` (the experiment), ``bb3_*.py`` (BB3's checkpoints)."""
