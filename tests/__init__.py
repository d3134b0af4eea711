"""The test suite; mirrors the package (tests/data for bb3x_jax/data, and so on)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: main.py, configs/, benchmarks/
