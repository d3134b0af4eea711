"""Input pipeline: prepared examples -> fixed-shape, process-sharded token batches.

The loader is grain: a ``grain.MapDataset`` whose element ``k`` is the ``k``-th
batch of the run (its global example indices, then this process's rows of
them, then the framed and padded token arrays), iterated by grain with its
read thread (``prefetch``) or its worker processes (``mp_prefetch``,
``workers``). Framing lives in ``bb3x_jax.data.framing``; placing a batch on
the device mesh is ``bb3x_jax.sharding.put_batch`` (applied here when the
iterator is given a mesh).

* Order is a pure function of ``(seed, epoch)``: epoch ``e`` visits the source
  in ``Philox(key=(seed, e)).permutation(N)`` order (identity when not
  shuffling) and global batch ``s`` of that epoch is the slice
  ``[s*B, (s+1)*B)`` (``epoch_permutation``; grain's own shuffle is another
  permutation with 32-bit seeds, so it would change every run's batches).
  A batch is a pure function of its position ``k``, so prefetching threads or
  workers cannot change what is yielded.
* State: grain's iterator state ``{"next_index": k}`` plus the epoch, the step
  in the epoch and a fingerprint of what defines the order. It is JSON and
  independent of the number of processes and of workers/prefetch, so a run may
  resume on another host count or worker count. With worker processes grain's
  own state is per worker (``test_grain_worker_state_depends_on_worker_count``),
  so a worker pipeline resumes by starting grain at ``k`` instead.
* Batching of global indices is a slice of the epoch's permutation, one call per
  batch: grain's ``MapDataset.batch`` reads its parent one element at a time
  (``test_grain_batch_reads_one_element_at_a_time``), which caps a token cache
  far below its speed.
* Multi-host: every process computes the same global batch and takes its own
  contiguous block of ``B/P`` rows, so concatenating the processes' batches in
  process order gives the single-process batch. Only the local rows are read
  and tokenized.
* Fixed shapes: contexts (labels) are padded to the smallest configured bucket
  that holds the longest row of the batch, so the train step compiles once per
  bucket, not once per length. With several processes every one must choose the
  same bucket; that needs the global maximum length (``length_sync``), a
  collective made in the calling thread (so no prefetch then).
* Eval (``drop_remainder=False``): the final partial batch is padded with rows
  that have ``valid=False``, ``index=-1``, feedback -1 and only pad tokens, so
  every example is seen exactly once and shapes stay fixed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable

import grain
import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from bb3x_jax import sharding
from bb3x_jax.data.framing import Framing, TokenRows, frame_context_rows, frame_label_rows
from bb3x_jax.data.tokenizers.base import DEFAULT_CHARS_PER_TOKEN, Tokenizer, as_text

STATE_FORMAT = "bb3x_jax.pipeline/1"
BATCH_KEYS = ("context_ids", "label_ids", "feedback", "valid", "index")


def check_buckets(buckets, truncate: int) -> tuple[int, ...]:
    """Bucket lengths as ints; ValueError unless strictly increasing, positive and reaching ``truncate``
    (the config's validation and ``PipelineConfig`` both ask here)."""
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"must be strictly increasing positive lengths, got {buckets}")
    if buckets[-1] < truncate:
        raise ValueError(f"largest bucket {buckets[-1]} is below the truncation {truncate}")
    return buckets


def _check_buckets(name: str, buckets, truncate: int) -> tuple[int, ...]:
    try:
        return check_buckets(buckets, truncate)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that defines the batches (and, with the source, their order).

    ``context_buckets``/``label_buckets`` default to ``(text_truncate,)`` /
    ``(label_truncate,)``: one shape, one compilation. ``num_epochs=None``
    repeats forever. ``drop_remainder=True`` (training) drops each epoch's last
    partial batch; False (eval) pads it with invalid rows. ``workers`` > 0
    builds batches in that many grain worker processes (each batch is a pure
    function of its position, so the output is identical); ``prefetch`` is the
    number of batches grain's read thread prepares ahead (0: none).
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
    return np.asarray(multihost_utils.process_allgather(np.asarray(local_max, np.int32))).reshape(-1, 2).max(axis=0)


def steps_per_epoch(num_examples: int, config: PipelineConfig) -> int:
    """Global batches per epoch: full ones only, or with the last one padded (eval)."""
    B = config.global_batch_size
    return num_examples // B if config.drop_remainder else math.ceil(num_examples / B)


class BatchOrder:
    """Random access to the run's global batches of example indices: item ``k`` is
    batch ``k % steps`` of epoch ``k // steps`` (int64 [B], -1 on eval padding slots).

    The grain source of the pipeline; ``len()`` covers ``num_epochs`` (about
    ``sys.maxsize`` positions when repeating forever). A batch is one slice of the
    permutation, not grain's ``batch`` (test_grain_batch_reads_one_element_at_a_time).
    """

    def __init__(self, num_examples: int, config: PipelineConfig):
        self._num_examples = int(num_examples)
        self._config = config
        self.steps_per_epoch = steps_per_epoch(self._num_examples, config)
        if config.num_epochs is not None:
            self._len = self.steps_per_epoch * config.num_epochs
        else:
            self._len = (sys.maxsize // max(self.steps_per_epoch, 1)) * self.steps_per_epoch
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self._len

    def _permutation(self, epoch: int) -> np.ndarray:
        cached = self._cache
        if cached is None or cached[0] != epoch:
            c = self._config
            cached = (epoch, epoch_permutation(self._num_examples, c.seed, epoch, c.shuffle))
            self._cache = cached
        return cached[1]

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self._len:
            raise IndexError(f"batch position {k} outside [0, {self._len})")
        epoch, step = divmod(int(k), self.steps_per_epoch)
        B = self._config.global_batch_size
        indices = self._permutation(epoch)[step * B : (step + 1) * B]
        if len(indices) < B:  # the padded last batch of an eval epoch
            indices = np.concatenate([indices, np.full(B - len(indices), -1, np.int64)])
        return indices

    def __getstate__(self):  # workers rebuild the permutation cache themselves
        return {**self.__dict__, "_cache": None}


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """This process's contiguous block of rows of a global batch."""

    start: int
    size: int

    def __call__(self, global_indices: np.ndarray) -> np.ndarray:
        return global_indices[self.start : self.start + self.size]


class BatchBuilder:
    """Local example indices (-1: padding) -> the fixed-shape numpy batch (module docstring).

    ``source``: ``len()`` and ``source[i]`` -> dict with ``context``, ``label``
    (str or UTF-8 bytes) and ``feedback`` (int); ``source.__getitems__`` is
    used for batched reads when present (tfds data sources); a token cache
    (``token_cache.TokenizedSource``) hands out framed rows through ``token_rows``.
    """

    def __init__(self, source, tokenizer: Tokenizer, config: PipelineConfig,
                 length_sync: Callable[[np.ndarray], np.ndarray] | None = None):
        self._source = source
        self._tokenizer = tokenizer
        self._config = config
        self._length_sync = length_sync
        self._chars_per_token = DEFAULT_CHARS_PER_TOKEN

    def _read(self, indices: list[int]) -> list:
        if not indices:
            return []
        getitems = getattr(self._source, "__getitems__", None)
        if getitems is not None:
            return list(getitems(indices))
        return [self._source[i] for i in indices]

    def __call__(self, local: np.ndarray) -> dict[str, np.ndarray]:
        c = self._config
        b = len(local)
        local_indices = local[local >= 0]  # padding slots only at the end (an eval epoch's last batch)
        n = len(local_indices)
        token_rows = getattr(self._source, "token_rows", None)
        if token_rows is not None:  # a token cache: rows are ready (framed), no tokenizing
            ctx_parts, lab_parts, feedback_values = token_rows(local_indices)
            ctx, lab = TokenRows(*ctx_parts), TokenRows(*lab_parts)
        else:
            examples = self._read([int(i) for i in local_indices])
            labels = [as_text(ex["label"]) for ex in examples]
            ctx = frame_context_rows([ex["context"] for ex in examples], self._tokenizer, c.framing,
                                     self._chars_per_token)
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
        return {
            "context_ids": ctx.padded(b, lc, pad),
            "label_ids": lab.padded(b, ll, pad),
            "feedback": feedback,
            "valid": valid,
            "index": index,
        }

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


class BatchIterator:
    """Deterministic, resumable iterator of this process's share of each global batch.

    Yields dicts of numpy arrays: ``context_ids`` int32 [b, Lc] (left-truncated
    context, right-padded), ``label_ids`` int32 [b, Ll] (label tokens, end
    token, pad), ``feedback`` int32 [b], ``valid`` bool [b], ``index`` int64 [b]
    (source index, -1 on padding rows), with ``b = global_batch_size /
    process_count``. ``Lc``/``Ll`` are buckets of the config. Given ``mesh`` (a
    ``jax.sharding.Mesh``), it yields the global batch as ``jax.Array``s placed
    on it instead (``sharding.put_batch``).

    ``source``: see ``BatchBuilder``. ``length_sync`` maps this process's
    ``[max context len, max label len]`` to the global maxima; needed only with
    several processes and several buckets (see ``jax_length_sync``).
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
        mesh: jax.sharding.Mesh | None = None,
    ):
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
        if getattr(source, "token_rows", None) is not None and source.framing != config.framing:
            raise ValueError(f"token cache was framed as {source.framing}, the config asks {config.framing}")
        self._config = config
        self._mesh = mesh
        self._num_examples = len(source)
        self._local_batch = config.global_batch_size // process_count
        self._order = BatchOrder(self._num_examples, config)
        if self._order.steps_per_epoch == 0 and config.num_epochs != 0:
            raise ValueError(f"no batch in an epoch: {self._num_examples} examples, global batch "
                             f"{config.global_batch_size}, drop_remainder={config.drop_remainder}")
        self._dataset = (
            grain.MapDataset.source(self._order)
            .map(ProcessRows(process_index * self._local_batch, self._local_batch))
            .map(BatchBuilder(source, tokenizer, config, length_sync))
        )
        self._next = 0  # position of the next batch handed out
        self._grain_iter: grain.DatasetIterator | None = None

    # --- properties ---------------------------------------------------------------
    @property
    def config(self) -> PipelineConfig:
        return self._config

    @property
    def steps_per_epoch(self) -> int:
        return self._order.steps_per_epoch

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
        if self._grain_iter is not None and not self._config.workers:
            grain_state = self._grain_iter.get_state()
        else:
            grain_state = {"next_index": self._next}
        return {"format": STATE_FORMAT, **self.position(grain_state["next_index"]), **self._fingerprint(),
                "grain": grain_state}

    def position(self, batches: int) -> dict:
        """``{"epoch", "step_in_epoch"}`` after ``batches`` batches; a finished epoch reads
        (e, steps), not (e + 1, 0): the position after its last batch."""
        steps = self.steps_per_epoch
        epoch, step = (0, 0) if batches == 0 else ((batches - 1) // steps, (batches - 1) % steps + 1)
        return {"epoch": epoch, "step_in_epoch": step}

    def set_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown pipeline state format {state.get('format')!r}")
        mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"pipeline state does not match this config/source (saved, now): {mismatched}")
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"invalid position epoch={epoch} step_in_epoch={step}")
        k = epoch * self.steps_per_epoch + step
        if "grain" in state and int(state["grain"]["next_index"]) != k:  # states without it: epoch and step
            raise ValueError(f"pipeline state is inconsistent: grain {state['grain']} vs epoch={epoch} step={step}")
        self._stop()
        self._next = k

    # --- iteration -----------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self._next >= len(self._order):
            self._stop()
            raise StopIteration
        if self._grain_iter is None:
            self._grain_iter = self._start()
        try:
            batch = next(self._grain_iter)
        except BaseException:
            self._stop()  # a later next() retries from the same position
            raise
        self._next += 1
        return batch if self._mesh is None else sharding.put_batch(batch, self._mesh)

    def _start(self) -> grain.DatasetIterator:
        """A grain iterator yielding from position ``self._next``."""
        c = self._config
        if c.workers:
            if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside an absl app, the defaults
                flags.FLAGS.mark_as_parsed()
            # grain's worker state is per worker (test_grain_worker_state_depends_on_worker_count):
            # start the workers' dataset at the position instead of restoring a state.
            per_worker = max(1, math.ceil(max(c.prefetch, 2 * c.workers) / c.workers))
            return iter(
                self._dataset[self._next :]
                .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
                .mp_prefetch(grain.MultiprocessingOptions(num_workers=c.workers, per_worker_buffer_size=per_worker))
            )
        read = grain.ReadOptions(num_threads=1 if c.prefetch else 0, prefetch_buffer_size=c.prefetch)
        it = iter(self._dataset.to_iter_dataset(read))
        if self._next:
            it.set_state({"next_index": self._next})
        return it

    def _stop(self) -> None:
        if self._grain_iter is not None:
            self._grain_iter.close()
            self._grain_iter = None

    def close(self) -> None:
        """Stops grain's prefetch thread or workers (iteration may continue afterwards)."""
        self._stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass
