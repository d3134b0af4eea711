"""The tokenizer interface, this project's sentencepiece tokenizer, and turn-wise context encoding.

Why this module exists: the model, the input pipeline and the evaluation code
must agree on special ids and on how a multi-turn context becomes one token
sequence. ParlAI's conventions are used throughout (its ``DictionaryAgent``):
ids 0-3 are ``__null__`` (pad), ``__start__``, ``__end__``, ``__unk__``; the
context is the previous turns joined by the delimiter ``"\\n"`` and truncated
from the LEFT; labels end with ``__end__``.

Delimiter contract (kept by the sentencepiece tokenizer; a tokenizer that
cannot keep it, such as GPT-2's BPE, sets ``turnwise_exact = False`` and
encodes contexts exactly itself, see ``bpe.py``)::

    encode("\\n".join(turns)) == delimiter_ids.join(encode(t) for t in turns)

i.e. a context string is tokenized turn by turn. This makes the turn-wise,
backwards, early-stopping context encoder below exact (it never has to encode
the 20 turns nobody will see), and it means no subword ever spans a turn
boundary. The sentencepiece model gets ``"\\n"`` as a user-defined symbol so
the delimiter is one token of its own.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm

# --- ParlAI special tokens ----------------------------------------------------
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
PAD_TOKEN, START_TOKEN, END_TOKEN, UNK_TOKEN = "__null__", "__start__", "__end__", "__unk__"
DELIMITER = "\n"

# Chars per token used for the first guess of how many context turns to encode;
# only speed depends on it (a short guess is topped up, never wrong).
DEFAULT_CHARS_PER_TOKEN = 4.0


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the project may rely on: SentencePiece here, the checkpoints' GPT-2 BPE in ``bpe.py``.

    ``encode`` never emits pad/start/end; it splits its input on ``"\\n"`` and
    joins the per-turn encodings with ``delimiter_ids`` (module docstring), or
    the tokenizer says ``turnwise_exact = False``.
    ``decode`` skips pad ids only: it does not stop at ``end_id`` (callers that
    decode generations cut there themselves). An implementation may also offer
    ``encode_batch_numpy(texts) -> list[np.ndarray]`` (int32); the input
    pipeline uses it when present.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def start_id(self) -> int: ...

    @property
    def end_id(self) -> int: ...

    @property
    def unk_id(self) -> int: ...

    @property
    def delimiter_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


# --- SentencePiece ----------------------------------------------------------------
def _read_bytes(path: str | os.PathLike) -> bytes:
    """Reads local or remote (gs://) paths; etils comes with tensorflow-datasets."""
    try:
        from etils import epath
    except ImportError:  # pragma: no cover - etils is a tfds dependency
        with open(path, "rb") as f:
            return f.read()
    return epath.Path(path).read_bytes()


def _write_bytes(path: str | os.PathLike, data: bytes) -> None:
    try:
        from etils import epath
    except ImportError:  # pragma: no cover
        with open(path, "wb") as f:
            f.write(data)
        return
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


class SentencePieceTokenizer:
    """A sentencepiece model with ParlAI special ids and a ``"\\n"`` delimiter token.

    Built by ``train_sentencepiece`` (lossless settings: identity normalisation,
    whitespace runs kept, byte fallback so no text maps to ``__unk__``). The one
    text that does not round-trip is a literal U+2581 ("▁"), which sentencepiece
    uses as its space marker and decodes as a space.
    """

    def __init__(self, model_proto: bytes, *, num_threads: int | None = None):
        self._proto = bytes(model_proto)
        # Batched encodes split over a few threads (sentencepiece holds the GIL,
        # so this is the only parallelism inside one Python process).
        self._num_threads = int(num_threads) if num_threads is not None else min(4, os.cpu_count() or 1)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        # A persistent pool avoids spawning threads on every batched call; the
        # lock keeps two Python threads (prefetcher, main) off it at once.
        self._pool = spm.ThreadPool(self._num_threads) if hasattr(spm, "ThreadPool") and self._num_threads > 1 else None
        self._pool_lock = threading.Lock()
        try:  # numpy output needs sentencepiece >= 0.2.1
            self._numpy_out = isinstance(self._sp.encode(["a"], out_type="numpy")[0], np.ndarray)
        except (TypeError, ValueError, RuntimeError):
            self._numpy_out = False
        expected = {PAD_ID: PAD_TOKEN, START_ID: START_TOKEN, END_ID: END_TOKEN, UNK_ID: UNK_TOKEN}
        for i, piece in expected.items():
            got = self._sp.id_to_piece(i)
            if got != piece:
                raise ValueError(
                    f"sentencepiece id {i} is {got!r}, expected {piece!r} (train with train_sentencepiece)"
                )
        delim = self._sp.piece_to_id(DELIMITER)
        if delim == UNK_ID or self._sp.id_to_piece(delim) != DELIMITER:
            raise ValueError("sentencepiece model lacks the '\\n' delimiter piece (train with train_sentencepiece)")
        self._delimiter_ids = (delim,)
        self._special_text = {START_ID: START_TOKEN, END_ID: END_TOKEN, UNK_ID: UNK_TOKEN, delim: DELIMITER}

    @classmethod
    def load(cls, model_path: str | os.PathLike, *, num_threads: int | None = None) -> SentencePieceTokenizer:
        return cls(_read_bytes(model_path), num_threads=num_threads)

    # Pickling (e.g. for worker processes) ships the model bytes, not the C++ object.
    def __getstate__(self):
        return {"model_proto": self._proto, "num_threads": self._num_threads}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], num_threads=state["num_threads"])

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def start_id(self) -> int:
        return START_ID

    @property
    def end_id(self) -> int:
        return END_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def delimiter_ids(self) -> tuple[int, ...]:
        return self._delimiter_ids

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def _encode_lines(self, lines: list[str], out_type=int) -> list:
        """Batched encode of strings that contain no delimiter."""
        if not lines:
            return []
        if self._pool is not None and len(lines) > 1:
            with self._pool_lock:
                return self._sp.encode(lines, out_type=out_type, thread_pool=self._pool)
        return self._sp.encode(lines, out_type=out_type, num_threads=1)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch_numpy(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode_batch`` as int32 arrays: optional fast path the input pipeline
        uses when present (saves building Python ints for every token)."""
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        if not self._numpy_out or any(DELIMITER in t for t in texts):
            return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]
        return self._encode_lines(texts, out_type="numpy")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        if not any(DELIMITER in t for t in texts):
            return self._encode_lines(texts)
        # Split every text into turns, encode all turns in one call, re-join.
        flat: list[str] = []
        counts: list[int] = []
        for t in texts:
            parts = t.split(DELIMITER)
            flat.extend(parts)
            counts.append(len(parts))
        encoded = self._encode_lines(flat)
        out: list[list[int]] = []
        pos = 0
        delim = list(self._delimiter_ids)
        for n in counts:
            ids = list(encoded[pos])
            for part in encoded[pos + 1 : pos + n]:
                ids += delim
                ids += part
            out.append(ids)
            pos += n
        return out

    def decode(self, ids: Iterable[int]) -> str:
        # Decode runs of ordinary pieces separately: each turn was encoded on its
        # own (with its own dummy-prefix space), so each run is decoded likewise.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i == PAD_ID:
                continue
            special = self._special_text.get(i)
            if special is None:
                run.append(i)
                continue
            if run:
                out.append(self._sp.decode(run))
                run = []
            out.append(special)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)


def train_sentencepiece(
    texts: Iterable[str | bytes],
    model_path: str | os.PathLike,
    vocab_size: int = 8000,
    seed: int = 0,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    max_sentences: int | None = None,
    max_sentence_length: int = 4192,
    num_threads: int = 16,
    extra_options: dict | None = None,
) -> SentencePieceTokenizer:
    """Trains a deterministic, lossless sentencepiece model and writes it to ``model_path``.

    Determinism: input is consumed in the given order (each text split into its
    ``"\\n"``-separated turns, the unit ``encode`` works on), nothing is sampled
    (``max_sentences`` keeps the FIRST sentences), the global sentencepiece seed
    is set, and ``num_threads`` is a fixed number rather than the machine's core
    count: the EM statistics are summed per thread, so the model bytes depend on
    the thread count (measured), but not on anything else.
    """
    def sentences():
        n = 0
        for text in texts:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            for line in text.split(DELIMITER):
                if not line:
                    continue
                if max_sentences is not None and n >= max_sentences:
                    return
                n += 1
                yield line

    options = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        bos_id=START_ID,
        eos_id=END_ID,
        unk_id=UNK_ID,
        pad_piece=PAD_TOKEN,
        bos_piece=START_TOKEN,
        eos_piece=END_TOKEN,
        unk_piece=UNK_TOKEN,
        user_defined_symbols=[DELIMITER],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        split_digits=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads,
        minloglevel=2,
    )
    options.update(extra_options or {})
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=buf, **options)
    proto = buf.getvalue()
    _write_bytes(model_path, proto)
    return SentencePieceTokenizer(proto)


# --- ParlAI framing ------------------------------------------------------------------
def as_text(x) -> str:
    """A text field as ``str``, whether TFDS handed it over as bytes, a 0-d array or text."""
    if isinstance(x, str):
        return x
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x).decode("utf-8")
    if hasattr(x, "item"):  # 0-d numpy arrays
        return as_text(x.item())
    raise TypeError(f"expected str or UTF-8 bytes, got {type(x).__name__}")



def encode_contexts(
    contexts: Sequence[str | bytes],
    tokenizer: Tokenizer,
    text_truncate: int | None,
    *,
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
) -> list[list[int]]:
    """Batched ``encode_context``: equal, example by example, to encoding each full
    context and keeping its last ``text_truncate`` tokens.

    Why it is fast: contexts are whole conversations but only ~128 tokens
    survive, so only the last turns are encoded. Round one guesses how many
    trailing turns cover ``text_truncate`` tokens from their character count
    and encodes all guesses of the batch in one call; the few examples still
    short get more turns in further rounds (budget doubles each round). By the
    delimiter contract the tokens of the trailing turns are exactly the tail of
    the full encoding, so the result is exact whatever the guess.
    """
    texts = [as_text(c) for c in contexts]
    if text_truncate is None:
        return tokenizer.encode_batch(texts)
    if text_truncate <= 0:
        return [[] for _ in texts]
    T = text_truncate
    delim = list(tokenizer.delimiter_ids)
    dlen = len(delim)
    n = len(texts)
    # cut[i]: texts[i][:cut[i]] is not encoded yet (it ends just before a "\n",
    # or is empty: cut == -1 means every turn is encoded).
    cut = [len(t) for t in texts]
    parts: list[list[list[int]]] = [[] for _ in range(n)]  # chunks, newest first
    ntok = [0] * n
    budget = max(1, int(T * chars_per_token))
    pending = range(n)
    while pending:
        # Take, per example, the turns that intersect the last `budget` chars
        # of what is not encoded yet: one rfind, no per-turn Python loop.
        flat: list[str] = []
        spans: list[tuple[int, int, int]] = []
        for i in pending:
            text, end = texts[i], cut[i]
            new_cut = text.rfind(DELIMITER, 0, max(0, end - budget))
            turns = text[new_cut + 1 : end].split(DELIMITER)
            spans.append((i, len(flat), len(turns)))
            flat.extend(turns)
            cut[i] = new_cut
        encoded = tokenizer.encode_batch(flat)
        still = []
        for i, pos, k in spans:
            chunk = list(encoded[pos])
            for ids in encoded[pos + 1 : pos + k]:
                chunk += delim
                chunk += ids
            ntok[i] += len(chunk) + (dlen if parts[i] else 0)
            parts[i].append(chunk)
            if ntok[i] < T and cut[i] >= 0:
                still.append(i)
        pending = still
        budget *= 2
    out: list[list[int]] = []
    for chunks in parts:
        ids = chunks[-1]
        for chunk in reversed(chunks[:-1]):
            ids += delim
            ids += chunk
        out.append(ids[-T:] if len(ids) > T else ids)
    return out


def encode_context(context: str | bytes, tokenizer: Tokenizer, text_truncate: int | None) -> list[int]:
    """ParlAI history framing: turns joined by the delimiter, LEFT-truncated to
    the last ``text_truncate`` tokens (None keeps everything)."""
    return encode_contexts([context], tokenizer, text_truncate)[0]


def encode_labels(labels: Sequence[str | bytes], tokenizer: Tokenizer, label_truncate: int) -> list[list[int]]:
    """Batched ``encode_label``."""
    if label_truncate < 1:
        raise ValueError(f"label_truncate must be >= 1 (room for the end token), got {label_truncate}")
    keep = label_truncate - 1
    end = tokenizer.end_id
    return [ids[:keep] + [end] for ids in tokenizer.encode_batch([as_text(x) for x in labels])]


def encode_label(label: str | bytes, tokenizer: Tokenizer, label_truncate: int) -> list[int]:
    """Label tokens truncated from the RIGHT to ``label_truncate - 1``, then
    ``end_id``: the start of a reply is kept (ParlAI) and the model always sees
    where the reply ends, so the length is at most ``label_truncate``."""
    return encode_labels([label], tokenizer, label_truncate)[0]
