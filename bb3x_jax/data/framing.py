"""How a (context, label) pair becomes the encoder input and the decoder target.

Why a module of its own: training, evaluation, generation, chat and the
``encode`` command must frame text identically, and a pretrained checkpoint
must be framed as its own agent framed it. A ``Framing`` says how:

* ``context``: ``plain`` -- the context's tokens left-truncated to
  ``text_truncate`` (ParlAI's generator agents); ``bart`` -- BB3-3B's bart
  agent: ``[__start__] + the last text_truncate - 2 tokens + [__end__]``;
  ``bb3_opt_prompt`` -- BB3-30B/175B's dialogue prompt (``prompts.py``).
* ``label``: ``end_kept`` -- the first ``label_truncate - 1`` tokens, then the
  end token, so the model always sees where a reply ends (this project's
  choice for its own models and OPT); ``parlai`` -- ``label + [__end__]``
  truncated from the right, as ParlAI's agents do (a long label loses its end
  token; used for ParlAI checkpoints so training matches their agent).
* ``global_end_token``: ParlAI's ``--history-add-global-end-token end``: the
  context's tokens end with ``__end__`` (kept by the left truncation).

The row encoders are vectorised: rows are (flat token stream, starts,
lengths) and padding is one numpy gather.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from bb3x_jax.data import prompts
from bb3x_jax.data.tokenizers.base import DEFAULT_CHARS_PER_TOKEN, DELIMITER, Tokenizer, as_text, encode_contexts

CONTEXT_FRAMINGS = ("plain", "bart", "bb3_opt_prompt")
LABEL_FRAMINGS = ("end_kept", "parlai")


@dataclasses.dataclass(frozen=True)
class Framing:
    """Everything that decides a pair's token rows besides the tokenizer (module docstring)."""

    text_truncate: int = 128
    label_truncate: int = 32
    context: str = "plain"
    label: str = "end_kept"
    global_end_token: bool = False

    def __post_init__(self):
        if self.context not in CONTEXT_FRAMINGS:
            raise ValueError(f"context framing must be one of {', '.join(CONTEXT_FRAMINGS)}, got {self.context!r}")
        if self.label not in LABEL_FRAMINGS:
            raise ValueError(f"label framing must be one of {', '.join(LABEL_FRAMINGS)}, got {self.label!r}")
        if self.text_truncate <= 0 or self.label_truncate <= 0:
            raise ValueError("text_truncate and label_truncate must be positive")
        if self.label == "end_kept" and self.label_truncate < 2:
            raise ValueError("label_truncate must be >= 2 (a token and the end token)")
        minimum = 2 + 1 + self.global_end_token if self.context == "bart" else 1 + self.global_end_token
        if self.text_truncate < minimum:
            raise ValueError(f"{self.context} framing needs text_truncate >= {minimum}")
        if self.global_end_token and self.context == "bb3_opt_prompt":
            raise ValueError("the BB3 OPT prompt has no global end token")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Framing":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def is_bart_agent(opt: dict[str, Any]) -> bool:
    """ParlAI's ``bart`` agent (BB3-3B is one, or a FiD agent generating with it)."""
    return opt.get("model") == "bart" or opt.get("generation_model") == "bart"


# ParlAI History options that change how a context is vectorised, and the value
# this implementation reproduces (anything else is refused by name).
_PARLAI_HISTORY_DEFAULTS = {"person_tokens": False, "split_lines": False, "history_reversed": False,
                            "add_p1_after_newln": False}


def parlai_framing(opt: dict[str, Any], text_truncate: int, label_truncate: int, *, where: str = "") -> Framing:
    """The framing of a ParlAI checkpoint's agent (its ``.opt``), for the given truncations.

    The release gives each example's context as ONE text; ParlAI's History keeps
    it as one entry (``split_lines`` off), so ``delimiter`` (only put between
    entries) never enters. A ``--history-add-global-end-token`` appends
    ``__end__``; the bart agent wraps the context; labels lose their end token
    when truncated. Options that would vectorise otherwise are refused.
    """
    bad = [f"{k}={opt[k]!r}" for k, default in _PARLAI_HISTORY_DEFAULTS.items()
           if k in opt and opt[k] is not None and bool(opt[k]) != default]
    if bad:
        raise ValueError(f"{where or 'ParlAI options'}: history options not reproduced here: {', '.join(bad)}")
    return Framing(text_truncate=text_truncate, label_truncate=label_truncate,
                   context="bart" if is_bart_agent(opt) else "plain", label="parlai",
                   global_end_token=opt.get("history_add_global_end_token") not in (None, "", "None", False))


def pad_rows(rows: Sequence[Sequence[int]], num_rows: int, length: int, pad_id: int = 0) -> np.ndarray:
    """Right-pads token lists into an int32 [num_rows, length] array (extra rows all pad)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    return TokenRows(flat, np.cumsum(lengths) - lengths, lengths).padded(num_rows, length, pad_id)


@dataclasses.dataclass
class TokenRows:
    """Rows of a batch as (flat token stream, row starts, row lengths): padding
    them is one vectorised gather instead of a Python loop over rows."""

    stream: np.ndarray  # int32
    starts: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]

    def longest(self) -> int:
        return int(self.lengths.max(initial=0))

    def framed(self, start_id: int, end_id: int, keep: int) -> TokenRows:
        """[start] + the last ``keep`` tokens of each row + [end] (ParlAI's bart agent)."""
        kept = np.minimum(self.lengths, keep)
        lengths = kept + 2
        ends = np.cumsum(lengths)
        starts = ends - lengths
        stream = np.empty(int(ends[-1]) if len(lengths) else 0, np.int32)
        offs = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
        source = np.repeat(self.starts + self.lengths - kept, kept) + offs
        stream[np.repeat(starts + 1, kept) + offs] = self.stream[source]
        stream[starts] = start_id
        stream[ends - 1] = end_id
        return TokenRows(stream, starts, lengths)

    def appended(self, token: int) -> TokenRows:
        """Each row followed by ``token``."""
        lengths = self.lengths + 1
        ends = np.cumsum(lengths)
        starts = ends - lengths
        stream = np.empty(int(ends[-1]) if len(lengths) else 0, np.int32)
        offs = np.arange(int(self.lengths.sum())) - np.repeat(np.cumsum(self.lengths) - self.lengths, self.lengths)
        stream[np.repeat(starts, self.lengths) + offs] = self.stream[np.repeat(self.starts, self.lengths) + offs]
        stream[ends - 1] = token
        return TokenRows(stream, starts, lengths)

    def row(self, i: int) -> list[int]:
        start = int(self.starts[i])
        return self.stream[start : start + int(self.lengths[i])].tolist()

    def padded(self, num_rows: int, length: int, pad_id: int) -> np.ndarray:
        n = len(self.lengths)
        if self.longest() > length:
            raise ValueError(f"row of length {self.longest()} does not fit {length}")
        out = np.full((num_rows, length), pad_id, dtype=np.int32)
        if n and len(self.stream):
            cols = np.arange(length)
            idx = np.minimum(self.starts[:, None] + cols[None, :], len(self.stream) - 1)
            out[:n] = np.where(cols[None, :] < self.lengths[:, None], self.stream[idx], pad_id)
        return out


def encode_flat(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All encodings of ``texts`` as one int32 stream plus per-text lengths."""
    fast = getattr(tokenizer, "encode_batch_numpy", None)
    if fast is not None:
        arrays = fast(texts)
        lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
        return flat, lengths
    return flatten_rows(tokenizer.encode_batch(texts))


def flatten_rows(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def encode_context_rows(
    texts: list[str], tokenizer: Tokenizer, text_truncate: int, chars_per_token: float
) -> TokenRows:
    """Vectorised ``encode_contexts`` (same result, row by row).

    One round: each example's trailing turns that cover ``text_truncate *
    chars_per_token`` characters are encoded in one batched call, and the
    turn/delimiter interleaving, left truncation and padding are numpy index
    arithmetic. Examples whose guess falls short of ``text_truncate`` tokens
    (and have older turns) get only the missing older tokens from the exact
    multi-round ``encode_contexts``, in one more batched call.
    """
    n, T = len(texts), text_truncate
    if n == 0:
        return TokenRows(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not getattr(tokenizer, "turnwise_exact", True):
        # Whole-string tokenizers (ParlAI's GPT-2 BPE: "\n\n" can be one token)
        # do not split at turn boundaries; they left-truncate exactly themselves.
        rows = tokenizer.encode_contexts(texts, T, chars_per_token=chars_per_token)
        flat, lengths = flatten_rows(rows)
        return TokenRows(flat, np.cumsum(lengths) - lengths, lengths)
    delim = np.asarray(tokenizer.delimiter_ids, dtype=np.int32)
    dl = len(delim)
    budget = max(1, int(T * chars_per_token))
    flat_turns: list[str] = []
    counts = np.empty(n, np.int64)
    cuts = np.empty(n, np.int64)
    for i, text in enumerate(texts):
        cut = text.rfind(DELIMITER, 0, max(0, len(text) - budget))
        turns = text[cut + 1 :].split(DELIMITER)
        flat_turns.extend(turns)
        counts[i] = len(turns)
        cuts[i] = cut
    tokens, tl = encode_flat(tokenizer, flat_turns)
    last = np.cumsum(counts) - 1  # index of each example's last turn
    not_last = np.ones(len(tl), bool)
    not_last[last] = False
    seg = tl + dl * not_last  # each turn followed by a delimiter, except the last
    seg_end = np.cumsum(seg)
    seg_start = seg_end - seg
    stream = np.empty(int(seg_end[-1]), np.int32)
    tok_start = np.cumsum(tl) - tl
    stream[np.repeat(seg_start - tok_start, tl) + np.arange(len(tokens))] = tokens
    if dl:
        stream[(seg_start + tl)[not_last][:, None] + np.arange(dl)] = delim
    ex_end = seg_end[last]
    ex_len = np.diff(ex_end, prepend=0)
    lengths = np.minimum(ex_len, T)
    starts = ex_end - lengths
    short = np.flatnonzero((ex_len < T) & (cuts >= 0))
    if len(short):
        # Too few tokens but older turns left: encode only the tail of those
        # older turns that is still needed (exact, by the delimiter contract:
        # full = older + delimiter + newer).
        need = np.maximum(T - ex_len[short] - dl, 0)
        # One batched call; each example then keeps its own last need[j] tokens.
        tails = encode_contexts([texts[i][: cuts[i]] for i in short], tokenizer, int(need.max()),
                                chars_per_token=chars_per_token)
        tails = [t[max(0, len(t) - int(k)) :] if k else [] for t, k in zip(tails, need)]
        rows = []
        for j, i in enumerate(short):
            newer = stream[ex_end[i] - ex_len[i] : ex_end[i]].tolist()
            rows.append((tails[j] + delim.tolist() + newer)[-T:])
        extra, extra_len = flatten_rows(rows)
        starts[short] = len(stream) + np.cumsum(extra_len) - extra_len
        lengths[short] = extra_len
        stream = np.concatenate([stream, extra])
    return TokenRows(stream, starts, lengths)


def encode_label_rows(labels: list[str], tokenizer: Tokenizer, label_truncate: int, *,
                      keep_end: bool = True) -> TokenRows:
    """Vectorised label encoding: ``keep_end`` -- the first ``label_truncate - 1``
    tokens, then end (``tokenizer.encode_labels``); otherwise ParlAI's
    ``(tokens + [end])[:label_truncate]``, which drops the end of a long label."""
    tokens, tl = encode_flat(tokenizer, labels)
    if keep_end:
        keep, has_end = np.minimum(tl, label_truncate - 1), np.ones(len(tl), bool)
    else:
        keep, has_end = np.minimum(tl, label_truncate), tl < label_truncate
    src_start = np.cumsum(tl) - tl
    lengths = keep + has_end
    ends = np.cumsum(lengths)
    starts = ends - lengths
    stream = np.empty(int(ends[-1]) if len(tl) else 0, np.int32)
    offs = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)
    stream[np.repeat(starts, keep) + offs] = tokens[np.repeat(src_start, keep) + offs]
    stream[(ends - 1)[has_end]] = tokenizer.end_id
    return TokenRows(stream, starts, lengths)


def for_tokenizer(spec, text_truncate: int, label_truncate: int, *, context: str = "auto",
                  label: str = "auto") -> Framing:
    """The framing a tokenizer's checkpoint expects (``auto``), with explicit overrides.

    A ParlAI checkpoint: its agent's framing (``parlai_framing``); an OPT
    checkpoint (transformers, metaseq): BB3's OPT prompt; a bundle: the framing
    its run recorded; this project's sentencepiece models: plain.
    """
    kind = spec.kind if spec is not None else "sentencepiece"
    if kind == "parlai":
        base = parlai_framing(spec.opt or {}, text_truncate, label_truncate, where=spec.source)
    elif kind in ("hf", "metaseq"):
        base = Framing(text_truncate, label_truncate, context="bb3_opt_prompt")
    elif spec is not None and spec.framing:
        recorded = {k: spec.framing[k] for k in ("context", "label", "global_end_token") if k in spec.framing}
        base = Framing(text_truncate, label_truncate, **recorded)
    else:
        base = Framing(text_truncate, label_truncate)
    changes = {k: v for k, v in (("context", context), ("label", label)) if v != "auto"}
    return dataclasses.replace(base, **changes) if changes else base


def frame_context_rows(texts: Sequence[str | bytes], tokenizer: Tokenizer, framing: Framing,
                       chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> TokenRows:
    """The encoder inputs (decoder-only: the prompts) of ``texts`` under ``framing``."""
    texts = [as_text(t) for t in texts]
    T = framing.text_truncate
    if framing.context == "bb3_opt_prompt":
        stream, lengths = flatten_rows(prompts.encode_bb3_opt_prompts(texts, tokenizer, T))
        return TokenRows(stream, np.cumsum(lengths) - lengths, lengths)
    rows = encode_context_rows(texts, tokenizer, T - framing.global_end_token, chars_per_token)
    if framing.global_end_token:
        rows = rows.appended(tokenizer.end_id)
    if framing.context == "bart":
        rows = rows.framed(tokenizer.start_id, tokenizer.end_id, T - 2)
    return rows


def frame_label_rows(labels: Sequence[str | bytes], tokenizer: Tokenizer, framing: Framing) -> TokenRows:
    """The decoder targets of ``labels`` under ``framing``."""
    labels = [as_text(x) for x in labels]
    if framing.context == "bb3_opt_prompt":
        labels = [prompts.BB3_OPT_LABEL_PREFIX + x for x in labels]
    return encode_label_rows(labels, tokenizer, framing.label_truncate, keep_end=framing.label == "end_kept")


def context_ids(texts: Sequence[str | bytes], tokenizer: Tokenizer, framing: Framing,
                chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> np.ndarray:
    """Right-padded context rows [n, longest] exactly as training frames them: what
    generation, chat and the judge-based evaluation feed the model."""
    rows = frame_context_rows(texts, tokenizer, framing, chars_per_token)
    return rows.padded(len(texts), max(rows.longest(), 1), tokenizer.pad_id)


def frame_pairs(contexts: Sequence[str | bytes], labels: Sequence[str | bytes], tokenizer: Tokenizer,
                framing: Framing) -> list[tuple[list[int], list[int]]]:
    """(encoder input, decoder target) id lists of each pair, without padding."""
    ctx, lab = frame_context_rows(contexts, tokenizer, framing), frame_label_rows(labels, tokenizer, framing)
    return [(ctx.row(i), lab.row(i)) for i in range(len(contexts))]
