"""Ordered, memory-bounded mapping over a process pool.

Both data preparation and the token cache turn a long stream of work items into
results that must come back in input order (so outputs do not depend on the
worker count) without reading the whole input ahead (so memory stays bounded).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any


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
    ``max_pending`` items (default 4 per worker) are in flight.
    """
    if workers <= 0:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    limit = max_pending or 4 * workers
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
