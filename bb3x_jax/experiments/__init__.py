"""Experiments that reproduce the paper's results end to end (``python -m bb3x_jax.experiments.<name>``)."""
