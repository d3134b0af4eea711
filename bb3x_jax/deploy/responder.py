"""The model's replies to many conversations at once.

Why batches: on an accelerator (and on a CPU's vector units) one search over
32 contexts costs little more than one over a single context, so a server
that decodes each request alone serves a fraction of the users it could.
``Responder`` frames histories exactly as training framed contexts and runs
one jitted search per batch; batch sizes are powers of two up to
``max_batch``, so the search compiles once per size. ``BatchingResponder``
gathers concurrent requests from an async server into those batches on a
worker thread: the first request of a batch waits at most ``wait_s`` for
others to join.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from bb3x_jax import decoding
from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data.tokenizers.base import DELIMITER
from bb3x_jax.eval.generation import response_text


def context_text(turns: Sequence[str]) -> str:
    """A history as the release's context: one turn per line, no line breaks inside a turn."""
    return DELIMITER.join(" ".join(turn.split()) for turn in turns)


def batch_sizes(max_batch: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(min(sizes[-1] * 2, max_batch))
    return sizes


class Responder:
    """(network, tokenizer, framing, decoding settings) -> replies to histories, in batches."""

    def __init__(self, network, tokenizer, framing: framing_lib.Framing, settings: decoding.Settings, *,
                 max_batch: int = 8, seed: int = 0):
        self.tokenizer, self.framing, self.settings = tokenizer, framing, settings
        self.vocab_size = network.cfg.vocab_size  # a tokenizer larger than the model fails, not wraps
        graphdef, self.state = nnx.split(network)
        self.search = decoding.compiled_search(graphdef, settings)
        self.sizes = batch_sizes(max_batch)
        self.key = jax.random.key(seed)
        self.batches = 0  # decoding calls so far: each draws its own sampling key

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def rows_for(self, n: int) -> int:
        return next(size for size in self.sizes if size >= n)

    def reply(self, histories: Sequence[Sequence[str]]) -> list[str]:
        """One reply per history (a list of turn texts, oldest first); at most ``max_batch``."""
        if not 0 < len(histories) <= self.max_batch:
            raise ValueError(f"between 1 and {self.max_batch} histories per call, got {len(histories)}")
        ids = framing_lib.context_ids([context_text(h) for h in histories], self.tokenizer, self.framing)
        decoding.check_ids(ids, self.vocab_size, "the tokenizer's context ids")
        rows = decoding.pad_batch(ids, rows=self.rows_for(len(histories)), width=self.framing.text_truncate,
                                  pad_id=self.tokenizer.pad_id, filler_id=self.tokenizer.end_id)
        tokens, _ = self.search(self.state, rows, jax.random.fold_in(self.key, self.batches))
        self.batches += 1
        return [response_text(self.tokenizer, row) for row in np.asarray(tokens)[: len(histories)]]

    def warm_up(self) -> None:
        """Compiles every batch size now, so that no user waits for a compilation."""
        for size in self.sizes:
            self.reply([["hello"]] * size)
        self.batches = 0


class BatchingResponder:
    """Awaitable replies; concurrent requests share one search (see the module docstring)."""

    def __init__(self, responder: Responder, wait_s: float = 0.01):
        self.responder, self.wait_s = responder, wait_s
        self._requests: queue.Queue = queue.Queue()
        self.batch_counts: list[int] = []  # how many requests each search served (the benchmark reads it)
        self._thread = threading.Thread(target=self._serve, name="decode", daemon=True)
        self._thread.start()

    async def reply(self, history: Sequence[str]) -> str:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._requests.put((list(history), future, loop))
        return await future

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _gather(self, first) -> list:
        """``first`` and whatever arrives within ``wait_s`` of it, up to ``max_batch``."""
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.responder.max_batch:
            try:
                item = self._requests.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is None:
                self._requests.put(None)  # stop after this batch
                break
            batch.append(item)
        return batch

    def _serve(self) -> None:
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch = self._gather(first)
            try:
                replies = self.responder.reply([history for history, _, _ in batch])
            except Exception as error:  # the requests fail with it; the server goes on
                for _, future, loop in batch:
                    loop.call_soon_threadsafe(_settle, future, None, error)
                continue
            self.batch_counts.append(len(batch))
            for (_, future, loop), text in zip(batch, replies):
                loop.call_soon_threadsafe(_settle, future, text, None)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
