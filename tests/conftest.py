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
environment) compiles each program once. A folder the user names in
``JAX_COMPILATION_CACHE_DIR`` is used instead and kept, with the same settings, so
that a later run compiles only what changed.
The two-process run drops it (``tests/train/test_multiprocess.py`` says why).
What the test processes compile themselves gets XLA's low codegen effort, except
in tests marked ``full_codegen`` (``_codegen_effort``).

The suite runs in parallel workers (pytest-xdist, ``addopts`` in pyproject.toml):
``-n auto`` is the machine's core count capped at ``MAX_WORKERS`` (every worker
starts ``main.py`` children of its own, and XLA already threads each program), and
``--dist loadscope`` keeps a module's tests on one worker so its module fixtures are
built once. Modules with ``slow`` tests are scheduled first: the longest jobs start
early instead of ending the run alone. Tests marked ``exclusive`` run with no other
test beside them (``pytest_runtest_protocol``). ``-n 0`` runs in one process.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib
import os
import shutil
import tempfile
import warnings

import pytest


def _run_folder(variable: str, prefix: str) -> str:
    """The folder named by ``variable``; the first process of the run (the xdist controller, or the one
    pytest process) makes it, removes it at exit, and passes it on to its workers and children
    through the environment."""
    if not os.environ.get(variable):
        directory = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        os.environ[variable] = directory
    return os.environ[variable]


def _share_compilation_cache() -> None:
    # A folder the user names is kept between runs: a later run reads what this one compiles.
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or _run_folder("JAX_COMPILATION_CACHE_DIR",
                                                                           "bb3x-jax-tests-xla-cache-")
    # A size limit turns on JAX's file lock around each read and write: parallel workers and
    # their children then never read an entry another one is still writing. It also bounds a kept
    # folder (least recently used entries go first); one quick loop writes about 50 MB.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    # Cache even quick compiles: a test run repeats thousands of them.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    import jax  # already imported by a plugin or earlier code: set it on the live config too

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


_share_compilation_cache()


def _codegen_effort(full: bool) -> None:
    """XLA's full optimisation, or its low codegen effort (backend optimisation level 0, no
    expensive LLVM passes: JAX's ``jax_disable_most_optimizations``), for the programs this process
    compiles from now on. It is part of the persistent cache's key (the two never share an entry);
    a function jitted earlier keeps, in memory, what it compiled then."""
    import jax

    jax.config.update("jax_disable_most_optimizations", not full)


# Most tests compile far more than they run: in this process, low effort unless a test is marked
# ``full_codegen`` (it runs enough steps for optimised code to pay for its compile). ``main.py``
# children keep XLA's default; the scripts of 8 simulated devices pass LOW_CODEGEN_EFFORT_ENV themselves.
_codegen_effort(full=False)

MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def pytest_collection_modifyitems(config, items):
    """Modules holding a ``slow`` test first (a stable sort: the order within each module is kept)."""
    slow_modules = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_modules)


LOCKS = _run_folder("_BB3X_TESTS_LOCKS", "bb3x-jax-tests-locks-")  # one per run, shared by its workers
_run_folder("_BB3X_TESTS_SHARED", "bb3x-jax-tests-shared-")  # workdirs built once per run (tests/shared_runs.py)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test marked ``exclusive`` waits for the other workers' running tests to finish and holds their
    next ones back until it is done, its module fixtures included (they are set up and torn down
    inside this protocol). A readers-writer lock on files, with a turnstile that keeps the waiting
    exclusive test from being starved; uncontended in a one-process run."""
    exclusive = item.get_closest_marker("exclusive") is not None
    with open(os.path.join(LOCKS, "turnstile"), "a") as turnstile, open(os.path.join(LOCKS, "tests"), "a") as tests:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(tests, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(tests, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


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
    # Before the test's fixtures are set up: a module fixture compiles with its first test's effort.
    _codegen_effort(full=item.get_closest_marker("full_codegen") is not None)
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
