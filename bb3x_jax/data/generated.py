"""Training examples made from the model's own generations (iterative CRINGE).

Each iteration generates for training contexts, a judge labels every
generation good or bad, and the labelled generations join the training data.
Three pieces live here:

- ``balance``: the reference procedure's 50/50 mix: as many positives as
  negatives, where a distinct positive may appear at most twice (so a model
  that is mostly good still sees enough negatives, and a few positives are not
  repeated without end); whichever side is larger is subsampled.
- ``write_split`` / ``GeneratedSplit``: a prepared split of such examples, a
  folder with ``examples.jsonl`` and ``meta.json`` (counts, what was dropped,
  a checksum of the examples), read with random access like the release's
  prepared splits.
- ``ConcatRecords``: several record sources read as one (the release's train
  split followed by every iteration's split).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from bb3x_jax.data import schema

POSITIVE, NEGATIVE = schema.POSITIVE, schema.NEGATIVE
MAX_POSITIVE_COPIES = 2


def balance(examples: Sequence[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(balanced examples, counts): equal positives and negatives, each distinct positive
    (same context and label) at most ``MAX_POSITIVE_COPIES`` times; deterministic given ``seed``.

    Counts say what went in and what was kept, so nothing is dropped silently.
    """
    rng = random.Random(seed)
    distinct: dict[tuple[str, str], dict[str, Any]] = {}
    negatives = []
    for example in examples:
        if example["feedback"] == POSITIVE:
            distinct.setdefault((example["context"], example["label"]), example)
        elif example["feedback"] == NEGATIVE:
            negatives.append(example)
        else:
            raise ValueError(f"feedback must be {POSITIVE} or {NEGATIVE}, got {example['feedback']!r}")
    positives = list(distinct.values())
    n_positive_in = sum(e["feedback"] == POSITIVE for e in examples)
    size = min(len(positives) * MAX_POSITIVE_COPIES, len(negatives))
    rng.shuffle(positives)
    chosen_positives = (positives * MAX_POSITIVE_COPIES)[:size]  # each once before any twice
    chosen_negatives = rng.sample(negatives, size)
    mixed = chosen_positives + chosen_negatives
    rng.shuffle(mixed)
    counts = {
        "generated": len(examples), "positive_in": n_positive_in, "positive_distinct": len(positives),
        "negative_in": len(negatives), "positive_kept": size, "negative_kept": size,
        "positive_duplicates_dropped": n_positive_in - len(positives),
        "negative_dropped": len(negatives) - size,
        "positive_unused": max(len(positives) - size, 0),
    }
    return mixed, counts


def write_split(path: str, examples: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Writes ``examples`` (context, label, feedback, plus anything else) as a prepared split;
    atomic: the folder appears complete or not at all. Returns the written meta."""
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    digest = hashlib.sha256()
    with open(os.path.join(tmp, "examples.jsonl"), "w") as f:
        for example in examples:
            line = json.dumps(example, sort_keys=True, ensure_ascii=False)
            digest.update(line.encode())
            f.write(line + "\n")
    meta = {**meta, "examples": len(examples), "sha256": digest.hexdigest(),
            "positive": sum(e["feedback"] == POSITIVE for e in examples),
            "negative": sum(e["feedback"] == NEGATIVE for e in examples)}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(path):
        _replace_dir(tmp, path)
    else:
        os.replace(tmp, path)
    return meta


def _replace_dir(tmp: str, path: str) -> None:
    old = f"{path}.old-{os.getpid()}"
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)


class GeneratedSplit:
    """Random access to a written split: ``[i]`` and ``__getitems__`` give the
    pipeline's fields (context and label as bytes, feedback as int)."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path}: not a generated split (no meta.json)")
        self.path = path
        self.meta = json.load(open(meta_path))
        self._rows = []
        with open(os.path.join(path, "examples.jsonl")) as f:
            for number, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    self._rows.append({"context": row["context"].encode(), "label": row["label"].encode(),
                                       "feedback": int(row["feedback"])})
                except (ValueError, KeyError, AttributeError) as error:
                    raise ValueError(f"{path}/examples.jsonl:{number}: {error!r}") from None
        if len(self._rows) != self.meta["examples"]:
            raise ValueError(f"{path}: {len(self._rows)} examples, meta.json says {self.meta['examples']}")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._rows[index]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._rows[i] for i in indices]


class ConcatRecords:
    """Several sources as one: indices run through the first, then the second, ..."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self._ends = []
        total = 0
        for source in self.sources:
            total += len(source)
            self._ends.append(total)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        which = bisect.bisect_right(self._ends, index)
        return which, index - (self._ends[which - 1] if which else 0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, local = self._locate(index)
        return self.sources[which][local]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[int(i)] for i in indices]

    def __getattr__(self, name: str):
        # token_rows exists only when every source is a token cache (the pipeline
        # probes for it with getattr), so a mixed concatenation falls back to text.
        cached = name in ("token_rows", "text_truncate", "label_truncate", "framing") and self.sources and all(
            hasattr(s, "token_rows") for s in self.sources)
        if not cached:
            raise AttributeError(name)
        if name == "token_rows":
            return self._token_rows
        values = {getattr(s, name) for s in self.sources}
        if len(values) != 1:
            raise ValueError(f"token caches with different {name}: {sorted(map(str, values))}")
        return values.pop()

    def _token_rows(self, indices):
        """Token caches' ``token_rows`` through the concatenation: each source is asked
        for its own rows, and the rows are put back in the order of ``indices``."""
        indices = np.asarray(indices, np.int64)
        if len(indices) and not (0 <= indices.min() and indices.max() < len(self)):
            raise IndexError(f"index out of range 0..{len(self) - 1}")
        which = np.searchsorted(np.asarray(self._ends), indices, side="right")
        starts_of = np.concatenate([[0], self._ends[:-1]]).astype(np.int64)
        parts = {"context": ([], [], []), "label": ([], [], [])}  # streams, starts, lengths
        feedback = np.zeros(len(indices), np.int32)
        order = []
        offset = {"context": 0, "label": 0}
        for source_index in np.unique(which):
            rows = np.flatnonzero(which == source_index)
            ctx, lab, fb = self.sources[source_index].token_rows(indices[rows] - starts_of[source_index])
            for name, (stream, starts, lengths) in (("context", ctx), ("label", lab)):
                parts[name][0].append(stream)
                parts[name][1].append(starts + offset[name])
                parts[name][2].append(lengths)
                offset[name] += len(stream)
            feedback[rows] = fb
            order.append(rows)
        position = np.empty(len(indices), np.int64)
        position[np.concatenate(order) if order else []] = np.arange(len(indices))

        def joined(name):
            streams, starts, lengths = parts[name]
            if not streams:
                return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
            return (np.concatenate(streams), np.concatenate(starts)[position], np.concatenate(lengths)[position])

        return joined("context"), joined("label"), feedback
