"""ordered_map: input order, and a failed or dead worker ends the map with an error, never a hang.

Each failure case runs many times under a deadline (``bad_inputs.deadline``), so
a race that hangs once in ten runs fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from bb3x_jax.data import parallel
from tests import bad_inputs

REPEATS = 10


def square(x):
    return x * x


def fail_at_7(x):
    if x == 7:
        raise ValueError(f"item {x} is bad")
    time.sleep(0.01)
    return x


def exit_at_5(x):
    if x == 5:
        os._exit(3)
    return x


def sigkill_at_5(x):
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _items_failing_after(n):
    yield from range(n)
    raise ValueError("the input ended badly")


def test_results_come_in_input_order():
    assert list(parallel.ordered_map(square, range(40), workers=2, max_pending=3)) == [x * x for x in range(40)]


def test_worker_error_is_raised_as_itself_every_time():
    """The worker's own exception (type and message) reaches the caller, after the results before it."""
    with bad_inputs.deadline(60 * REPEATS):
        for _ in range(REPEATS):
            got = []
            with pytest.raises(ValueError, match="item 7 is bad"):
                for value in parallel.ordered_map(fail_at_7, range(40), workers=2):
                    got.append(value)
            assert got == list(range(7))


@pytest.mark.parametrize("die", [exit_at_5, sigkill_at_5], ids=["os._exit", "SIGKILL"])
def test_dead_worker_raises_instead_of_hanging(die):
    with bad_inputs.deadline(60 * REPEATS):
        for _ in range(REPEATS):
            with pytest.raises(parallel.WorkerDied, match="ended without returning its result"):
                list(parallel.ordered_map(die, range(40), workers=2))


def test_input_error_comes_after_the_earlier_results():
    """When the input iterator itself fails, the items read before it still come back first, as inline."""
    with bad_inputs.deadline(120):
        got = []
        with pytest.raises(ValueError, match="ended badly"):
            for value in parallel.ordered_map(square, _items_failing_after(9), workers=2):
                got.append(value)
        assert got == [x * x for x in range(9)]


def test_abandoned_map_stops_its_workers():
    with bad_inputs.deadline(120):
        results = parallel.ordered_map(square, range(1000), workers=2)
        assert next(results) == 0
        results.close()
