"""Input pipeline: prepared examples -> fixed-shape, process-sharded token batches.

Design (why it looks like this):

* Order is a pure function of ``(seed, epoch)``: epoch ``e`` visits the source
  in ``Philox(key=(seed, e)).permutation(N)`` order (identity when not
  shuffling) and global batch ``s`` of that epoch is the slice
  ``[s*B, (s+1)*B)``. The iterator's whole state is therefore two integers
  (epoch, step in epoch) plus a fingerprint of what defines the order; it is
  JSON-serialisable and independent of the number of processes, so a run may
  resume on a different host count.
* Multi-host: every process computes the same global batch and takes its own
  contiguous block of ``B/P`` rows, so concatenating the processes' batches in
  process order gives the single-process batch. Only the local rows are read
  and tokenized.
* Fixed shapes: contexts (labels) are padded to the smallest configured bucket
  that holds the longest row of the batch, so the train step compiles once per
  bucket, not once per length. With several processes every one must choose the
  same bucket; that needs the global maximum length (``length_sync``).
* Eval (``drop_remainder=False``): the final partial batch is padded with rows
  that have ``valid=False``, ``index=-1``, feedback -1 and only pad tokens, so
  every example is seen exactly once and shapes stay fixed.
* An optional background thread prepares the next batches; the state reported
  is that of the batches handed out, and since a batch is a pure function of its
  position the thread cannot change what is yielded.

Grain's ``MapDataset`` was considered; the plain scheme above is used because
its state is trivially exact, process-count-free and needs no worker processes
(batched sentencepiece is fast enough in-process).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from bb3x_jax.data.framing import (
    Framing,
    TokenRows,
    frame_context_rows,
    frame_label_rows,
)
from bb3x_jax.data.tokenizers.base import DEFAULT_CHARS_PER_TOKEN, Tokenizer, _as_text

STATE_FORMAT = "bb3x_jax.pipeline/1"
BATCH_KEYS = ("context_ids", "label_ids", "feedback", "valid", "index")


def _check_buckets(name: str, buckets: tuple[int, ...], truncate: int) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"{name} must be strictly increasing positive ints, got {buckets}")
    if buckets[-1] < truncate:
        raise ValueError(f"largest of {name} ({buckets[-1]}) is below the truncation length {truncate}")
    return buckets


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that defines the batches (and, with the source, their order).

    ``context_buckets``/``label_buckets`` default to ``(text_truncate,)`` /
    ``(label_truncate,)``: one shape, one compilation. ``num_epochs=None``
    repeats forever. ``drop_remainder=True`` (training) drops each epoch's last
    partial batch; False (eval) pads it with invalid rows. ``workers`` > 0
    builds batches in that many spawned processes (each batch is a pure
    function of its position, so the output is identical); ``prefetch`` is the
    number of batches a background thread prepares ahead (0: none).
    """

    global_batch_size: int
    text_truncate: int = 128
    label_truncate: int = 32
    context_buckets: tuple[int, ...] | None = None
    label_buckets: tuple[int, ...] | None = None
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    drop_remainder: bool = True
    prefetch: int = 2
    workers: int = 0
    # How contexts and labels become token rows (bb3x_jax.data.framing): plain |
    # bart | bb3_opt_prompt; end_kept | parlai; ParlAI's global end token.
    context_framing: str = "plain"
    label_framing: str = "end_kept"
    global_end_token: bool = False

    def __post_init__(self):
        if self.global_batch_size <= 0:
            raise ValueError("global_batch_size must be positive")
        if self.text_truncate <= 0 or self.label_truncate <= 0:
            raise ValueError("text_truncate and label_truncate must be positive")
        if self.workers < 0 or self.prefetch < 0:
            raise ValueError("workers and prefetch must be >= 0")
        if self.num_epochs is not None and self.num_epochs < 0:
            raise ValueError("num_epochs must be None or >= 0")
        if not 0 <= self.seed < 2**64:
            raise ValueError("seed must be in [0, 2**64)")
        ctx = self.context_buckets if self.context_buckets is not None else (self.text_truncate,)
        lab = self.label_buckets if self.label_buckets is not None else (self.label_truncate,)
        object.__setattr__(self, "context_buckets", _check_buckets("context_buckets", ctx, self.text_truncate))
        object.__setattr__(self, "label_buckets", _check_buckets("label_buckets", lab, self.label_truncate))
        # Built once (validating the framing fields): every batch asks for it.
        object.__setattr__(self, "_framing", Framing(
            text_truncate=self.text_truncate, label_truncate=self.label_truncate, context=self.context_framing,
            label=self.label_framing, global_end_token=self.global_end_token))

    @property
    def framing(self) -> Framing:
        return self._framing

    @classmethod
    def for_eval(cls, global_batch_size: int, **kwargs) -> PipelineConfig:
        """Every example exactly once, in source order, last batch padded."""
        kwargs = {"shuffle": False, "num_epochs": 1, "drop_remainder": False, **kwargs}
        return cls(global_batch_size=global_batch_size, **kwargs)


def epoch_permutation(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The visiting order of one epoch: a fresh permutation per (seed, epoch)."""
    if not shuffle:
        return np.arange(num_examples, dtype=np.int64)
    rng = np.random.Generator(np.random.Philox(key=(int(epoch) << 64) | int(seed)))
    return rng.permutation(num_examples).astype(np.int64, copy=False)


def _pick_bucket(buckets: tuple[int, ...], longest: int) -> int:
    for b in buckets:
        if b >= longest:
            return b
    raise ValueError(f"length {longest} exceeds the largest bucket {buckets[-1]}")


def jax_length_sync(local_max: np.ndarray) -> np.ndarray:
    """Global max of per-process lengths: a collective, hence ``prefetch=0``."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local_max, np.int32))).reshape(-1, 2).max(axis=0)


class _Prefetcher:
    """Produces batches from a start position in a daemon thread, ``depth`` ahead.

    The thread holds only a weak reference to the iterator, so an iterator that
    is dropped without ``close()`` is still collected and its thread ends.
    """

    def __init__(self, produce: Callable[[tuple[int, int]], Any], start: tuple[int, int], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(weakref.WeakMethod(produce), start), daemon=True)
        self._thread.start()

    def _put(self, item, produce_ref) -> bool:
        while not self._stop.is_set() and produce_ref() is not None:
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, produce_ref, pos):
        try:
            while not self._stop.is_set():
                produce = produce_ref()
                if produce is None:
                    return
                item = produce(pos)
                del produce
                if not self._put(("ok", item), produce_ref) or item is None:
                    return
                pos = item[1]
        except BaseException as e:  # surfaced in the consumer
            self._put(("error", e), produce_ref)

    def get(self):
        kind, item = self._queue.get()
        if kind == "error":
            raise item
        return item

    def close(self):
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()


_WORKER_ITERATOR: "BatchIterator | None" = None


def _worker_init(source, tokenizer, config, process_index, process_count) -> None:
    global _WORKER_ITERATOR
    config = dataclasses.replace(config, prefetch=0, workers=0)
    _WORKER_ITERATOR = BatchIterator(source, tokenizer, config, process_index=process_index, process_count=process_count)


def _worker_produce(pos):
    return _WORKER_ITERATOR._produce(pos)


class _ProcessPrefetcher:
    """Builds batches in spawned worker processes, ``depth`` positions ahead, in order.

    Tokenization holds the GIL, so threads cannot use a second core; processes
    can. Each worker owns a copy of the iterator and builds the batch at a
    given position, which is all a batch depends on, so the order and the
    contents are those of the in-process iterator.
    """

    def __init__(self, worker_args, start, following, depth: int, workers: int):
        import collections
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # fork is unsafe once JAX threads exist
        self._pool = context.Pool(workers, initializer=_worker_init, initargs=worker_args)
        self._pending: collections.deque = collections.deque()
        self._next = start
        self._following = following
        self._depth = depth

    def _fill(self) -> None:
        while len(self._pending) < self._depth and self._next is not None:
            self._pending.append(self._pool.apply_async(_worker_produce, (self._next,)))
            self._next = self._following(self._next)

    def get(self):
        self._fill()
        if not self._pending:
            return None
        item = self._pending.popleft().get()
        self._fill()
        return item

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()


class BatchIterator:
    """Deterministic, resumable iterator of this process's share of each global batch.

    Yields dicts of numpy arrays: ``context_ids`` int32 [b, Lc] (left-truncated
    context, right-padded), ``label_ids`` int32 [b, Ll] (label tokens, end
    token, pad), ``feedback`` int32 [b], ``valid`` bool [b], ``index`` int64 [b]
    (source index, -1 on padding rows), with ``b = global_batch_size /
    process_count``. ``Lc``/``Ll`` are buckets of the config.

    ``source``: ``len()`` and ``source[i]`` -> dict with ``context``, ``label``
    (str or UTF-8 bytes) and ``feedback`` (int); ``source.__getitems__`` is
    used for batched reads when present (tfds data sources).
    ``length_sync`` maps this process's ``[max context len, max label len]`` to
    the global maxima; needed only with several processes and several buckets
    (see ``jax_length_sync``).
    """

    def __init__(
        self,
        source,
        tokenizer: Tokenizer,
        config: PipelineConfig,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        length_sync: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if config.global_batch_size % process_count:
            raise ValueError(f"global_batch_size {config.global_batch_size} not divisible by {process_count} processes")
        multi_bucket = len(config.context_buckets) > 1 or len(config.label_buckets) > 1
        if process_count > 1 and multi_bucket and length_sync is None:
            raise ValueError(
                "several buckets with several processes need length_sync (e.g. jax_length_sync) "
                "so that all processes pick the same shapes"
            )
        if length_sync is not None and (config.prefetch > 0 or config.workers > 0):
            # A sync is a collective: every process must issue it in the same
            # order relative to the train step's collectives, which a background
            # thread does not guarantee.
            raise ValueError("length_sync needs prefetch=0 and workers=0 (it must run in the calling thread)")
        self._source = source
        self._getitems = getattr(source, "__getitems__", None)
        # A token cache (token_cache.TokenizedSource) hands out ready token rows.
        self._token_rows = getattr(source, "token_rows", None)
        if self._token_rows is not None and source.framing != config.framing:
            raise ValueError(f"token cache was framed as {source.framing}, the config asks {config.framing}")
        self._tokenizer = tokenizer
        self._config = config
        self._process_index = int(process_index)
        self._process_count = int(process_count)
        self._length_sync = length_sync
        self._num_examples = len(source)
        self._local_batch = config.global_batch_size // process_count
        B = config.global_batch_size
        if config.drop_remainder:
            self._steps_per_epoch = self._num_examples // B
        else:
            self._steps_per_epoch = math.ceil(self._num_examples / B)
        if self._steps_per_epoch == 0 and config.num_epochs != 0:
            raise ValueError(f"no batch in an epoch: {self._num_examples} examples, global batch {B}, "
                             f"drop_remainder={config.drop_remainder}")
        self._pos = (0, 0)  # (epoch, step in epoch) of the next batch handed out
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._chars_per_token = DEFAULT_CHARS_PER_TOKEN
        self._prefetcher: _Prefetcher | None = None

    # --- properties ---------------------------------------------------------------
    @property
    def config(self) -> PipelineConfig:
        return self._config

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    @property
    def local_batch_size(self) -> int:
        return self._local_batch

    # --- state ---------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        c = self._config
        return {
            "seed": int(c.seed),
            "shuffle": bool(c.shuffle),
            "drop_remainder": bool(c.drop_remainder),
            "global_batch_size": int(c.global_batch_size),
            "num_examples": int(self._num_examples),
        }

    def get_state(self) -> dict:
        """Position of the next batch to hand out (prefetched batches excluded)."""
        return {"format": STATE_FORMAT, "epoch": self._pos[0], "step_in_epoch": self._pos[1], **self._fingerprint()}

    def set_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown pipeline state format {state.get('format')!r}")
        mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"pipeline state does not match this config/source (saved, now): {mismatched}")
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step <= self._steps_per_epoch:
            raise ValueError(f"invalid position epoch={epoch} step_in_epoch={step}")
        self._stop_prefetch()
        self._pos = (epoch, step)

    # --- iteration -----------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._config.workers > 0 or self._config.prefetch > 0:
            if self._prefetcher is None:
                self._prefetcher = self._start_prefetch()
            try:
                item = self._prefetcher.get()
            except BaseException:
                self._stop_prefetch()  # a later next() retries from the same position
                raise
        else:
            item = self._produce(self._pos)
        if item is None:
            self._stop_prefetch()
            raise StopIteration
        batch, self._pos = item
        return batch

    def close(self) -> None:
        """Stops the prefetch thread (iteration may continue afterwards)."""
        self._stop_prefetch()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop_prefetch()
        except Exception:
            pass

    def _start_prefetch(self):
        c = self._config
        if c.workers == 0:
            return _Prefetcher(self._produce, self._pos, c.prefetch)
        steps, epochs = self._steps_per_epoch, c.num_epochs

        def following(pos):  # the position after pos's batch, None past the last epoch
            epoch, step = pos
            if step >= steps:
                epoch, step = epoch + 1, 0
            return None if epochs is not None and epoch >= epochs else (epoch, step + 1)

        worker_args = (self._source, self._tokenizer, c, self._process_index, self._process_count)
        return _ProcessPrefetcher(worker_args, self._pos, following, max(c.prefetch, 2 * c.workers), c.workers)

    def _stop_prefetch(self):
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    # --- batch construction (pure function of the position) -----------------------------
    def _normalise(self, pos: tuple[int, int]) -> tuple[int, int] | None:
        epoch, step = pos
        if step >= self._steps_per_epoch:
            epoch, step = epoch + 1, 0
        if self._config.num_epochs is not None and epoch >= self._config.num_epochs:
            return None
        return epoch, step

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            c = self._config
            self._perm_cache = (epoch, epoch_permutation(self._num_examples, c.seed, epoch, c.shuffle))
        return self._perm_cache[1]

    def _read(self, indices: list[int]) -> list:
        if not indices:
            return []
        if self._getitems is not None:
            return list(self._getitems(indices))
        return [self._source[i] for i in indices]

    def _produce(self, pos: tuple[int, int]):
        """Returns (local batch, position after it), or None past the last epoch."""
        norm = self._normalise(pos)
        if norm is None:
            return None
        epoch, step = norm
        c = self._config
        B, b = c.global_batch_size, self._local_batch
        global_indices = self._permutation(epoch)[step * B : (step + 1) * B]
        lo = self._process_index * b
        local_indices = global_indices[lo : lo + b]  # shorter than b only on a padded eval batch
        n = len(local_indices)
        if self._token_rows is not None:  # a token cache: rows are ready (framed), no tokenizing
            ctx_parts, lab_parts, cached_feedback = self._token_rows(local_indices)
            ctx, lab = TokenRows(*ctx_parts), TokenRows(*lab_parts)
            feedback_values = cached_feedback
        else:
            examples = self._read([int(i) for i in local_indices])
            contexts = [_as_text(ex["context"]) for ex in examples]
            labels = [_as_text(ex["label"]) for ex in examples]
            ctx = frame_context_rows(contexts, self._tokenizer, c.framing, self._chars_per_token)
            lab = frame_label_rows(labels, self._tokenizer, c.framing)
            self._update_chars_per_token(labels, lab.lengths)
            feedback_values = [int(ex["feedback"]) for ex in examples]

        longest = np.array([ctx.longest(), lab.longest()], np.int64)
        if self._length_sync is not None:
            longest = np.asarray(self._length_sync(longest)).reshape(2)
        lc = _pick_bucket(c.context_buckets, int(longest[0]))
        ll = _pick_bucket(c.label_buckets, int(longest[1]))

        pad = self._tokenizer.pad_id
        feedback = np.full((b,), -1, np.int32)
        feedback[:n] = feedback_values
        valid = np.zeros((b,), bool)
        valid[:n] = True
        index = np.full((b,), -1, np.int64)
        index[:n] = local_indices
        batch = {
            "context_ids": ctx.padded(b, lc, pad),
            "label_ids": lab.padded(b, ll, pad),
            "feedback": feedback,
            "valid": valid,
            "index": index,
        }
        return batch, (epoch, step + 1)

    def _update_chars_per_token(self, labels: list[str], label_lengths: np.ndarray) -> None:
        """Tracks the text's chars/token, measured on untruncated labels; it only
        sets how many turns the context encoder takes in its first try (speed,
        never results)."""
        untruncated = label_lengths < self._config.label_truncate
        toks = int(label_lengths[untruncated].sum())  # the end token stands in for a turn's delimiter
        if toks >= 64:
            chars = sum(len(t) for t, u in zip(labels, untruncated) if u)
            # Slightly generous (x1.1) so that few examples need a second try.
            self._chars_per_token = 0.7 * self._chars_per_token + 0.3 * 1.1 * chars / toks


def measure_throughput(source, tokenizer: Tokenizer, config: PipelineConfig, num_batches: int, *,
                       warmup_batches: int = 1, **iterator_kwargs) -> dict:
    """Examples/s of the pipeline alone (read + tokenize + pad) over ``num_batches``
    (after ``warmup_batches``), single process."""
    kwargs = {"process_index": 0, "process_count": 1, **iterator_kwargs}
    it = BatchIterator(source, tokenizer, config, **kwargs)
    try:
        for _ in range(warmup_batches):
            next(it)
        examples = tokens = batches = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in it:
            examples += int(batch["valid"].sum())
            tokens += int((batch["context_ids"] != 0).sum() + (batch["label_ids"] != 0).sum())
            batches += 1
            if batches >= num_batches:
                break
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    finally:
        it.close()
    return {
        "examples_per_s": examples / seconds if seconds > 0 else float("inf"),
        "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
        "batches_per_s": batches / seconds if seconds > 0 else float("inf"),
        "examples": examples,
        "batches": batches,
        "seconds": seconds,
        # CPU time of the whole process (all threads): on a shared, busy host
        # examples per CPU-second is the stabler number.
        "cpu_seconds": cpu_seconds,
        "examples_per_cpu_s": examples / cpu_seconds if cpu_seconds > 0 else float("inf"),
    }


def global_batch_to_device(batch: dict[str, np.ndarray], mesh) -> dict:
    """Turns this process's rows into global ``jax.Array``s on ``mesh``.

    The batch dimension is sharded as the logical axis ``batch`` of the rules
    table (``bb3x_jax.sharding.LOGICAL_RULES``: the data-parallel mesh axes);
    the other dimensions are replicated. Works unchanged from 1 device to
    multi-host meshes.
    """
    import jax
    from jax.sharding import NamedSharding

    from bb3x_jax import sharding as sharding_lib

    sharding = NamedSharding(mesh, sharding_lib.logical_to_spec(("batch",), mesh))
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype == np.int64 and not jax.config.jax_enable_x64:
            value = value.astype(np.int32)  # avoid jax's silent-truncation warning; indices fit in int32
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
