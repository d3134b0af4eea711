"""Tests of the sentencepiece tokenizer and the ParlAI context/label framing."""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import sentencepiece as spm

from bb3x_jax.data.tokenizers import base as tk
from bb3x_jax.data.tokenizers.base import (
    SentencePieceTokenizer,
    Tokenizer,
    encode_context,
    encode_contexts,
    encode_label,
    encode_labels,
    train_sentencepiece,
)

# Texts that a lossy tokenizer would damage: case, whitespace runs, leading and
# trailing spaces, CR, U+2028/U+2029, tabs, NUL, unseen scripts and emoji,
# empty turns.
TRICKY = [
    "",
    "Hello World",
    "  two leading, three trailing   ",
    "tabs\tand  double  spaces",
    "carriage\r\nreturn and a lone \r",
    "line\u2028separator and paragraph\u2029separator",
    "NUL \x00 and DEL \x7f and BEL \x07",
    "Ünïcödé, Ελληνικά, русский, 中文, 한국어, עברית, العربية",
    "emoji 🙂👍🏽 and ZWJ 👩\u200d💻 and combining e\u0301",
    "\n",
    "\n\nempty turns\n\n\nbetween\n",
    " \n \n ",
    "ends with newline\n",
]


def test_special_ids_follow_parlai(tokenizer):
    """Ids 0-3 are __null__/__start__/__end__/__unk__ and the delimiter is one token of its own."""
    assert isinstance(tokenizer, Tokenizer)
    assert (tokenizer.pad_id, tokenizer.start_id, tokenizer.end_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["__null__", "__start__", "__end__", "__unk__"]
    assert len(tokenizer.delimiter_ids) == 1
    assert tokenizer.delimiter_ids[0] not in (0, 1, 2, 3)
    assert tokenizer.encode("\n") == list(tokenizer.delimiter_ids)
    assert tokenizer.vocab_size == 500


def test_training_is_deterministic(tmp_path, corpus):
    """Training twice on the same input writes byte-identical model files."""
    a = train_sentencepiece(corpus, tmp_path / "a.model", vocab_size=400)
    b = train_sentencepiece(iter(corpus), tmp_path / "b.model", vocab_size=400)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.model_proto == b.model_proto


def test_training_options_limit_and_bytes_input(tmp_path, corpus):
    """``max_sentences`` keeps the first sentences deterministically and bytes input equals str input."""
    a = train_sentencepiece(corpus, tmp_path / "a.model", vocab_size=350, max_sentences=4000)
    b = train_sentencepiece([c.encode("utf-8") for c in corpus], tmp_path / "b.model", vocab_size=350,
                            max_sentences=4000)
    assert a.model_proto == b.model_proto


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_lossless(tokenizer, text):
    """decode(encode(text)) == text for case, whitespace runs, CR, U+2028, control chars and unseen unicode."""
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.asarray(ids, dtype=np.int32)) == text


def test_no_text_becomes_unknown(tokenizer):
    """Byte fallback: characters never seen in training encode to bytes, never to __unk__."""
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0xD7FF),
                                       rng.randrange(0x1F300, 0x1FAFF)])) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text)
        assert tokenizer.unk_id not in ids
        assert tokenizer.decode(ids) == text


def test_encode_never_emits_pad_start_end(tokenizer):
    """Plain text never encodes to pad/start/end, so those ids keep their framing meaning."""
    for text in TRICKY + ["__null__ __start__ __end__ __unk__"]:
        ids = tokenizer.encode(text)
        assert not {0, 1, 2, 3} & set(ids)
    assert tokenizer.decode(tokenizer.encode("__end__")) == "__end__"


def test_delimiter_contract(tokenizer):
    """encode("\\n".join(turns)) equals the per-turn encodings joined by delimiter_ids."""
    rng = random.Random(1)
    pool = TRICKY[:9] + ["a", " b ", "x y z", "  "]
    for _ in range(300):
        turns = [rng.choice(pool) for _ in range(rng.randint(1, 6))]
        joined: list[int] = []
        for k, turn in enumerate(turns):
            if k:
                joined += list(tokenizer.delimiter_ids)
            joined += tokenizer.encode(turn)
        assert tokenizer.encode("\n".join(turns)) == joined


def test_encode_batch_matches_encode(tokenizer, corpus):
    """The batched (threaded) encoders give exactly the per-text encodings."""
    texts = corpus[:300] + TRICKY
    expected = [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts) == expected
    assert tokenizer.encode_batch([t.encode("utf-8") for t in texts]) == expected
    arrays = tokenizer.encode_batch_numpy(texts)
    assert all(a.dtype == np.int32 for a in arrays)
    assert [a.tolist() for a in arrays] == expected
    assert tokenizer.encode_batch([]) == [] and tokenizer.encode_batch_numpy([]) == []


def test_decode_skips_pad_but_does_not_stop_at_end(tokenizer):
    """decode drops pad ids only; __end__ is rendered and text after it kept."""
    a, b = tokenizer.encode("hello"), tokenizer.encode("there")
    ids = [0] + a + [tokenizer.end_id] + b + [0, 0]
    assert tokenizer.decode(ids) == "hello__end__there"
    assert tokenizer.decode([tokenizer.start_id] + a) == "__start__hello"
    assert tokenizer.decode([]) == ""


@pytest.mark.parametrize("chars_per_token", [0.05, 1.0, 4.0, 1000.0])
def test_encode_context_equals_full_encode_then_left_truncate(tokenizer, example_factory, chars_per_token):
    """The backwards, early-stopping context encoder equals encode(full context)[-text_truncate:]."""
    examples = example_factory(150, seed=3, min_turns=1, max_turns=30, as_bytes=False)
    contexts = [ex["context"] for ex in examples] + TRICKY + ["\n".join(TRICKY)]
    full = [tokenizer.encode(c) for c in contexts]
    for T in (1, 2, 7, 32, 128, 100_000):
        got = encode_contexts(contexts, tokenizer, T, chars_per_token=chars_per_token)
        assert got == [f[-T:] for f in full], T
    assert encode_contexts(contexts, tokenizer, None) == full


def test_encode_context_single_and_bytes(tokenizer):
    """encode_context accepts bytes, keeps the newest tokens and never exceeds text_truncate."""
    context = "first turn is old\nsecond turn\nthe newest turn"
    full = tokenizer.encode(context)
    assert encode_context(context.encode("utf-8"), tokenizer, 5) == full[-5:]
    assert encode_context(context, tokenizer, 10_000) == full
    assert encode_context("", tokenizer, 8) == []
    assert encode_context(context, tokenizer, 0) == []
    assert tokenizer.decode(encode_context(context, tokenizer, len(tokenizer.encode("the newest turn")))) == (
        "the newest turn")


def test_encode_label_truncates_right_and_appends_end(tokenizer):
    """Labels keep their first label_truncate-1 tokens and always end with __end__."""
    label = "one two three four five six seven eight nine ten"
    ids = tokenizer.encode(label)
    assert len(ids) > 6
    assert encode_label(label, tokenizer, 6) == ids[:5] + [tokenizer.end_id]
    assert encode_label(label, tokenizer, 1000) == ids + [tokenizer.end_id]
    assert encode_label(label, tokenizer, 1) == [tokenizer.end_id]
    assert encode_label("", tokenizer, 4) == [tokenizer.end_id]
    assert encode_labels([label, b"x"], tokenizer, 6)[0] == encode_label(label, tokenizer, 6)
    with pytest.raises(ValueError):
        encode_label(label, tokenizer, 0)


def test_load_and_pickle_preserve_the_model(tokenizer, sp_model_path):
    """Loading from disk and pickling (for worker processes) give the same encodings."""
    again = SentencePieceTokenizer.load(str(sp_model_path), num_threads=1)
    clone = pickle.loads(pickle.dumps(tokenizer))
    for text in TRICKY + ["some ordinary words"]:
        assert again.encode(text) == tokenizer.encode(text) == clone.encode(text)
    assert again.model_proto == sp_model_path.read_bytes()


def test_rejects_models_without_parlai_ids(corpus):
    """A sentencepiece model with default special ids is refused rather than silently misframed."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus[:500]), model_writer=buf, vocab_size=200,
                                   minloglevel=2)
    with pytest.raises(ValueError):
        SentencePieceTokenizer(buf.getvalue())


def test_as_text_rejects_non_text():
    """Context/label fields must be str or UTF-8 bytes; anything else is a loud error."""
    assert tk.as_text(np.array(b"abc")) == "abc"
    with pytest.raises(TypeError):
        tk.as_text(3.5)
