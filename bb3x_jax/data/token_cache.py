"""Tokenize a prepared split once; afterwards batches are numpy gathers.

Sentencepiece costs about 80 microseconds per example (about 160 tokens), so
an in-process tokenizing pipeline tops out near 10,000 examples/s per core.
Training reads every example many times with the same tokenizer and
truncation, so the split is tokenized once (in parallel, in order) into flat
token files plus offsets, memory-mapped afterwards. The cached rows are exactly
what the framing's own encoders produce (``bb3x_jax.data.framing``, tested):
the encoder input and the decoder target of each example, keyed by the
tokenizer and the whole framing.

Layout of a cache folder (written to a temporary name, then renamed, so a
half-written cache is never used): ``context.bin``/``label.bin`` (flat token
ids, uint16 when the vocabulary fits, else int32), ``context_offsets.npy``/
``label_offsets.npy`` (int64, N+1), ``feedback.npy`` (int8) and ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data import parallel
from bb3x_jax.data.framing import Framing
from bb3x_jax.data.tokenizers.base import DEFAULT_CHARS_PER_TOKEN, Tokenizer

FORMAT = "bb3x_jax.token_cache/1"
_BLOCK = 2048


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """What identifies a tokenizer's ids: its own ``fingerprint`` (BPE) or a hash of its
    sentencepiece model."""
    own = getattr(tokenizer, "fingerprint", None)
    if isinstance(own, str):
        return own
    proto = getattr(tokenizer, "model_proto", None)
    if not isinstance(proto, bytes):
        raise TypeError(f"{type(tokenizer).__name__} has no fingerprint or model_proto to identify it by")
    return hashlib.sha256(proto).hexdigest()[:16]


def cache_dir(root: str, source_id: str, tokenizer: Tokenizer, framing: Framing) -> str:
    """Where the cache of (source, tokenizer, framing) lives under ``root``."""
    key = f"{source_id}|{tokenizer_fingerprint(tokenizer)}|{framing.text_truncate}|{framing.label_truncate}"
    if framing != Framing(framing.text_truncate, framing.label_truncate):  # the default framing keeps its old key
        key += "|" + json.dumps(framing.to_dict(), sort_keys=True)
    return os.path.join(root, "tokens-" + hashlib.sha256(key.encode()).hexdigest()[:16])


# Worker state, set once per process.
_W: dict[str, Any] = {}


def _init(source, tokenizer, framing: Framing) -> None:
    _W.update(source=source, tokenizer=tokenizer, framing=framing)


def _encode_block(bounds: tuple[int, int]):
    start, stop = bounds
    source = _W["source"]
    getitems = getattr(source, "__getitems__", None)
    records = getitems(range(start, stop)) if getitems else [source[i] for i in range(start, stop)]
    # The framing's encoders take the stored UTF-8 bytes as they are.
    contexts = [r["context"] for r in records]
    labels = [r["label"] for r in records]
    ctx = framing_lib.frame_context_rows(contexts, _W["tokenizer"], _W["framing"], DEFAULT_CHARS_PER_TOKEN)
    lab = framing_lib.frame_label_rows(labels, _W["tokenizer"], _W["framing"])
    feedback = np.fromiter((int(r["feedback"]) for r in records), np.int8, count=len(records))
    return _compact(ctx), _compact(lab), feedback


def _compact(rows) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of all rows back to back, row lengths)."""
    idx = np.repeat(rows.starts, rows.lengths) + (
        np.arange(int(rows.lengths.sum())) - np.repeat(np.cumsum(rows.lengths) - rows.lengths, rows.lengths)
    )
    return rows.stream[idx], rows.lengths


def build(
    source,
    tokenizer: Tokenizer,
    framing: Framing,
    path: str,
    *,
    workers: int = 0,
) -> "TokenizedSource":
    """Tokenizes and frames every record of ``source`` into a cache at ``path`` (reused when present)."""
    if os.path.exists(os.path.join(path, "meta.json")):
        return TokenizedSource(path)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    n = len(source)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".incomplete-", dir=parent)
    try:
        offsets = {"context": [0], "label": [0]}
        feedback = []
        files = {name: open(os.path.join(tmp, f"{name}.bin"), "wb") for name in ("context", "label")}
        blocks = [(s, min(s + _BLOCK, n)) for s in range(0, n, _BLOCK)]
        results = parallel.ordered_map(
            _encode_block, blocks, workers=workers, initializer=_init,
            initargs=(source, tokenizer, framing),
        )
        for ctx, lab, fb in results:
            for name, (tokens, lengths) in (("context", ctx), ("label", lab)):
                files[name].write(tokens.astype(dtype).tobytes())
                offsets[name].extend((offsets[name][-1] + np.cumsum(lengths)).tolist())
            feedback.append(fb)
        for f in files.values():
            f.close()
        for name in ("context", "label"):
            np.save(os.path.join(tmp, f"{name}_offsets.npy"), np.asarray(offsets[name], np.int64))
        np.save(os.path.join(tmp, "feedback.npy"), np.concatenate(feedback) if feedback else np.zeros(0, np.int8))
        meta = {
            "format": FORMAT,
            "num_examples": n,
            "dtype": np.dtype(dtype).name,
            "text_truncate": framing.text_truncate,
            "label_truncate": framing.label_truncate,
            "framing": framing.to_dict(),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "pad_id": tokenizer.pad_id,
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(path) and not os.path.exists(os.path.join(path, "meta.json")):
            shutil.rmtree(path)  # an earlier attempt that never finished
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process (e.g. another host on a shared disk) finished first.
            if not os.path.exists(os.path.join(path, "meta.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenizedSource(path)


class TokenizedSource:
    """A token cache, memory-mapped: ``len()`` and ``token_rows(indices)``.

    Picklable (by path), so pipeline worker processes reopen it.
    """

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a token cache of format {FORMAT} (found {self.meta.get('format')!r})")
        dtype = np.dtype(self.meta["dtype"])
        self._tokens = {}
        self._offsets = {}
        for name in ("context", "label"):
            self._offsets[name] = np.load(os.path.join(path, f"{name}_offsets.npy"))
            size = os.path.getsize(os.path.join(path, f"{name}.bin"))
            self._tokens[name] = (
                np.memmap(os.path.join(path, f"{name}.bin"), dtype=dtype, mode="r") if size else np.zeros(0, dtype)
            )
        self._feedback = np.load(os.path.join(path, "feedback.npy"))
        if len(self._feedback) != self.meta["num_examples"]:
            raise ValueError(f"{path}: {len(self._feedback)} rows, meta says {self.meta['num_examples']}")

    @property
    def text_truncate(self) -> int:
        return int(self.meta["text_truncate"])

    @property
    def label_truncate(self) -> int:
        return int(self.meta["label_truncate"])

    @property
    def framing(self) -> Framing:
        """How the rows were framed (caches written before framings were recorded: the default)."""
        return Framing.from_dict(self.meta.get("framing") or {"text_truncate": self.text_truncate,
                                                              "label_truncate": self.label_truncate})

    def __len__(self) -> int:
        return int(self.meta["num_examples"])

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def token_rows(self, indices: np.ndarray):
        """(context rows, label rows, feedback) for ``indices``, rows as (stream, starts, lengths)."""
        indices = np.asarray(indices, np.int64)
        out = []
        for name in ("context", "label"):
            offsets = self._offsets[name]
            starts, lengths = offsets[indices], offsets[indices + 1] - offsets[indices]
            idx = np.repeat(starts, lengths) + (np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths))
            stream = np.asarray(self._tokens[name][idx], np.int32)
            out.append((stream, np.cumsum(lengths) - lengths, lengths))
        return out[0], out[1], self._feedback[indices].astype(np.int32)
