"""GPT-2 byte-level BPE tokenizers of the real BB3 checkpoints, on ``tokenizers``.

Why this module exists: the released BB3 / BB3x weights index their embedding
rows with ParlAI's dictionary ids (BB3-3B) or with OPT's fairseq ids (BB3-30B
/ 175B). Both are GPT-2 byte-level BPE underneath; what differs is the id each
BPE token gets, which special ids exist, and how ParlAI frames a context. This
module reproduces ParlAI 1.7.2 / metaseq exactly (verified against ParlAI's
own ``DictionaryAgent`` in the tests) with the maintained ``tokenizers``
library doing the BPE.

Conventions (file and line numbers refer to ParlAI 1.7.2)
---------------------------------------------------------
ParlAI dictionaries (``ParlaiBpeTokenizer``):

* ids 0-3 are ``__null__`` (pad), ``__start__``, ``__end__``, ``__unk__``: they
  are added before anything is loaded (parlai/core/dict.py:271-284).
* ``model.dict`` holds ``token<TAB>count`` lines; loading unescapes ``\\n``,
  ``\\t``, ``\\r`` (dict.py:51-60), lower-cases ``__NULL__``-style specials and
  adds each NEW token at the next id, so the file's first-occurrence order is
  the id order (dict.py:619-638, add_token at 377-384). The file is the
  authority for ids.
* ``--dict-tokenizer gpt2`` (BB3-3B, R2C2, BART): the BPE files are
  ``{datapath}/gpt2/encoder.json`` and ``{datapath}/gpt2/vocab.bpe``
  (parlai/utils/bpe.py:549-568, downloaded from fairseq when missing; ParlAI
  ignores ``--bpe-vocab`` / ``--bpe-merge`` here). A BPE token's dictionary
  string is its byte-level string's UTF-8 bytes, each byte > 127 or < 32
  written as ``\\x`` plus lower-case hex without a leading zero, e.g.
  ``Ġthe`` -> ``\\xc4\\xa0the`` (bpe.py:570-590). After the file is loaded,
  every ``encoder.json`` token missing from it is appended, in the JSON
  file's key order (bpe.py:744-757); the GPT-2 id values in ``encoder.json``
  are never read. With the canonical files this gives
  ParlAI id = GPT-2 id + 4 (also what parlai/agents/bart/
  convert_fairseq_to_parlai.py:402-418 assumes when it permutes BART's rows).
  ``vocab.bpe`` loses its first and last line (``split('\\n')[1:-1]``,
  bpe.py:537-539): the ``#version`` header and the empty string after the
  final newline. No prefix space is added (bpe.py:117, opt default None).
* ``--dict-tokenizer bytelevelbpe`` (BB1 / BB2 ``blender_3B`` style): the BPE
  files are ``{dict_file}-vocab.json`` / ``{dict_file}-merges.txt`` when they
  exist, else ``--bpe-vocab`` / ``--bpe-merge`` (bpe.py:799-832). ParlAI wraps
  ``tokenizers.ByteLevelBPETokenizer`` with ``add_prefix_space=True`` unless
  the opt says otherwise (bpe.py:796-798, 849-851), registers the four
  specials as HF special tokens (so the literal text ``__end__`` encodes to
  id 2!) and appends vocab tokens in HF id order (bpe.py:899-918). Dict
  strings are the raw byte-level strings (no ``\\x`` escaping). Decoding
  (dict.py:770-781) assumes ParlAI id = HF id + 4 whatever the file says, so
  a dict that disagrees with that is rejected here.
* fp16 models pad the dictionary with ``__FP16_PAD_{i}__`` tokens to a
  multiple of 8 (parlai/core/torch_agent.py:790-800); the saved ``model.dict``
  normally holds them already. ``__FP16_PAD_i__`` names that already exist are
  not re-added (so the result can stay unaligned, as in ParlAI).

OPT (``OptGpt2Tokenizer``, BB3-30B / 175B served by metaseq): GPT-2 BPE with
fairseq ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, then the GPT-2
ids in ``dict.txt`` order from id 4; the embedding has 50272 rows (padded to a
multiple of 8). HF's OPT files (``vocab.json`` already in OPT ids, plus
``merges.txt``) load with ``from_hf_files``; metaseq's (GPT-2 ``vocab.json``
and ``merges.txt`` plus fairseq ``dict.txt``) with ``from_metaseq_files``.
HF's OPT tokenizer config is GPT2Tokenizer with ``add_bos_token=True``,
``bos = eos = unk = "</s>"``, ``pad = "<pad>"``, no prefix space: a prompt is
``[2] + bpe(text)`` (``encode_prompt``). metaseq encodes text with a plain
``ByteLevelBPETokenizer`` (metaseq/data/encoders/hf_byte_bpe.py), so a literal
``</s>`` in text is BPE text here, whereas HF's tokenizer would map it to 2.

Framing decision (what ``encode`` means)
----------------------------------------
``encode(text)`` is ParlAI's ``txt2vec(text)``: the WHOLE string is BPE-encoded
at once, newlines included. That is what ParlAI feeds BB3 for this project's
data: each example's context is ONE ``text`` field (previous messages joined
with ``"\\n"``), the agent's History holds it as one entry, and
``History.get_history_vec`` (torch_agent.py:381-403) txt2vec's each entry
whole. (Separate History entries, i.e. multi-message episodes, are encoded
entry by entry and joined with ``txt2vec("\\n")``: ``parlai_history_vec``.)

Consequence: the project's delimiter contract
(``encode("\\n".join(t)) == delimiter_ids.join(encode(t) ...)``) does NOT hold
in general. GPT-2's pre-tokenizer regex splits a maximal whitespace run W
that is followed by a non-space into ``W[:-1]`` and ``W[-1]`` (the latter
joined to the next word when it is a space), and keeps a trailing run whole.
So a ``"\\n"`` is a piece of its own, and the turn-wise split exact, only when
W is ``"\\n"``, or W ends with it and a non-space follows, or W is ``"\\n"`` +
one whitespace character and a non-space follows. ``"a\\n\\nb"`` is exact
(``a|\\n|\\n|b``), but ``"a\\n\\n\\nb"`` (``a|\\n\\n|\\n|b``: ``ĊĊ`` is one GPT-2
token), ``"a \\n\\nb"`` (``a| \\n|\\n|b``: ``ĠĊ``), a context ending in
``"\\n\\n"`` or ``" \\n"`` are not. The classes therefore set
``turnwise_exact = False`` and offer ``is_exact_cut(text, i)`` (the newline
at ``i`` is its own piece, so
``encode(text) == encode(text[:i]) + [newline] + <text[i+1:] as a continuation>``;
checked equal to "is a pre-tokenizer piece" on random text) and
``encode_contexts(contexts, text_truncate)``, which returns exactly
``encode(c)[-text_truncate:]`` while encoding only the last turns, cutting
only at exact newlines. Context encoders use ``tokenizer.encode_contexts``
(or ``encode_contexts_exact`` below) instead of splitting contexts on
``"\\n"`` (the turn-wise ``tokenizer.encode_contexts``,
``framing.encode_context_rows``) whenever
``getattr(tokenizer, "turnwise_exact", True)`` is False. Labels need nothing:
``encode_batch`` of a label is already ParlAI's txt2vec.

Other ParlAI framing facts (torch_agent.py): contexts are truncated from the
LEFT (``_check_truncate`` 1441-1451, ``truncate_left = not history_reversed``
1478); labels are ``txt2vec(label) + [__end__]`` then truncated from the RIGHT
(1385-1413, 1527-1529; ``add_end=True`` in torch_generator_agent.py:683),
so a truncated label LOSES ``__end__``
(``parlai_label_vec``; the project's ``encode_label`` keeps it on purpose);
the BART agent (BB3-3B) re-truncates the context to ``text_truncate - 2`` and
wraps it as ``[__start__] + ctx + [__end__]`` (parlai/agents/bart/bart.py:
151-173, ``bart_encoder_input``).

Known differences from ParlAI, all deliberate or unavoidable:

* ``decode`` round-trips exactly: BPE ids are decoded as UTF-8 bytes
  (``errors="replace"`` like ParlAI), non-BPE ids (``__start__``, ``__end__``,
  ``__unk__``, ``__FP16_PAD_i__``, additional special tokens) as their names,
  pad ids skipped. ParlAI's gpt2 ``vec2txt`` raises KeyError on any non-BPE id
  other than additional special tokens, and its bytelevelbpe ``vec2txt``
  strips ALL leading spaces (and asserts the text starts with one). Here
  ``decode(encode(t)) == t`` for every ``t`` in gpt2 / OPT mode; in
  bytelevelbpe mode one leading space is removed, which is exact unless ``t``
  itself starts with a space (``tokenizers`` adds the prefix space only when
  absent, so ``"x"`` and ``" x"`` have the same ids) or contains a special
  token's name (the segment after it got a prefix space too).
* ``\\s``, ``\\p{L}``, ``\\p{N}`` in the GPT-2 regex: ``tokenizers`` (Oniguruma)
  and ParlAI's ``regex`` module agree on the White_Space set, but code points
  assigned in recent Unicode versions (about 4.6k, e.g. U+088F, U+10940..;
  none in common use) may be letters to one and not the other.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from bb3x_jax.data.tokenizers.base import (
    DEFAULT_CHARS_PER_TOKEN,
    DELIMITER,
    END_ID,
    END_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    START_ID,
    START_TOKEN,
    UNK_ID,
    UNK_TOKEN,
    _read_bytes,
    as_text,
    encode_contexts,
)

PARLAI_SPECIALS = (PAD_TOKEN, START_TOKEN, END_TOKEN, UNK_TOKEN)
FP16_PAD_SIZE = 8  # parlai.utils.torch.FP16_PAD_SIZE

# OPT / fairseq dictionary: "<s>" (0) exists but is unused; "</s>" (2) is both
# the bos OPT prompts start with and the eos.
OPT_PAD_ID, OPT_EOS_ID, OPT_UNK_ID = 1, 2, 3
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
OPT_VOCAB_SIZE = 50272  # rows of the real OPT / BB3-30B / 175B embedding

# GPT-2's pre-tokenizer (what tokenizers' ByteLevel(use_regex=True) and
# ParlAI's Gpt2BpeHelper.PATTERN implement); kept for reference and tests.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The regex's \s: the Unicode White_Space property (checked against both
# Oniguruma and the `regex` module in the tests; str.isspace differs).
WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


# --- byte-level alphabet and file formats ----------------------------------------
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls,
    space, DEL, NBSP, soft hyphen...) map, in byte order, to U+0100 onwards.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = byte_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def bytelevel_to_bytes(token: str) -> bytes:
    """The raw bytes a byte-level BPE token stands for."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise ValueError(f"{token!r} is not a byte-level BPE token (character {e.args[0]!r})") from None


def text_to_bytelevel(text: str) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in text.encode("utf-8"))


def parlai_gpt2_token_string(token: str) -> str:
    """The string ParlAI's gpt2 dictionary uses for a byte-level token.

    Each UTF-8 byte of the byte-level string > 127 or < 32 becomes ``\\x`` +
    lower-case hex without leading zero (ParlAI writes ``hex(b).lstrip('0')``),
    e.g. ``'Ġthe'`` -> ``'\\xc4\\xa0the'``; ``'\\n'`` would be ``'\\xa'``.
    """
    return "".join(f"\\x{b:x}" if (b > 127 or b < 32) else chr(b) for b in token.encode("utf-8"))


def parlai_escape(s: str) -> str:
    """``model.dict`` escaping of a token (parlai/core/dict.py:39-48)."""
    return s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def parlai_unescape(s: str) -> str:
    """``model.dict`` unescaping (parlai/core/dict.py:51-60); not an exact inverse."""
    return s.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")


def _read_text_lines(path: str | os.PathLike) -> list[str]:
    """Lines as ParlAI reads a dict: UTF-8, undecodable bytes dropped, universal newlines."""
    with io.TextIOWrapper(io.BytesIO(_read_bytes(path)), encoding="utf-8", errors="ignore") as f:
        return list(f)


def _read_json_vocab(path: str | os.PathLike) -> dict[str, int]:
    vocab = json.loads(_read_bytes(path).decode("utf-8"))  # keeps the file's key order
    if not isinstance(vocab, dict):
        raise ValueError(f"{path}: expected a JSON object token -> id")
    return vocab


def read_gpt2_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """GPT-2 ``vocab.bpe`` as ParlAI's Gpt2BpeHelper reads it: ``split('\\n')[1:-1]``.

    The first line must be the ``#version`` header (ParlAI drops line one
    unconditionally, which would silently lose a merge otherwise).
    """
    text = _read_bytes(path).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if not lines[0].startswith("#version"):
        raise ValueError(f"{path}:1: expected a '#version' header line (ParlAI skips line 1)")
    if lines[-1] != "":
        warnings.warn(f"{path}: no final newline; ParlAI drops the last merge {lines[-1]!r} too")
    merges = []
    for line in lines[1:-1]:
        parts = line.split()
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def read_hf_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``merges.txt`` as ``tokenizers`` reads it: '#version' lines skipped, 'a b' pairs."""
    merges = []
    text = _read_bytes(path).decode("utf-8").replace("\r\n", "\n")
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'left right', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def read_parlai_dict(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """``model.dict`` entries ``(token, count, line_number)`` as DictionaryAgent.load reads them."""
    out = []
    lower = {t.upper(): t for t in PARLAI_SPECIALS}
    for lineno, line in enumerate(_read_text_lines(path), 1):
        fields = line.rstrip("\n\r").split("\t")
        token = parlai_unescape(fields[0])
        token = lower.get(token, token)
        count = int(fields[1]) if len(fields) > 1 else 0
        out.append((token, count, lineno))
    return out


def write_parlai_dict(
    path: str | os.PathLike,
    tokens: Sequence[str],
    counts: Sequence[int] | None = None,
) -> None:
    """Writes ``token<TAB>count`` lines as DictionaryAgent.save does (dict.py:672-676)."""
    counts = counts if counts is not None else [1] * len(tokens)
    with open(path, "w", encoding="utf-8") as f:
        for tok, cnt in zip(tokens, counts):
            f.write(f"{parlai_escape(tok)}\t{cnt}\n")


def parlai_gpt2_dict_tokens(
    encoder_json: str | os.PathLike,
    *,
    fp16_pad: bool = True,
    additional_special_tokens: Sequence[str] = (),
) -> tuple[list[str], list[int]]:
    """Tokens and counts of the ``model.dict`` ParlAI saves for a fresh gpt2 dictionary.

    (Specials with counts 1000000003..1000000000, dict.py:325-340; BPE tokens
    count 1, bpe.py:755-757; additional special tokens 1000000004 + i,
    dict.py:353-356; FP16 pads count 1.)
    """
    tokens = list(PARLAI_SPECIALS)
    counts = [1000000003, 1000000002, 1000000001, 1000000000]
    seen = set(tokens)
    for tok in _read_json_vocab(encoder_json):
        s = parlai_gpt2_token_string(tok)
        if s not in seen:
            seen.add(s)
            tokens.append(s)
            counts.append(1)
    for i, tok in enumerate(additional_special_tokens):
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
            counts.append(1000000004 + i)
    if fp16_pad and len(tokens) % FP16_PAD_SIZE:
        for i in range(FP16_PAD_SIZE - len(tokens) % FP16_PAD_SIZE):
            tok = f"__FP16_PAD_{i}__"
            if tok not in seen:
                seen.add(tok)
                tokens.append(tok)
                counts.append(1)
    return tokens, counts


class _Vocab:
    """An insertion-ordered token <-> id table, like DictionaryAgent.add_token."""

    def __init__(self):
        self.tok2ind: dict[str, int] = {}
        self.ind2tok: list[str] = []
        self.line: dict[str, int] = {}  # token -> model.dict line of its first occurrence

    def add(self, tok: str, line: int | None = None) -> None:
        if tok not in self.tok2ind:
            self.tok2ind[tok] = len(self.ind2tok)
            self.ind2tok.append(tok)
            if line is not None:
                self.line[tok] = line

    def __len__(self):
        return len(self.ind2tok)


# --- the shared byte-level BPE engine ----------------------------------------------------
class _ByteLevelBpeBase:
    """GPT-2 byte-level BPE through ``tokenizers``, with model ids put straight
    into the BPE vocabulary (so no id remapping happens in Python).

    Subclasses set the special ids and names; this class provides encode /
    decode / exact left-truncation. Encoding never adds a prefix space or
    parses special tokens unless the subclass says so.
    """

    #: ``encode("\\n".join(turns))`` is NOT always the delimiter-join of the
    #: turns' encodings (module docstring). The pipeline must use
    #: ``encode_contexts`` for exact left truncation.
    turnwise_exact = False

    def __init__(
        self,
        *,
        bpe_ids: dict[str, int],
        merges: Sequence[tuple[str, str]],
        names: dict[int, str],
        pad_id: int,
        start_id: int,
        end_id: int,
        unk_id: int,
        vocab_size: int,
        special_tokens: Sequence[str] = (),
        special_ids: dict[str, int] | None = None,
        special_split: str = "none",
        add_prefix_space: bool = False,
    ):
        self._state = dict(
            bpe_ids=dict(bpe_ids),
            merges=[tuple(m) for m in merges],
            names=dict(names),
            pad_id=pad_id,
            start_id=start_id,
            end_id=end_id,
            unk_id=unk_id,
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            special_ids=dict(special_ids or {}),
            special_split=special_split,
            add_prefix_space=add_prefix_space,
        )
        self._build()

    def _build(self):
        st = self._state
        bpe_ids: dict[str, int] = st["bpe_ids"]
        missing = [c for c in _CHAR_TO_BYTE if c not in bpe_ids]
        if missing:
            # tokenizers would silently drop such bytes; ParlAI raises KeyError.
            raise ValueError(
                f"the BPE vocabulary lacks {len(missing)} of the 256 byte-level symbols "
                f"(e.g. {missing[:5]}); it is not a GPT-2 byte-level vocabulary"
            )
        ids = list(bpe_ids.values())
        if len(set(ids)) != len(ids):
            raise ValueError("two BPE tokens map to the same id")
        self._pad_id, self._start_id = st["pad_id"], st["start_id"]
        self._end_id, self._unk_id = st["end_id"], st["unk_id"]
        self._vocab_size = int(st["vocab_size"])
        self._specials: list[str] = st["special_tokens"]
        if any(DELIMITER in t or not t for t in self._specials):
            raise ValueError("special tokens must be non-empty and contain no newline")
        self._special_split = st["special_split"]
        self._prefix = bool(st["add_prefix_space"])
        self._names: dict[int, str] = st["names"]
        self._name_ids = {n: i for i, n in self._names.items()}
        self._name_ids.update(st["special_ids"])  # a special may also be a BPE token

        # Raw BPE: no prefix space, no special tokens (tokenizers' BPE is the
        # GPT-2 algorithm: lowest-rank pair first, ties left to right).
        self._raw = self._make_tokenizer(bpe_ids, st["merges"], prefix=False, specials=())
        if self._special_split == "hf":
            # ParlAI's bytelevelbpe helper: HF added special tokens + per-segment prefix space.
            self._full = self._make_tokenizer(bpe_ids, st["merges"], prefix=self._prefix, specials=self._specials)
        else:
            if self._prefix:
                raise ValueError("add_prefix_space is only implemented for the bytelevelbpe (hf) mode")
            self._full = None
        self._special_ids = {t: self._id_of_name(t) for t in self._specials}

        size = max(self._vocab_size, max(ids) + 1, max(self._names, default=-1) + 1)
        table: list[bytes | str | None] = [None] * size
        for tok, i in bpe_ids.items():
            table[i] = bytelevel_to_bytes(tok)
        for i, name in self._names.items():
            if table[i] is None:
                table[i] = name
        self._table = table
        self._newline_ids = tuple(self._raw.encode(DELIMITER).ids)
        self._delimiter_ids = tuple(self.encode(DELIMITER))

    def _id_of_name(self, name: str) -> int:
        if name not in self._name_ids:
            raise ValueError(f"special token {name!r} has no id")
        return self._name_ids[name]

    def _make_tokenizer(self, bpe_ids, merges, *, prefix: bool, specials: Sequence[str]) -> Tokenizer:
        vocab = dict(bpe_ids)
        for t in specials:
            vocab.setdefault(t, self._id_of_name(t))  # added tokens reuse a vocab id
        tk = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=list(merges),
                unk_token=None,
                fuse_unk=False,
                byte_fallback=False,
                ignore_merges=False,
                continuing_subword_prefix="",
                end_of_word_suffix="",
            )
        )
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
        if specials:
            tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return tk

    @property
    def fingerprint(self) -> str:
        """A stable hash of everything that decides the ids (vocabulary, merges, specials):
        it keys token caches and tells a judge's or checkpoint's tokenizer apart."""
        if getattr(self, "_fingerprint", None) is None:
            blob = json.dumps([type(self).__name__, self._state], sort_keys=True, default=list)
            self._fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._fingerprint

    # Pickling (worker processes) rebuilds the Rust objects from plain data.
    def __getstate__(self):
        return {"state": self._state}

    def __setstate__(self, d):
        self._state = d["state"]
        self._build()

    # --- Tokenizer protocol ----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def start_id(self) -> int:
        return self._start_id

    @property
    def end_id(self) -> int:
        return self._end_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def delimiter_ids(self) -> tuple[int, ...]:
        """``encode("\\n")``: what ParlAI's History puts between separate entries."""
        return self._delimiter_ids

    def encode(self, text: str) -> list[int]:
        """Whole-string encoding, ParlAI's ``txt2vec`` (see the module docstring)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode_batch([as_text(t) for t in texts], continuation=False)

    def encode_batch_numpy(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]

    txt2vec = encode

    def decode(self, ids: Iterable[int]) -> str:
        """Exact inverse of ``encode`` on text free of special-token names.

        BPE ids are joined as bytes and decoded as UTF-8 (``errors="replace"``,
        as ParlAI); any other id decodes to its name (``__end__``,
        ``__FP16_PAD_0__``, ...) and splits the byte runs, as ParlAI's special
        token handling does; pad ids are skipped; it does not stop at
        ``end_id``. With a prefix space (bytelevelbpe), one leading space is
        removed (module docstring: exact unless the text began with a space).
        """
        out: list[str] = []
        run = bytearray()
        table = self._table
        for i in ids:
            i = int(i)
            if i == self._pad_id:
                continue
            if not 0 <= i < len(table) or table[i] is None:
                raise ValueError(f"id {i} is outside the vocabulary (size {self._vocab_size})")
            piece = table[i]
            if isinstance(piece, bytes):
                run += piece
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            out.append(piece)
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        text = "".join(out)
        if self._prefix and text.startswith(" "):
            text = text[1:]
        return text

    def id_to_token(self, i: int) -> str:
        """The id's byte-level BPE string, or its special / dictionary name."""
        piece = self._table[int(i)]
        if isinstance(piece, bytes):
            return "".join(_BYTE_TO_CHAR[b] for b in piece)
        if piece is None:
            raise KeyError(i)
        return piece

    # --- encoding internals -----------------------------------------------------------
    def _encode_batch(self, texts: list[str], *, continuation: bool) -> list[list[int]]:
        """``continuation``: each text follows an exact newline cut inside a
        longer text, so its first segment gets no prefix space."""
        if self._special_split == "hf":
            if not continuation or not self._prefix:
                return _batch_ids(self._full, texts)
            # First segment (up to the first special) raw, the rest as usual.
            heads, tails, has_tail = [], [], []
            for t in texts:
                q = min((i for i in (t.find(s) for s in self._specials) if i >= 0), default=len(t))
                heads.append(t[:q])
                tails.append(t[q:])
                has_tail.append(q < len(t))
            h = _batch_ids(self._raw, heads)
            tl = _batch_ids(self._full, [x for x, k in zip(tails, has_tail) if k])
            out, j = [], 0
            for ids, k in zip(h, has_tail):
                if k:
                    ids = ids + tl[j]
                    j += 1
                out.append(ids)
            return out
        if self._specials and any(s in t for t in texts for s in self._specials):
            return [self._encode_parlai_specials(t) for t in texts]
        return _batch_ids(self._raw, texts)

    def _encode_parlai_specials(self, text: str) -> list[int]:
        """BPEHelper.encode (parlai/utils/bpe.py:153-179): split on the FIRST
        listed special token present, recursively; pieces BPE-encoded alone."""
        for tok in self._specials:
            pieces = text.split(tok)
            if len(pieces) > 1:
                ids: list[int] = []
                for k, piece in enumerate(pieces):
                    if k:
                        ids.append(self._special_ids[tok])
                    ids += self._encode_parlai_specials(piece)
                return ids
        return _batch_ids(self._raw, [text])[0] if text else []

    # --- exact left truncation --------------------------------------------------------
    def is_exact_cut(self, text: str, i: int) -> bool:
        """True when the newline ``text[i]`` splits the encoding exactly::

            encode(text) == encode(text[:i]) + [newline id] + <text[i+1:] encoded as a continuation>

        i.e. GPT-2's pre-tokenizer keeps that newline as a piece of its own and
        no special token or prefix space is involved. Conservative: False may
        be returned for a cut that happens to be exact (costs speed only).
        """
        if text[i] != DELIMITER:
            raise ValueError(f"text[{i}] is not a newline")
        n = len(text)
        s = i
        while s > 0 and text[s - 1] in WHITESPACE:
            s -= 1
        e = i + 1
        while e < n and text[e] in WHITESPACE:
            e += 1
        run = e - s
        if run == 1:
            ok = True
        elif e == n:  # a trailing whitespace run is one piece
            ok = False
        else:  # the regex gives W[:-1] and W[-1] (the latter joins a following word if it is " ")
            ok = i == e - 1 or (i == s and run == 2)
        if not ok:
            return False
        if self._prefix and s == 0:
            return False
        lo, hi = s - 1, e + 1  # the run and one character either side
        for tok in self._specials:
            if text.find(tok, max(0, lo - len(tok) + 1), min(n, hi - 1 + len(tok))) >= 0:
                return False
        return True

    def encode_contexts(
        self,
        contexts: Sequence[str | bytes],
        text_truncate: int | None,
        *,
        chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
    ) -> list[list[int]]:
        """``[encode(c)[-text_truncate:] for c in contexts]``, encoding only the tail.

        Round one encodes, per context, the text after the last exact newline
        cut that leaves about ``text_truncate * chars_per_token`` characters;
        contexts still short get further chunks (budget doubling) until they
        have ``text_truncate`` tokens or are fully encoded. Chunks meet at
        exact cuts, so the result equals whole-string encoding.
        """
        texts = [as_text(c) for c in contexts]
        if text_truncate is None:
            return self.encode_batch(texts)
        if text_truncate <= 0:
            return [[] for _ in texts]
        T = int(text_truncate)
        nl = list(self._newline_ids)
        n = len(texts)
        cut = [len(t) for t in texts]  # texts[i][:cut[i]] not encoded yet; -1: all done
        parts: list[list[list[int]]] = [[] for _ in range(n)]  # chunks, newest first
        ntok = [0] * n
        budget = max(1, int(T * chars_per_token))
        pending = list(range(n))
        while pending:
            heads, conts = [], []
            for i in pending:
                text, end = texts[i], cut[i]
                c = text.rfind(DELIMITER, 0, max(0, end - budget))
                while c >= 0 and not self.is_exact_cut(text, c):
                    c = text.rfind(DELIMITER, 0, c)
                (conts if c >= 0 else heads).append((i, text[c + 1 : end]))
                cut[i] = c
            results = {}
            for group, cont in ((heads, False), (conts, True)):
                if group:
                    enc = self._encode_batch([chunk for _, chunk in group], continuation=cont)
                    results.update({i: ids for (i, _), ids in zip(group, enc)})
            still = []
            for i in pending:
                ids = results[i]
                ntok[i] += len(ids) + (len(nl) if parts[i] else 0)
                parts[i].append(ids)
                if ntok[i] < T and cut[i] >= 0:
                    still.append(i)
            pending = still
            budget *= 2
        out = []
        for chunks in parts:
            ids = list(chunks[-1])
            for chunk in reversed(chunks[:-1]):
                ids += nl
                ids += chunk
            out.append(ids[-T:] if len(ids) > T else ids)
        return out


def _batch_ids(tk: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of a batch; ``encode_batch_fast`` (tokenizers >= 0.20) skips offsets, ~2x faster."""
    if not texts:
        return []
    fast = getattr(tk, "encode_batch_fast", None)
    encs = fast(texts, add_special_tokens=False) if fast else tk.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encs]


# --- ParlAI dictionaries --------------------------------------------------------------
class ParlaiBpeTokenizer(_ByteLevelBpeBase):
    """A ParlAI ``gpt2`` or ``bytelevelbpe`` dictionary (BB3-3B; BB1/BB2 style).

    Ids follow ParlAI's DictionaryAgent exactly: specials 0-3, then the
    ``model.dict`` file order, then BPE tokens the file lacks, then additional
    special tokens, then ``__FP16_PAD_i__`` (module docstring). ``encode`` is
    ParlAI's whole-string ``txt2vec``; see ``encode_contexts`` for exact left
    truncation and the module docstring for how ``decode`` differs from
    ParlAI's ``vec2txt``.

    Attributes after loading: ``dict_tokenizer``; ``ids_match_bpe_plus_4``
    (every BPE token's id is its BPE file id + 4); ``appended_tokens`` (BPE
    tokens ParlAI appends because ``model.dict`` lacks them: their rows may be
    missing from a checkpoint's embedding).
    """

    def __init__(self, *, dict_tokens: Sequence[str], dict_tokenizer: str, **kwargs):
        self.dict_tokens = list(dict_tokens)
        self.dict_tokenizer = dict_tokenizer
        self.ids_match_bpe_plus_4 = kwargs.pop("ids_match_bpe_plus_4", None)
        self.appended_tokens = list(kwargs.pop("appended_tokens", ()))
        super().__init__(**kwargs)

    def __getstate__(self):
        return {
            "state": self._state,
            "dict_tokens": self.dict_tokens,
            "dict_tokenizer": self.dict_tokenizer,
            "ids_match_bpe_plus_4": self.ids_match_bpe_plus_4,
            "appended_tokens": self.appended_tokens,
        }

    def __setstate__(self, d):
        self.dict_tokens = d["dict_tokens"]
        self.dict_tokenizer = d["dict_tokenizer"]
        self.ids_match_bpe_plus_4 = d["ids_match_bpe_plus_4"]
        self.appended_tokens = d["appended_tokens"]
        super().__setstate__(d)

    def token_to_id(self, token: str) -> int:
        """A dictionary string's id (gpt2 strings are ``\\x``-escaped), else unk."""
        return self._tok2ind.get(token, UNK_ID)

    def _build(self):
        super()._build()
        self._tok2ind = {t: i for i, t in enumerate(self.dict_tokens)}

    @classmethod
    def from_parlai_files(
        cls,
        dict_file: str | os.PathLike | None,
        *,
        dict_tokenizer: str = "gpt2",
        bpe_vocab: str | os.PathLike | None = None,
        bpe_merges: str | os.PathLike | None = None,
        datapath: str | os.PathLike | None = None,
        additional_special_tokens: Sequence[str] = (),
        fp16_pad: bool = True,
        add_prefix_space: bool | None = None,
        require_bpe_order: bool | None = None,
    ) -> ParlaiBpeTokenizer:
        """Loads a dictionary the way ParlAI's DictionaryAgent does.

        ``dict_tokenizer="gpt2"``: ``bpe_vocab`` / ``bpe_merges`` are GPT-2's
        ``encoder.json`` / ``vocab.bpe`` (default ``{datapath}/gpt2/...``, where
        ParlAI looks). ``"bytelevelbpe"``: ``{dict_file}-vocab.json`` /
        ``{dict_file}-merges.txt`` when they exist (ParlAI prefers them), else
        ``bpe_vocab`` / ``bpe_merges``. ``additional_special_tokens`` is the
        agent's ``--special-tok-lst`` (in priority order). ``fp16_pad``: the
        agent ran with ``--fp16`` or ``--force-fp16-tokens``. ``add_prefix_space``
        (bytelevelbpe only; ParlAI's default True). ``require_bpe_order``: raise,
        naming the file and line, when a BPE token's id is not its BPE id + 4
        (default: True for bytelevelbpe, whose ParlAI decoding assumes it;
        False for gpt2, where ParlAI follows ``model.dict`` consistently, as
        this class does; a warning is given then).
        """
        if dict_tokenizer not in ("gpt2", "bytelevelbpe"):
            raise ValueError(f"dict_tokenizer must be 'gpt2' or 'bytelevelbpe', got {dict_tokenizer!r}")
        exists = dict_file is not None and _exists(dict_file)
        if dict_tokenizer == "gpt2":
            if bpe_vocab is None or bpe_merges is None:
                if datapath is None:
                    raise ValueError("gpt2 dictionaries need bpe_vocab and bpe_merges, or datapath")
                bpe_vocab = bpe_vocab or os.path.join(datapath, "gpt2", "encoder.json")
                bpe_merges = bpe_merges or os.path.join(datapath, "gpt2", "vocab.bpe")
            if add_prefix_space:
                raise ValueError("add_prefix_space is not supported for gpt2 dictionaries (BB3 does not use it)")
            prefix = False
        else:
            if exists and _exists(f"{dict_file}-vocab.json"):
                bpe_vocab = f"{dict_file}-vocab.json"
            if exists and _exists(f"{dict_file}-merges.txt"):
                bpe_merges = f"{dict_file}-merges.txt"
            if bpe_vocab is None or bpe_merges is None:
                raise ValueError("bytelevelbpe dictionaries need {dict_file}-vocab.json/-merges.txt or bpe_vocab/bpe_merges")
            prefix = True if add_prefix_space is None else bool(add_prefix_space)
        if require_bpe_order is None:
            require_bpe_order = dict_tokenizer == "bytelevelbpe"

        bpe_file_ids = _read_json_vocab(bpe_vocab)
        if dict_tokenizer == "gpt2":
            merges = read_gpt2_merges(bpe_merges)
            dict_str = {tok: parlai_gpt2_token_string(tok) for tok in bpe_file_ids}
            if len(set(dict_str.values())) != len(dict_str):
                raise ValueError(f"{bpe_vocab}: two tokens share one ParlAI dictionary string")
            sync_order = list(bpe_file_ids)  # JSON key order (bpe.py:755)
        else:
            merges = read_hf_merges(bpe_merges)
            dict_str = {tok: tok for tok in bpe_file_ids}
            if any(t in bpe_file_ids for t in PARLAI_SPECIALS):
                # ParlAI's sync loop would then skip the last HF ids (bpe.py:913).
                raise ValueError(f"{bpe_vocab}: holds ParlAI's special tokens; unsupported layout")
            hf_ids = sorted(bpe_file_ids.values())
            if hf_ids != list(range(len(hf_ids))):
                raise ValueError(f"{bpe_vocab}: ids are not 0..{len(hf_ids) - 1}")
            by_id = {i: t for t, i in bpe_file_ids.items()}
            sync_order = [by_id[i] for i in range(len(hf_ids))]  # HF id order (bpe.py:913-918)

        vocab = _Vocab()
        for tok in PARLAI_SPECIALS:
            vocab.add(tok)
        if exists:
            for tok, _, line in read_parlai_dict(dict_file):
                vocab.add(tok, line)
        n_file = len(vocab)
        for tok in sync_order:
            vocab.add(dict_str[tok])
        appended = vocab.ind2tok[n_file:]
        for tok in additional_special_tokens:
            vocab.add(tok)
        if fp16_pad and len(vocab) % FP16_PAD_SIZE:
            for i in range(FP16_PAD_SIZE - len(vocab) % FP16_PAD_SIZE):
                vocab.add(f"__FP16_PAD_{i}__")

        bpe_ids = {tok: vocab.tok2ind[dict_str[tok]] for tok in bpe_file_ids}
        mismatches = [tok for tok in bpe_file_ids if bpe_ids[tok] != bpe_file_ids[tok] + 4]
        if mismatches:
            # Report the earliest model.dict line involved (tokens not in the file last).
            tok = min(mismatches, key=lambda t: (vocab.line.get(dict_str[t], 1 << 62), bpe_ids[t]))
            got, want = bpe_ids[tok], bpe_file_ids[tok] + 4
            if dict_str[tok] in vocab.line:
                where = f"{dict_file}:{vocab.line[dict_str[tok]]}: token {dict_str[tok]!r} has ParlAI id {got}"
            else:
                where = (
                    f"{dict_file if exists else bpe_vocab}: token {dict_str[tok]!r} is not in a dictionary "
                    f"file; ParlAI gives it id {got} ({bpe_vocab} key order)"
                )
            msg = f"{where}, but {bpe_vocab} gives id {bpe_file_ids[tok]} (+4 = {want}); {len(mismatches)} tokens disagree"
            if require_bpe_order:
                raise ValueError(msg)
            warnings.warn(msg + "; following model.dict as ParlAI does")
        if appended and exists:
            warnings.warn(
                f"{dict_file} lacks {len(appended)} BPE tokens (e.g. {appended[:3]}); ParlAI appends them "
                f"at ids {n_file}.., which a checkpoint trained on this file may not have"
            )
        used = set(bpe_ids.values())
        names = {i: t for i, t in enumerate(vocab.ind2tok) if i not in used}
        return cls(
            dict_tokens=vocab.ind2tok,
            dict_tokenizer=dict_tokenizer,
            ids_match_bpe_plus_4=not mismatches,
            appended_tokens=appended,
            bpe_ids=bpe_ids,
            merges=merges,
            names=names,
            pad_id=PAD_ID,
            start_id=START_ID,
            end_id=END_ID,
            unk_id=UNK_ID,
            vocab_size=len(vocab),
            special_tokens=(list(PARLAI_SPECIALS) + [t for t in additional_special_tokens if t not in PARLAI_SPECIALS])
            if dict_tokenizer == "bytelevelbpe"
            else list(additional_special_tokens),
            special_ids={t: vocab.tok2ind[t] for t in [*PARLAI_SPECIALS, *additional_special_tokens]},
            special_split="hf" if dict_tokenizer == "bytelevelbpe" else "parlai",
            add_prefix_space=prefix,
        )


def _exists(path) -> bool:
    try:
        from etils import epath
    except ImportError:  # pragma: no cover
        return os.path.exists(path)
    return epath.Path(path).exists()


# --- OPT (metaseq) ----------------------------------------------------------------------
class OptGpt2Tokenizer(_ByteLevelBpeBase):
    """GPT-2 BPE with OPT's fairseq ids (BB3-30B / 175B).

    pad 1, bos = eos = 2 (``</s>``; ``start_id == end_id == 2``), unk 3, ``<s>``
    (0) unused; ``vocab_size`` 50272 for the real files (the id range rounded
    up to a multiple of 8, as the embedding is). ``encode`` adds no bos and
    never parses ``</s>`` in text (metaseq); ``encode_prompt`` prepends 2 as
    HF's OPT tokenizer (``add_bos_token=True``) and metaseq do.
    """

    @classmethod
    def from_hf_files(
        cls,
        vocab_json: str | os.PathLike,
        merges_txt: str | os.PathLike,
        *,
        vocab_size: int | None = None,
    ) -> OptGpt2Tokenizer:
        """HF ``facebook/opt-*`` files: ``vocab.json`` already maps tokens to OPT ids."""
        return cls._from_opt_vocab(_read_json_vocab(vocab_json), read_hf_merges(merges_txt), vocab_size, vocab_json)

    @classmethod
    def from_hf_tokenizer_json(cls, tokenizer_json: str | os.PathLike, *,
                               vocab_size: int | None = None) -> OptGpt2Tokenizer:
        """A transformers ``tokenizer.json`` (what ``save_pretrained`` writes since transformers 5):
        its byte-level BPE model's vocabulary (OPT ids) and merges."""
        spec = json.loads(_read_bytes(tokenizer_json).decode("utf-8"))
        model = spec.get("model") or {}
        pre = spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
            raise ValueError(f"{tokenizer_json}: not a GPT-2 byte-level BPE without prefix space (OPT's)")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        return cls._from_opt_vocab(dict(model.get("vocab", {})), merges, vocab_size, tokenizer_json)

    @classmethod
    def _from_opt_vocab(cls, vocab, merges, vocab_size, where) -> OptGpt2Tokenizer:
        for i, name in enumerate(OPT_SPECIALS):
            if vocab.get(name) != i:
                raise ValueError(f"{where}: expected {name!r} at id {i}, got {vocab.get(name)}")
        bpe_ids = {t: i for t, i in vocab.items() if t not in OPT_SPECIALS}
        names = {i: t for i, t in enumerate(OPT_SPECIALS)}
        return cls._make(bpe_ids, merges, names, vocab_size)

    @classmethod
    def from_metaseq_files(
        cls,
        gpt2_vocab_json: str | os.PathLike,
        gpt2_merges_txt: str | os.PathLike,
        dict_txt: str | os.PathLike,
        *,
        vocab_size: int | None = None,
    ) -> OptGpt2Tokenizer:
        """metaseq files: GPT-2's vocab/merges plus fairseq ``dict.txt``, whose
        line k (``<gpt2 id> <count>``) is OPT id 4 + k (fairseq Dictionary:
        ``<s> <pad> </s> <unk>`` first). Non-numeric symbols (``madeupword0000``)
        keep their names."""
        gpt2 = _read_json_vocab(gpt2_vocab_json)
        symbols = list(OPT_SPECIALS)
        index = {s: i for i, s in enumerate(symbols)}
        for lineno, line in enumerate(_read_text_lines(dict_txt), 1):
            line = line.rstrip()
            if not line:
                continue
            word, sep, count = line.rpartition(" ")
            overwrite = count == "#fairseq:overwrite"
            if overwrite:
                word, sep, count = word.rpartition(" ")
            if not sep:
                raise ValueError(f"{dict_txt}:{lineno}: expected '<symbol> <count>', got {line!r}")
            if word in index and not overwrite:
                raise ValueError(f"{dict_txt}:{lineno}: duplicate symbol {word!r}")
            index[word] = len(symbols)
            symbols.append(word)
        missing = [tok for tok, gid in gpt2.items() if str(gid) not in index]
        if missing:
            raise ValueError(f"{dict_txt} lacks the GPT-2 ids of {len(missing)} tokens (e.g. {missing[:3]})")
        bpe_ids = {tok: index[str(gid)] for tok, gid in gpt2.items()}
        used = set(bpe_ids.values())
        names = {i: s for i, s in enumerate(symbols) if i not in used}
        return cls._make(bpe_ids, read_hf_merges(gpt2_merges_txt), names, vocab_size)

    @classmethod
    def _make(cls, bpe_ids, merges, names, vocab_size):
        top = max([*bpe_ids.values(), *names]) + 1
        if vocab_size is None:
            vocab_size = -(-top // FP16_PAD_SIZE) * FP16_PAD_SIZE
        if vocab_size < top:
            raise ValueError(f"vocab_size {vocab_size} < {top} ids in use")
        return cls(
            bpe_ids=bpe_ids,
            merges=merges,
            names=names,
            pad_id=OPT_PAD_ID,
            start_id=OPT_EOS_ID,
            end_id=OPT_EOS_ID,
            unk_id=OPT_UNK_ID,
            vocab_size=vocab_size,
        )

    def save_hf_files(self, directory: str | os.PathLike) -> list[str]:
        """transformers' OPT tokenizer files for exactly these ids: ``vocab.json`` (token -> OPT
        id), ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json`` as the
        ``facebook/opt-*`` repositories have them (GPT2Tokenizer, ``</s>`` prepended)."""
        st = self._state
        vocab = dict(st["bpe_ids"])
        for i, name in sorted((int(i), n) for i, n in st["names"].items()):
            vocab.setdefault(name, i)
        os.makedirs(directory, exist_ok=True)
        files = {
            "vocab.json": json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in st["merges"]),
            "special_tokens_map.json": json.dumps({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
                                                   "pad_token": "<pad>"}),
            "tokenizer_config.json": json.dumps({
                "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
                "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
                "errors": "replace", "model_max_length": 1000000000000000019884624838656}),
        }
        paths = []
        for name, text in files.items():
            path = os.path.join(directory, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            paths.append(path)
        return paths

    @property
    def bos_id(self) -> int:
        return OPT_EOS_ID

    @property
    def eos_id(self) -> int:
        return OPT_EOS_ID

    def encode_prompt(self, text: str) -> list[int]:
        """``[</s>] + encode(text)``: HF OPT tokenizer / metaseq prompt framing."""
        return [OPT_EOS_ID] + self.encode(text)


# --- ParlAI framing helpers -----------------------------------------------------------
def encode_contexts_exact(
    contexts: Sequence[str | bytes],
    tokenizer,
    text_truncate: int | None,
    *,
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
) -> list[list[int]]:
    """Left-truncated context ids for any project tokenizer.

    Tokenizers that keep the delimiter contract (``turnwise_exact`` absent or
    True, e.g. SentencePiece) go through ``tokenizer.py``'s turn-wise fast path;
    whole-string BPE tokenizers through their own exact ``encode_contexts``.
    Both equal ``encode(context)[-text_truncate:]`` (ParlAI: txt2vec, then
    keep the last tokens).
    """
    if getattr(tokenizer, "turnwise_exact", True):
        return encode_contexts(contexts, tokenizer, text_truncate, chars_per_token=chars_per_token)
    return tokenizer.encode_contexts(contexts, text_truncate, chars_per_token=chars_per_token)


def parlai_history_vec(
    entries: Sequence[str],
    tokenizer,
    *,
    global_end_token: bool = False,
) -> list[int]:
    """ParlAI's ``History.get_history_vec`` for SEPARATE history entries
    (multi-message episodes): each entry encoded on its own, joined with
    ``encode("\\n")``, optionally followed by ``__end__``
    (``--history-add-global-end-token end``), torch_agent.py:381-403."""
    ids: list[int] = []
    for k, vec in enumerate(tokenizer.encode_batch(list(entries))):
        if k:
            ids += list(tokenizer.delimiter_ids)
        ids += vec
    if global_end_token:
        ids.append(tokenizer.end_id)
    return ids


def parlai_label_vec(label_ids: Sequence[int], end_id: int, label_truncate: int | None) -> list[int]:
    """ParlAI label framing: ``ids + [end]`` truncated from the RIGHT, so a
    truncated label loses its end token (torch_agent.py:1385-1413)."""
    vec = list(label_ids) + [end_id]
    return vec if label_truncate is None else vec[:label_truncate]


def bart_encoder_input(context_ids: Sequence[int], start_id: int, end_id: int, text_truncate: int | None) -> list[int]:
    """BB3-3B (ParlAI ``bart`` agent) encoder input: the left-truncated context
    cut again to ``text_truncate - 2`` tokens, wrapped as
    ``[__start__] + ctx + [__end__]`` (parlai/agents/bart/bart.py:151-173)."""
    ids = list(context_ids)
    if text_truncate is not None:
        keep = text_truncate - 2
        ids = ids[-keep:] if keep > 0 else []
    return [start_id] + ids + [end_id]
