"""Suite-wide rules: tests marked ``parlai`` compare with ParlAI 1.7.2 itself.

ParlAI is part of the test install (README, ``.ci/run``), so such a test FAILS,
naming the install command, when ParlAI cannot be imported: a comparison with
the reference must never pass by being skipped. Without ParlAI, deselect them
explicitly with ``-m "not parlai"``. Tests that need ``projects/`` code that
the wheel does not ship (``projects/cringe``) are marked ``parlai_projects``
and skip unless a ParlAI source checkout is importable.

Most of the suite's time is XLA compiling the same programs again: in test after
test and in every ``main.py`` child process. A persistent compilation cache in a
folder private to this pytest run (inherited by the children through the
environment) compiles each program once; a cache the user already set is kept.
The two-process run drops it (``tests/train/test_multiprocess.py`` says why).
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import tempfile
import warnings

import pytest


def _share_compilation_cache() -> None:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    directory = tempfile.mkdtemp(prefix="bb3x-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    # Cache even quick compiles: a test run repeats thousands of them.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    import jax  # already imported by a plugin or earlier code: set it on the live config too

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


_share_compilation_cache()

PARLAI_INSTALL = 'pip install -e ".[test,parlai]" && pip install --no-deps parlai==1.7.2'


def _import_error(module: str) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken install
        return f"{type(error).__name__}: {error}"
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("parlai") is not None:
        error = _import_error("parlai.core.agents")
        if error:
            pytest.fail(f"this test compares with ParlAI, which is not importable ({error}); install it with "
                        f"`{PARLAI_INSTALL}`, or deselect with -m \"not parlai\"", pytrace=False)
    if item.get_closest_marker("parlai_projects") is not None:
        error = _import_error("projects.cringe.cringe_loss")
        if error:
            pytest.skip(f"needs ParlAI's projects/ code, which its wheel lacks ({error}); put a ParlAI 1.7.2 "
                        "source checkout on PYTHONPATH to run it")


@pytest.fixture(scope="session")
def bad_input_models(tmp_path_factory):
    """The tiny checkpoints of the bad-input corpus (``tests/bad_inputs.py``), built once and shared."""
    from tests import bad_inputs

    return bad_inputs.Models(str(tmp_path_factory.mktemp("bad_input_models")))
