"""An experiment's stages as jobs on worker processes, each pinned to its own CPUs.

On a small CPU machine one XLA process does not use its cores fully: a small
model's step is some thousands of short ops, and two threads make it only about
1.6x faster than one, so two one-thread processes do 1.25-1.5x the work of one
two-thread process (``docs/experiments.md``). Independent stages (other seeds,
the controls) therefore run side by side, one process per share of the CPUs.

A worker is pinned (``os.sched_setaffinity``) before it imports JAX, so XLA
sizes its thread pool to the worker's CPUs. XLA:CPU may sum in another order
with another thread count, so a job's values can differ from the parent
process's by rounding, which long training amplifies: the number of workers
(and the CPUs each gets) is part of what makes an experiment's numbers.
``workers`` <= 1 runs the jobs in the calling process, in order.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import traceback
from concurrent import futures
from typing import Any, Callable, Sequence

from bb3x_jax import errors

_PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


class JobFailed(RuntimeError):
    """A job raised something other than a ``UserError``: its name, the error and the worker's traceback."""


@dataclasses.dataclass(frozen=True)
class Job:
    """``fn(*args, *[result of each job in after])``, run once every job it names is done.

    ``fn`` is a module-level function (a worker process imports it by name).
    Jobs are listed in priority order: a free worker takes the first ready one.
    """

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    after: tuple[str, ...] = ()


def cpu_shares(workers: int) -> list[set[int]]:
    """The usable CPUs split into ``workers`` disjoint, equal-sized sets (the remainder unused)."""
    cpus = sorted(os.sched_getaffinity(0))
    if workers > len(cpus):
        raise ValueError(f"{workers} workers but {len(cpus)} usable CPUs")
    size = len(cpus) // workers
    return [set(cpus[i * size:(i + 1) * size]) for i in range(workers)]


def run_jobs(jobs: Sequence[Job], workers: int, setup: Callable[[], None] | None = None) -> dict[str, Any]:
    """Runs every job after the jobs it names; returns each job's result by name.

    ``setup`` (module-level, no arguments) runs once in each process that runs jobs, before its first.

    A job's failure stops the run (the other workers are terminated) and is
    raised here, named: a ``UserError`` as a ``UserError``, anything else as
    ``JobFailed`` with the worker's traceback.
    """
    _check(jobs)
    results: dict[str, Any] = {}
    if workers <= 1:
        if setup is not None:
            setup()
        for job in jobs:  # listed after their dependencies (checked)
            results[job.name] = job.fn(*job.args, *(results[d] for d in job.after))
        return results
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: JAX not yet started
    shares = context.Queue()
    for share in cpu_shares(workers):
        shares.put(share)
    pool = futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                                       initargs=(shares, setup))
    try:
        pending, running = list(jobs), {}
        while pending or running:
            for job in [j for j in pending if all(d in results for d in j.after)][:workers - len(running)]:
                pending.remove(job)
                args = job.args + tuple(results[d] for d in job.after)
                running[pool.submit(_call, job.name, job.fn, args)] = job.name
            finished, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                try:
                    results[name] = future.result()
                except futures.process.BrokenProcessPool:
                    raise JobFailed(f"{name}: a worker process died (killed, or out of memory)") from None
        return results
    finally:
        _stop(pool)


def _check(jobs: Sequence[Job]) -> None:
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"two jobs named {job.name!r}")
        missing = [d for d in job.after if d not in seen]
        if missing:
            raise ValueError(f"job {job.name!r} runs after {missing}, which are not listed before it")
        seen.add(job.name)


def _stop(pool: futures.ProcessPoolExecutor) -> None:
    """Ends the workers now: after a failure the others' long jobs are not waited for."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown forgets them
    for process in processes:
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _start(shares, setup: Callable[[], None] | None) -> None:
    """A worker's start: its CPUs, its end with the parent's (a killed script leaves no worker running),
    then ``setup``."""
    os.sched_setaffinity(0, shares.get())
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
    if setup is not None:
        setup()


def _call(name: str, fn: Callable[..., Any], args: tuple) -> Any:
    try:
        return fn(*args)
    except errors.UserError as error:
        raise errors.UserError(f"{name}: {error}") from None
    except Exception as error:  # the worker's traceback travels as text: not every exception pickles
        raise JobFailed(f"{name}: {type(error).__name__}: {error}\n{traceback.format_exc()}") from None
