"""The test suite; mirrors the package (tests/data for bb3x_jax/data, and so on)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: main.py, configs/, benchmarks/

# Less codegen effort for the tests' programs: they are tiny, so compiling dominates running them.
# The tests' tolerances hold at either level. The test processes set it on their own config
# (tests/conftest.py); this is the same JAX setting in a child's environment.
LOW_CODEGEN_EFFORT_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def plotted_under_another_backend(plot, *args, **kwargs):
    """``plot(*args, **kwargs)`` with matplotlib's backend set to ``svg``; asserts the backend is still
    ``svg`` afterwards (a plot must not switch a caller's, e.g. a notebook's) and that the returned
    file is a PNG, and returns its path. The backend before is restored."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        path = plot(*args, **kwargs)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    return path
