"""Shared fixtures for the tokenizer and pipeline tests: one small sentencepiece
model (trained once per session, ~1 s) and generators of synthetic dialogue
examples shaped like the prepared TFDS records."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bb3x_jax.data.tokenizers.base import SentencePieceTokenizer, train_sentencepiece

_SYLLABLES = ["ba", "ke", "lo", "mi", "nu", "ra", "te", "shi", "an", "or", "en", "th", "ing", "st", "é", "ü", "ß"]


def make_words(seed: int = 0, n: int = 400) -> list[str]:
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)})
    return words + ["I", "you", "the", "a", "?", "!", ",", "日本語", "🙂"]


def make_utterance(rng: random.Random, words: list[str], min_words: int = 1, max_words: int = 20) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))


def make_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Training text: conversations of a few turns joined with "\\n" (~120 KB)."""
    rng = random.Random(seed)
    words = make_words(seed)
    return ["\n".join(make_utterance(rng, words) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def make_examples(n: int, seed: int = 0, min_turns: int = 1, max_turns: int = 30, as_bytes: bool = True) -> list[dict]:
    """Examples like ``tfds.data_source`` returns them: text as UTF-8 bytes,
    feedback as a numpy scalar."""
    rng = random.Random(seed)
    words = make_words(0)
    out = []
    for _ in range(n):
        context = "\n".join(make_utterance(rng, words) for _ in range(rng.randint(min_turns, max_turns)))
        label = make_utterance(rng, words, 1, 40)
        if as_bytes:
            context, label = context.encode("utf-8"), label.encode("utf-8")
        out.append({"context": context, "label": label, "feedback": np.int32(rng.choice([1, 0, -1]))})
    return out


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "test.model"
    train_sentencepiece(make_corpus(), path, vocab_size=500)
    return path


@pytest.fixture(scope="session")
def tokenizer(sp_model_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.load(sp_model_path)


@pytest.fixture(scope="session")
def example_factory():
    """``make_examples`` as a fixture, so test modules need not import conftest
    (several conftest modules may exist in the tree)."""
    return make_examples


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()
