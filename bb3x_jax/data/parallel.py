"""Ordered, memory-bounded mapping over a process pool.

Both data preparation and the token cache turn a long stream of work items into
results that must come back in input order (so outputs do not depend on the
worker count) without reading the whole input ahead (so memory stays bounded).

A failure never hangs the caller: an exception raised by ``fn`` in a worker is
re-raised in the caller as itself (the same error the inline path raises), a
worker that dies (killed, out of memory, ``os._exit``) raises ``WorkerDied``,
and either way the remaining workers are terminated before the error leaves
``ordered_map``.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any

_POLL_S = 0.5  # how often a wait for a result also checks that the workers are alive
_JOIN_S = 5.0  # how long a terminated worker gets to exit before it is killed


class WorkerDied(RuntimeError):
    """A worker process ended without returning its result."""


def default_workers() -> int:
    """Worker processes to use by default: the cores, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def resolve_workers(requested: int) -> int:
    """-1 (or any negative) means the default; 0 means inline."""
    return default_workers() if requested < 0 else requested


def ordered_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    max_pending: int | None = None,
) -> Iterator[Any]:
    """``map(fn, items)`` in input order; ``workers=0`` runs inline.

    Workers are spawned (fork is unsafe once JAX's threads exist), so ``fn``
    and ``initializer`` must be importable module-level functions. At most
    ``max_pending`` items (default 4 per worker) are in flight. Errors come in
    input order, as inline: when ``items`` itself raises, the results (or
    errors) of the items before it come first.
    """
    if workers <= 0:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    limit = max_pending or 4 * workers
    executor = futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer, initargs=initargs
    )
    pending: collections.deque = collections.deque()
    finished = False
    try:
        iterator = iter(items)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                break
            except Exception:
                while pending:  # what came before the bad input comes first, as inline
                    yield _result(pending.popleft(), executor)
                raise
            try:
                pending.append(executor.submit(fn, item))
            except BrokenProcessPool:  # a worker died since the last result came back
                raise WorkerDied(_death_message(_dead(executor))) from None
            if len(pending) >= limit:
                yield _result(pending.popleft(), executor)
        while pending:
            yield _result(pending.popleft(), executor)
        finished = True
    finally:
        if finished:
            executor.shutdown(wait=True)
        else:
            _abandon(executor, pending)


def _processes(executor: futures.ProcessPoolExecutor) -> list:
    # The executor keeps its worker processes in a private dict (a public
    # ``terminate_workers`` exists only from Python 3.14 on).
    return list((getattr(executor, "_processes", None) or {}).values())


def _result(future: futures.Future, executor: futures.ProcessPoolExecutor) -> Any:
    """The future's result, or its error; a dead worker raises WorkerDied instead of waiting forever."""
    while True:
        try:
            return future.result(timeout=_POLL_S)
        except futures.TimeoutError:
            dead = _dead(executor)
            if dead and not future.done():
                raise WorkerDied(_death_message(dead)) from None
        except BrokenProcessPool:
            raise WorkerDied(_death_message(_dead(executor))) from None


def _dead(executor: futures.ProcessPoolExecutor) -> list:
    return [p for p in _processes(executor) if p.exitcode is not None]


def _death_message(dead: list) -> str:
    codes = ", ".join(f"pid {p.pid} exit code {p.exitcode}" for p in dead) or "exit code unknown"
    return f"a worker process ended without returning its result ({codes}; killed, or out of memory?)"


def _abandon(executor: futures.ProcessPoolExecutor, pending: collections.deque) -> None:
    """Stops everything after an error or an abandoned iteration, without waiting on the workers' work.

    The workers are terminated first: the executor then sees them gone, fails
    the pending futures and releases its queues itself, so the shutdown below
    cannot block on a worker. (Futures are not cancelled here: the executor
    would then fail setting their error.)
    """
    processes = _processes(executor)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(_JOIN_S)
        if process.is_alive():
            process.kill()
            process.join(_JOIN_S)
    executor.shutdown(wait=True)
    pending.clear()
