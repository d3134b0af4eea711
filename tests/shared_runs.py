"""Workdirs that several test modules start from, built once per test run for every xdist worker.

The first process to need one builds it while holding a file lock in the run's shared folder
(made by ``tests/conftest.py``); the others wait for that lock and then find it built. A failed
build leaves no ``.done`` marker, so the next one to ask builds it again (and fails the same way,
with its own error). Nobody writes in a shared workdir: callers copy it (``fresh_workdir``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable


def _built_once(name: str, build: Callable[[str], object]) -> str:
    folder = os.path.join(os.environ["_BB3X_TESTS_SHARED"], name)
    with open(folder + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(folder + ".done"):
                shutil.rmtree(folder, ignore_errors=True)
                build(folder)
                open(folder + ".done", "w").close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


def _prepare(folder: str) -> None:
    from tests.modes.test_train import run_main  # deferred: test_train itself imports this module

    run_main(folder, "--config.data_check.batches=1", mode="data")


def _train_mle(folder: str) -> None:
    from tests.modes.test_train import run_main

    shutil.copytree(prepared(), folder, ignore=shutil.ignore_patterns("data_check.json"))
    run_main(folder, "--config.train.objective=mle")


def prepared() -> str:
    """A workdir holding ``test_train``'s small synthetic release and its tokenizer (``--mode=data``
    with its flags), not trained. Shared: copy it before running in it."""
    return _built_once("prepared", _prepare)


def mle_base() -> str:
    """That release trained 12 steps with MLE and ``test_train``'s flags (iteration 0 of the
    iterate tests, the model the serving tests serve). Shared: copy it before running in it."""
    return _built_once("mle_base", _train_mle)
