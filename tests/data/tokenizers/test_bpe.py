"""Tests of the GPT-2 byte-level BPE tokenizers (ParlAI dictionaries, OPT).

Everything runs on a small byte-level BPE trained here with ``tokenizers``; no
network, no downloaded vocabulary. The comparisons with ParlAI itself are marked
``parlai`` (tests/conftest.py: they fail when ParlAI 1.7.2 is missing).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings

import numpy as np
import pytest
from tokenizers import ByteLevelBPETokenizer, pre_tokenizers

from bb3x_jax.data.tokenizers import bpe
from bb3x_jax.data.tokenizers.base import Tokenizer
from bb3x_jax.data.tokenizers.bpe import (
    OptGpt2Tokenizer,
    ParlaiBpeTokenizer,
    bart_encoder_input,
    encode_contexts_exact,
    parlai_history_vec,
    parlai_label_vec,
    read_parlai_dict,
    write_parlai_dict,
)

# Text that stresses byte-level BPE: whitespace runs next to newlines (where
# whole-string and turn-wise encoding differ), CR, U+2028, NBSP, leading
# spaces, contractions, digits, scripts and emoji.
TEXTS = [
    "",
    " ",
    "\n",
    "\n\n",
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   spaces\tand tabs",
    "line one\nline two",
    "para\n\nnext para",
    "ends with newline\n",
    "\nstarts with newline",
    "space before \nnewline",
    "space before \n\nblank",
    "newline\n then space",
    "newline\n\tthen tab",
    "mixed \n\n\n  \t\n end",
    "crlf\r\nline and lone\rcr",
    "line\u2028separator and para\u2029graph",
    "nbsp\xa0here, ideographic\u3000space, nel\x85x",
    "NUL \x00 DEL \x7f BEL \x07",
    "café naïve façade Ünïcödé",
    "日本語のテキスト, 中文, 한국어, русский, العربية",
    "emoji 😀🎉 👍🏽 zwj 👩\u200d💻 flag 🇺🇸 combining e\u0301",
    "it's we're they'll I'd you've CAN'T",
    "numbers 12345 and 3.14159, 1,000,000",
    "punct!!! ??? ... --- ((()))",
    "back\\slash \\n \\xc4 literal escapes",
    "__start__ and __end__ and __null__ as text",
    "a" * 40,
]
NO_SPECIAL_NAMES = [t for t in TEXTS if "__" not in t]


def _corpus(seed: int = 0) -> str:
    """~20 KB of text with many newline/space patterns so merges like "ĊĊ",
    "ĠĊ", "ĠĠ" exist in the vocabulary."""
    rng = random.Random(seed)
    syllables = ["ba", "ke", "lo", "mi", "nu", "ra", "te", "shi", "an", "or", "en", "th", "ing", "é", "ü"]
    words = ["hello", "world", "the", "a", "is", "para", "line", "space", "newline", "it's", "we're",
             "café", "naïve", "日本語", "😀", "123", "3.14", "!!!", "...", "I", "you", "BlenderBot"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    seps = [" ", " ", " ", " ", "  ", "\n", "\n\n", "\n\n\n", "\n ", " \n\n", "\t", "\r\n", "\u2028", "\xa0"]
    out = []
    for _ in range(4000):
        out.append(rng.choice(words))
        out.append(rng.choice(seps))
    return "".join(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained byte-level BPE written as GPT-2 files (datapath/gpt2/encoder.json,
    vocab.bpe), as HF files (vocab.json, merges.txt) and as ParlAI model.dict."""
    root = tmp_path_factory.mktemp("bpe")
    trainer = ByteLevelBPETokenizer(add_prefix_space=False)
    trainer.train_from_iterator(
        [_corpus()], vocab_size=501, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    hf = root / "hf"
    hf.mkdir()
    trainer.save_model(str(hf))
    assert trainer.get_vocab_size() == 501  # 505 with ParlAI's specials: FP16 padding adds 3
    gpt2 = root / "data" / "gpt2"
    gpt2.mkdir(parents=True)
    shutil.copy(hf / "vocab.json", gpt2 / "encoder.json")
    shutil.copy(hf / "merges.txt", gpt2 / "vocab.bpe")
    tokens, counts = bpe.parlai_gpt2_dict_tokens(gpt2 / "encoder.json", fp16_pad=True)
    write_parlai_dict(root / "model.dict", tokens, counts)
    vocab = json.loads((hf / "vocab.json").read_text(encoding="utf-8"))
    return {
        "root": root,
        "datapath": root / "data",
        "encoder": gpt2 / "encoder.json",
        "vocab_bpe": gpt2 / "vocab.bpe",
        "hf_vocab": hf / "vocab.json",
        "hf_merges": hf / "merges.txt",
        "dict": root / "model.dict",
        "vocab": vocab,
    }


@pytest.fixture(scope="module")
def gpt2_tok(files):
    return ParlaiBpeTokenizer.from_parlai_files(files["dict"], dict_tokenizer="gpt2", datapath=files["datapath"])


@pytest.fixture(scope="module")
def blbpe_files(files, tmp_path_factory):
    """A ParlAI bytelevelbpe dictionary: model.dict + model.dict-vocab.json/-merges.txt,
    ids = HF id + 4, raw byte-level strings, FP16 padding."""
    root = tmp_path_factory.mktemp("blbpe")
    shutil.copy(files["hf_vocab"], root / "model.dict-vocab.json")
    shutil.copy(files["hf_merges"], root / "model.dict-merges.txt")
    by_id = sorted(files["vocab"], key=files["vocab"].get)
    tokens = list(bpe.PARLAI_SPECIALS) + by_id
    tokens += [f"__FP16_PAD_{i}__" for i in range(-len(tokens) % 8)]
    write_parlai_dict(root / "model.dict", tokens)
    return root / "model.dict"


@pytest.fixture(scope="module")
def blbpe_tok(blbpe_files):
    return ParlaiBpeTokenizer.from_parlai_files(blbpe_files, dict_tokenizer="bytelevelbpe")


def _parlai_dict(args):
    """ParlAI's own DictionaryAgent for these command-line arguments (tests marked ``parlai``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from parlai.core.dict import DictionaryAgent
        from parlai.core.params import ParlaiParser
    parser = ParlaiParser(True, True)
    DictionaryAgent.add_cmdline_args(parser)
    return DictionaryAgent(parser.parse_args([str(a) for a in args]))


# --- reference implementations written for the tests ----------------------------------
def _reference_gpt2_ids(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """GPT-2's BPE from its definition (regex pieces; repeatedly merge every
    occurrence of the lowest-rank pair, left to right), independent of tokenizers."""
    import regex
    ranks = {m: r for r, m in enumerate(merges)}
    byte_char = bpe.byte_to_unicode()
    ids = []
    for piece in regex.findall(bpe.GPT2_PATTERN, text):
        word = [byte_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            rank, pair = min((ranks.get(p, float("inf")), p) for p in zip(word, word[1:]))
            if rank == float("inf"):
                break
            merged, k = [], 0
            while k < len(word):
                if k + 1 < len(word) and (word[k], word[k + 1]) == pair:
                    merged.append(word[k] + word[k + 1])
                    k += 2
                else:
                    merged.append(word[k])
                    k += 1
            word = merged
        ids += [vocab[w] for w in word]
    return ids


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    atoms = ["hello", "world", "it's", "日本語", "😀", "12", "!!", " ", "  ", "\n", "\n\n", " \n", "\n ",
             "\t", "\r\n", "\u2028", "\xa0", "para", "__end__", "__knowledge__", "x"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 60))) for _ in range(n)]


# --- gpt2 dictionaries ----------------------------------------------------------------
def test_gpt2_ids_are_transformers_gpt2_ids_plus_4(files, gpt2_tok):
    """gpt2 dictionary ids equal transformers' GPT2Tokenizer ids on the same files, plus 4."""
    from transformers import GPT2Tokenizer

    ref = GPT2Tokenizer(vocab=str(files["encoder"]), merges=str(files["vocab_bpe"]))
    for text in TEXTS:
        want = [i + 4 for i in ref(text, add_special_tokens=False)["input_ids"]]
        assert gpt2_tok.encode(text) == want, repr(text)
    assert gpt2_tok.encode_batch(TEXTS) == [gpt2_tok.encode(t) for t in TEXTS]
    arrays = gpt2_tok.encode_batch_numpy(TEXTS)
    assert all(a.dtype == np.int32 and a.tolist() == gpt2_tok.encode(t) for a, t in zip(arrays, TEXTS))


def test_gpt2_matches_reference_bpe_algorithm(files, gpt2_tok):
    """tokenizers' BPE equals GPT-2's BPE as defined (regex pieces + rank merges), on random text."""
    merges = bpe.read_gpt2_merges(files["vocab_bpe"])
    for text in TEXTS + _random_texts(200, seed=1):
        want = [i + 4 for i in _reference_gpt2_ids(text, files["vocab"], merges)]
        assert gpt2_tok.encode(text) == want, repr(text)


def test_dictionary_layout_and_specials(files, gpt2_tok):
    """Ids 0-3 are ParlAI's specials, the vocab is FP16-padded, and the tokenizer fits the Protocol."""
    assert isinstance(gpt2_tok, Tokenizer)
    assert (gpt2_tok.pad_id, gpt2_tok.start_id, gpt2_tok.end_id, gpt2_tok.unk_id) == (0, 1, 2, 3)
    n = len(files["vocab"]) + 4
    assert gpt2_tok.vocab_size == -(-n // 8) * 8 and gpt2_tok.vocab_size % 8 == 0
    assert gpt2_tok.dict_tokens[:4] == ["__null__", "__start__", "__end__", "__unk__"]
    assert gpt2_tok.dict_tokens[n:] == [f"__FP16_PAD_{i}__" for i in range(gpt2_tok.vocab_size - n)]
    assert gpt2_tok.ids_match_bpe_plus_4 and not gpt2_tok.appended_tokens
    # Dictionary strings: UTF-8 bytes > 127 written as \xNN (Ġ = U+0120 = c4 a0).
    assert bpe.parlai_gpt2_token_string("Ġthe") == "\\xc4\\xa0the"
    the = next(t for t in files["vocab"] if t.startswith("Ġ") and len(t) > 2)
    assert gpt2_tok.token_to_id(bpe.parlai_gpt2_token_string(the)) == files["vocab"][the] + 4
    assert gpt2_tok.delimiter_ids == (files["vocab"]["Ċ"] + 4,)
    # Special names are plain text to a gpt2 dictionary (no special parsing).
    assert 2 not in gpt2_tok.encode("__end__")


def test_decode_round_trips_and_names_specials(gpt2_tok, blbpe_tok):
    """decode(encode(t)) == t byte for byte; specials decode to names, pad is skipped."""
    for tok in (gpt2_tok, blbpe_tok):
        for text in TEXTS + _random_texts(50, seed=2):
            if tok is blbpe_tok and ("__" in text or text.startswith(" ")):
                continue  # specials are parsed; " x" and "x" share ids (prefix space only when absent)
            assert tok.decode(tok.encode(text)) == text, repr(text)
    assert blbpe_tok.encode(" x") == blbpe_tok.encode("x") and blbpe_tok.decode(blbpe_tok.encode("  x")) == " x"
    hi = gpt2_tok.encode("hi")
    assert gpt2_tok.decode([0, 1] + hi + [2, 3, 0]) == "__start__hi__end____unk__"
    assert gpt2_tok.decode([gpt2_tok.vocab_size - 1]).startswith("__FP16_PAD_")
    assert gpt2_tok.decode(np.array(hi, dtype=np.int32)) == "hi"
    with pytest.raises(ValueError):
        gpt2_tok.decode([gpt2_tok.vocab_size + 5])
    # A split multi-byte character decodes with U+FFFD, as ParlAI (errors="replace").
    emoji = gpt2_tok.encode("🦜")  # not in the corpus: 4 byte tokens
    assert len(emoji) > 1 and "\ufffd" in gpt2_tok.decode(emoji[:1])


def test_additional_special_tokens_split_in_priority_order(files):
    """--special-tok-lst tokens are split out first-listed-first (ParlAI BPEHelper.encode)."""
    specials = ["OHB", "BOY", "__knowledge__"]
    tok = ParlaiBpeTokenizer.from_parlai_files(
        files["dict"], datapath=files["datapath"], additional_special_tokens=specials
    )
    ids = {s: tok.token_to_id(s) for s in specials}
    n_file = len(read_parlai_dict(files["dict"]))  # already FP16-padded
    assert [ids[s] for s in specials] == [n_file, n_file + 1, n_file + 2]
    # ParlAI's quirk, kept: the pad names __FP16_PAD_0..4__ exist already, so nothing is added.
    assert tok.vocab_size == n_file + 3 and tok.vocab_size % 8 != 0
    assert tok.encode("OHBOY") == [ids["OHB"]] + tok.encode("OY")
    assert tok.encode("a __knowledge__ b") == tok.encode("a ") + [ids["__knowledge__"]] + tok.encode(" b")
    assert tok.decode(tok.encode("x __knowledge__ y")) == "x __knowledge__ y"


# --- model.dict is the authority ----------------------------------------------------------
def _swap_lines(src, dst, a: int, b: int):
    lines = open(src, encoding="utf-8").read().splitlines(keepends=True)
    lines[a], lines[b] = lines[b], lines[a]
    open(dst, "w", encoding="utf-8").writelines(lines)


def test_dict_order_disagreeing_with_bpe_file(files, tmp_path):
    """A model.dict whose order is not encoder.json + 4 is followed (as ParlAI) with a
    warning, and rejected with file and line when required."""
    bad = tmp_path / "model.dict"
    _swap_lines(files["dict"], bad, 10, 20)  # lines 11 and 21 = ids 10 and 20
    with pytest.warns(UserWarning, match="model.dict:11"):
        tok = ParlaiBpeTokenizer.from_parlai_files(bad, datapath=files["datapath"])
    assert not tok.ids_match_bpe_plus_4
    entries = read_parlai_dict(bad)
    assert tok.token_to_id(entries[10][0]) == 10 and tok.token_to_id(entries[20][0]) == 20
    gpt2_id_6 = next(t for t, i in files["vocab"].items() if i == 6)
    assert tok.id_to_token(20) == gpt2_id_6 and tok.id_to_token(10) != gpt2_id_6  # line 21 holds it now
    with pytest.raises(ValueError, match=r"model\.dict:11: token .* has ParlAI id 10.*encoder\.json"):
        ParlaiBpeTokenizer.from_parlai_files(bad, datapath=files["datapath"], require_bpe_order=True)


def test_dict_missing_bpe_tokens_are_appended(files, tmp_path):
    """BPE tokens missing from model.dict get ids after the file's tokens (ParlAI's sync_with_dict)."""
    lines = open(files["dict"], encoding="utf-8").read().splitlines(keepends=True)
    n = 4 + len(files["vocab"])
    short = tmp_path / "model.dict"
    open(short, "w", encoding="utf-8").writelines(lines[:7] + lines[8:n])  # drop id 7, no FP16 pads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = ParlaiBpeTokenizer.from_parlai_files(short, datapath=files["datapath"])
    messages = [str(w.message) for w in caught]
    assert any("lacks 1 BPE tokens" in m for m in messages)
    assert any("model.dict:8: token" in m for m in messages)  # ids after the gap shift down
    dropped = read_parlai_dict(files["dict"])[7][0]
    assert tok.appended_tokens == [dropped] and tok.token_to_id(dropped) == n - 1
    assert tok.vocab_size == -(-n // 8) * 8


def test_bytelevelbpe_order_mismatch_is_an_error(blbpe_files, tmp_path):
    """bytelevelbpe dicts must be HF id + 4 (ParlAI's vec2txt assumes it): clear error with file:line."""
    d = tmp_path / "model.dict"
    _swap_lines(blbpe_files, d, 12, 30)
    for suffix in ("-vocab.json", "-merges.txt"):
        shutil.copy(f"{blbpe_files}{suffix}", f"{d}{suffix}")
    with pytest.raises(ValueError, match=r"model\.dict:13: .*model\.dict-vocab\.json"):
        ParlaiBpeTokenizer.from_parlai_files(d, dict_tokenizer="bytelevelbpe")


def test_bytelevelbpe_mode(blbpe_tok, files):
    """bytelevelbpe: prefix space, HF ids + 4, specials parsed in text, delimiter = encode("\\n")."""
    from transformers import GPT2Tokenizer

    ref = GPT2Tokenizer(vocab=str(files["hf_vocab"]), merges=str(files["hf_merges"]), add_prefix_space=True)
    for text in NO_SPECIAL_NAMES:
        want = [i + 4 for i in ref(text, add_special_tokens=False)["input_ids"]]
        assert blbpe_tok.encode(text) == want, repr(text)
    assert blbpe_tok.encode("a __end__ b") == blbpe_tok.encode("a ") + [2] + blbpe_tok.encode(" b")
    assert blbpe_tok.delimiter_ids == tuple(blbpe_tok.encode("\n"))
    assert blbpe_tok.vocab_size % 8 == 0


# --- ParlAI itself ------------------------------------------------------------------------
@pytest.mark.parlai
def test_matches_parlai_gpt2_dictionary_agent(files, gpt2_tok, tmp_path):
    """ids, vocabulary and vec2txt equal ParlAI's DictionaryAgent (dict_tokenizer gpt2)."""
    agent = _parlai_dict(["--dict-tokenizer", "gpt2", "--datapath", files["datapath"], "--dict-file", files["dict"]])
    assert len(agent) == gpt2_tok.vocab_size
    assert [agent.ind2tok[i] for i in range(len(agent))] == gpt2_tok.dict_tokens
    for text in TEXTS + _random_texts(100, seed=3):
        vec = agent.txt2vec(text)
        assert gpt2_tok.encode(text) == vec, repr(text)
        assert gpt2_tok.decode(vec) == agent.vec2txt(vec) == text, repr(text)
    # ParlAI's own saved dictionary (no dict file: built from encoder.json) is byte-identical
    # to the one written here (FP16 padding is the agent's, so compare without it).
    fresh = _parlai_dict(["--dict-tokenizer", "gpt2", "--datapath", files["datapath"]])
    fresh.save(str(tmp_path / "parlai.dict"))
    tokens, counts = bpe.parlai_gpt2_dict_tokens(files["encoder"], fp16_pad=False)
    write_parlai_dict(tmp_path / "ours.dict", tokens, counts)
    assert (tmp_path / "parlai.dict").read_bytes() == (tmp_path / "ours.dict").read_bytes()
    # The ParlAI History delimiter is txt2vec("\n").
    assert tuple(agent.txt2vec("\n")) == gpt2_tok.delimiter_ids


@pytest.mark.parlai
def test_matches_parlai_special_tokens_and_reordered_dict(files, tmp_path):
    """ParlAI agreement with --special-tok-lst tokens and with a dict that is not encoder.json + 4."""
    bad = tmp_path / "model.dict"
    _swap_lines(files["dict"], bad, 10, 20)
    specials = ["__knowledge__", "__endknowledge__", "OHB", "BOY"]
    agent = _parlai_dict(["--dict-tokenizer", "gpt2", "--datapath", files["datapath"], "--dict-file", bad])
    agent.add_additional_special_tokens(specials)
    with pytest.warns(UserWarning):
        tok = ParlaiBpeTokenizer.from_parlai_files(
            bad, datapath=files["datapath"], additional_special_tokens=specials, fp16_pad=False
        )
    assert [agent.ind2tok[i] for i in range(len(agent))] == tok.dict_tokens
    for text in TEXTS + _random_texts(50, seed=4) + ["OHBOY", "x __knowledge__ fact __endknowledge__\n y"]:
        vec = agent.txt2vec(text)
        assert tok.encode(text) == vec, repr(text)
        assert tok.decode(vec) == agent.vec2txt(vec), repr(text)


@pytest.mark.parlai
def test_matches_parlai_bytelevelbpe_dictionary_agent(blbpe_files, blbpe_tok):
    """ids equal ParlAI's DictionaryAgent with dict_tokenizer bytelevelbpe; vec2txt agrees
    except that ParlAI strips every leading space (and asserts on a leading special)."""
    agent = _parlai_dict(["--dict-tokenizer", "bytelevelbpe", "--dict-file", blbpe_files])
    assert [agent.ind2tok[i] for i in range(len(agent))] == blbpe_tok.dict_tokens
    for text in TEXTS + _random_texts(100, seed=5):
        vec = agent.txt2vec(text)
        assert blbpe_tok.encode(text) == vec, repr(text)
        if text and not text.startswith(" ") and not text.startswith("__"):
            assert blbpe_tok.decode(vec) == agent.vec2txt(vec), repr(text)
    assert agent.vec2txt(agent.txt2vec("  lead")) == "lead"  # ParlAI strips all leading spaces...
    assert blbpe_tok.decode(blbpe_tok.encode("  lead")) == " lead"  # ...this class the prefix one


# --- whole-string encoding and exact left truncation ---------------------------------
def test_whole_string_encoding_differs_from_turnwise(gpt2_tok, files):
    """encode() is whole-string (ParlAI txt2vec), so the turn-wise delimiter contract does not hold."""
    assert gpt2_tok.turnwise_exact is False
    v = {k: i + 4 for k, i in files["vocab"].items()}
    assert "ĊĊ" in v and "ĠĊ" in v  # the corpus makes these merges
    nl = list(gpt2_tok.delimiter_ids)

    def turnwise(text):
        return sum((nl + gpt2_tok.encode(t) for t in text.split("\n")), [])[len(nl):]

    a, b = gpt2_tok.encode("a"), gpt2_tok.encode("b")
    # The regex splits "a\n\nb" as a|\n|\n|b (turn-wise exact) but "a\n\n\nb" as a|\n\n|\n|b
    # and "a \n\nb" as a| \n|\n|b, whose first pieces are single tokens.
    assert gpt2_tok.encode("a\n\nb") == turnwise("a\n\nb") == a + nl + nl + b
    assert gpt2_tok.encode("a\n\n\nb") == a + [v["ĊĊ"]] + nl + b != turnwise("a\n\n\nb")
    assert gpt2_tok.encode("a \n\nb") == a + [v["ĠĊ"]] + nl + b != turnwise("a \n\nb")
    assert gpt2_tok.encode("a\n\n") == a + [v["ĊĊ"]] != turnwise("a\n\n")
    assert gpt2_tok.is_exact_cut("a\nb", 1) and gpt2_tok.is_exact_cut("a\n\nb", 1)
    assert not gpt2_tok.is_exact_cut("a\n\n\nb", 1) and gpt2_tok.is_exact_cut("a\n\n\nb", 3)
    assert not gpt2_tok.is_exact_cut("a \n\nb", 2) and not gpt2_tok.is_exact_cut("a\n\n", 2)


@pytest.mark.parametrize("which", ["gpt2", "bytelevelbpe"])
def test_exact_cuts_split_the_encoding(which, gpt2_tok, blbpe_tok):
    """Every newline is_exact_cut accepts splits whole-string encoding exactly; most plain turns qualify."""
    tok = gpt2_tok if which == "gpt2" else blbpe_tok
    nl = list(tok._newline_ids)
    accepted = 0
    for text in TEXTS + _random_texts(300, seed=6):
        full = tok.encode(text)
        for i, ch in enumerate(text):
            if ch == "\n" and tok.is_exact_cut(text, i):
                accepted += 1
                head = tok.encode(text[:i])
                tail = tok._encode_batch([text[i + 1 :]], continuation=True)[0]
                assert full == head + nl + tail, (text, i)
    assert accepted > 200
    assert tok.is_exact_cut("hello there\nhow are you\nfine", 11)


@pytest.mark.parametrize("which", ["gpt2", "bytelevelbpe", "opt"])
def test_encode_contexts_equals_left_truncated_whole_encoding(which, gpt2_tok, blbpe_tok, files):
    """encode_contexts(c, T) == encode(c)[-T:] while encoding only the tail (ParlAI left truncation)."""
    tok = {"gpt2": gpt2_tok, "bytelevelbpe": blbpe_tok, "opt": _opt_from_hf(files)[0]}[which]
    rng = random.Random(7)
    contexts = ["\n".join(rng.choice(TEXTS + _random_texts(20, seed=8)) for _ in range(rng.randint(1, 25)))
                for _ in range(60)]
    contexts += TEXTS
    for T in (None, 0, 1, 3, 16, 64, 100000):
        got = tok.encode_contexts(contexts, T, chars_per_token=1.0)
        want = [tok.encode(c) if T is None else (tok.encode(c)[-T:] if T > 0 else []) for c in contexts]
        assert got == want, T
        assert encode_contexts_exact([c.encode("utf-8") for c in contexts], tok, T) == want


def test_whitespace_set_is_the_pretokenizer_whitespace():
    """WHITESPACE (used by is_exact_cut) is exactly what tokenizers' GPT-2 regex treats as \\s."""
    pt = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    candidates = {chr(c) for c in range(0x3001)} | {"\u180e", "\u200b", "\u2060", "\ufeff", "\U0001f600"}
    for ch in candidates:
        if ch == " ":
            continue
        offsets = [o for _, o in pt.pre_tokenize_str("a" + ch + ch + "b")]
        is_ws = offsets == [(0, 1), (1, 2), (2, 3), (3, 4)]  # "a", ch, ch, "b"
        assert is_ws == (ch in bpe.WHITESPACE), hex(ord(ch))
    assert " " in bpe.WHITESPACE


# --- OPT ---------------------------------------------------------------------------------------
def _opt_from_hf(files):
    """HF-style OPT files: specials 0-3, then the BPE tokens in a shuffled order
    (OPT ids are a permutation of GPT-2 ids), plus the same data as metaseq files."""
    root = files["root"] / "opt"
    if not (root / "vocab.json").exists():
        root.mkdir(exist_ok=True)
        toks = sorted(files["vocab"], key=files["vocab"].get)
        order = list(range(len(toks)))
        random.Random(0).shuffle(order)
        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for k, j in enumerate(order):
            vocab[toks[j]] = 4 + k
        (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        shutil.copy(files["hf_merges"], root / "merges.txt")
        # metaseq: GPT-2 files + dict.txt listing GPT-2 ids in OPT order.
        dict_lines = [f"{files['vocab'][toks[j]]} {1000 - k}\n" for k, j in enumerate(order)]
        dict_lines += ["madeupword0000 0\n", "madeupword0001 0\n"]
        (root / "dict.txt").write_text("".join(dict_lines), encoding="utf-8")
    return OptGpt2Tokenizer.from_hf_files(root / "vocab.json", root / "merges.txt"), root


def test_opt_matches_transformers_opt_tokenizer(files):
    """OPT ids equal transformers' GPT2Tokenizer with OPT's settings (bos </s> = 2 prepended, pad 1)."""
    from transformers import GPT2Tokenizer

    opt, root = _opt_from_hf(files)
    ref = GPT2Tokenizer(
        vocab=str(root / "vocab.json"),
        merges=str(root / "merges.txt"),
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_prefix_space=False,
    )
    assert (ref.pad_token_id, ref.bos_token_id, ref.eos_token_id) == (1, 2, 2)
    assert (opt.pad_id, opt.start_id, opt.end_id, opt.unk_id, opt.bos_id) == (1, 2, 2, 3, 2)
    for text in TEXTS:
        assert opt.encode_prompt(text) == ref(text)["input_ids"], repr(text)
        assert opt.decode(opt.encode(text)) == text
    assert opt.vocab_size % 8 == 0 and opt.vocab_size >= len(files["vocab"]) + 4
    assert opt.encode("</s>") != [2]  # metaseq: no special parsing in text (HF would give [2])
    assert opt.decode([2] + opt.encode("hi") + [1, 1]) == "</s>hi"
    # metaseq's files (GPT-2 vocab + dict.txt) give the same ids.
    meta = OptGpt2Tokenizer.from_metaseq_files(files["hf_vocab"], files["hf_merges"], root / "dict.txt")
    assert meta.encode_batch(TEXTS) == opt.encode_batch(TEXTS)
    assert meta.decode([4 + len(files["vocab"])]) == "madeupword0000"


# --- framing helpers, pickling ------------------------------------------------------------------
def test_framing_helpers(gpt2_tok):
    """ParlAI label, BART encoder and multi-entry history framing."""
    ids = gpt2_tok.encode("a reply that is long enough")
    assert parlai_label_vec(ids, 2, None) == ids + [2]
    assert parlai_label_vec(ids, 2, 3) == ids[:3]  # ParlAI drops __end__ when it truncates
    ctx = list(range(10, 30))
    assert bart_encoder_input(ctx, 1, 2, 8) == [1] + ctx[-6:] + [2]
    assert bart_encoder_input(ctx, 1, 2, None) == [1] + ctx + [2]
    hist = parlai_history_vec(["hi there", "\nhello"], gpt2_tok, global_end_token=True)
    assert hist == gpt2_tok.encode("hi there") + list(gpt2_tok.delimiter_ids) + gpt2_tok.encode("\nhello") + [2]


def test_pickle_round_trip(gpt2_tok, blbpe_tok, files):
    """Tokenizers survive pickling (worker processes) with identical behaviour."""
    opt = _opt_from_hf(files)[0]
    for tok in (gpt2_tok, blbpe_tok, opt):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
        assert clone.vocab_size == tok.vocab_size and clone.delimiter_ids == tok.delimiter_ids


def test_bad_files_are_rejected(files, tmp_path):
    """Missing '#version' header, incomplete byte alphabet and missing paths raise clear errors."""
    no_header = tmp_path / "vocab.bpe"
    no_header.write_text("".join(open(files["vocab_bpe"], encoding="utf-8").readlines()[1:]), encoding="utf-8")
    with pytest.raises(ValueError, match="#version"):
        bpe.read_gpt2_merges(no_header)
    small = {k: v for k, v in files["vocab"].items() if k != "Ċ"}
    (tmp_path / "encoder.json").write_text(json.dumps(small), encoding="utf-8")
    with pytest.raises(ValueError, match="byte-level symbols"), pytest.warns(UserWarning, match="key order"):
        ParlaiBpeTokenizer.from_parlai_files(None, bpe_vocab=tmp_path / "encoder.json", bpe_merges=files["vocab_bpe"])
    with pytest.raises(ValueError, match="datapath"):
        ParlaiBpeTokenizer.from_parlai_files(files["dict"])
    assert os.path.exists(files["dict"])


def test_pipeline_batches_with_whole_string_tokenizer_are_exact(gpt2_tok):
    """The input pipeline's contexts equal encode(context)[-T:] for a whole-string BPE tokenizer."""
    from bb3x_jax.data import pipeline

    texts = _random_texts(40, seed=9)
    source = [
        {"context": "\n\n\n".join(texts[i : i + 3]) + (" \n\n" if i % 2 else ""), "label": texts[i], "feedback": 1}
        for i in range(0, 36)
    ]
    config = pipeline.PipelineConfig.for_eval(8, text_truncate=24, label_truncate=10, prefetch=0)
    iterator = pipeline.BatchIterator(source, gpt2_tok, config, process_index=0, process_count=1)
    for batch in iterator:
        for row, index in zip(batch["context_ids"], batch["index"]):
            if index < 0:
                continue
            expected = gpt2_tok.encode(source[index]["context"])[-24:]
            assert row[: len(expected)].tolist() == expected and not row[len(expected):].any()
