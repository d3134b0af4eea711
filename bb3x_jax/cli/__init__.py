"""Stand-alone commands outside ``main.py``: ``python -m bb3x_jax.cli.generate``
(context in, response out) and ``python -m bb3x_jax.cli.convert`` (checkpoints
between formats)."""
