"""The token cache gives the same batches as tokenizing on the fly, and is reused safely."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bb3x_jax.data import pipeline, token_cache
from bb3x_jax.data.framing import Framing


def _source(n=300, seed=0):
    rng = np.random.default_rng(seed)
    words = ["cooking", "music", "stars", "pasta", "guitar", "the", "a", "I", "love", "why", "?", "é", "\u2028"]
    def sentence():
        return " ".join(rng.choice(words, size=int(rng.integers(1, 25))))
    return [
        {
            "context": "\n".join(sentence() for _ in range(int(rng.integers(1, 30)))).encode(),
            "label": sentence().encode(),
            "feedback": int(rng.integers(-1, 2)),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("workers, framing", [(0, {}), (2, {}),
                                              (0, {"context_framing": "bart", "label_framing": "parlai",
                                                   "global_end_token": True})])
def test_cached_batches_equal_on_the_fly_batches(tmp_path, tokenizer, workers, framing):
    """Every batch from the cache equals the batch the tokenizing pipeline builds (any worker count,
    any framing)."""
    source = _source()
    config = pipeline.PipelineConfig(global_batch_size=32, text_truncate=40, label_truncate=12,
                                     context_buckets=(16, 40), prefetch=0, num_epochs=2, **framing)
    cached = token_cache.build(source, tokenizer, config.framing, str(tmp_path / "cache"), workers=workers)
    assert len(cached) == len(source)
    live = list(pipeline.BatchIterator(source, tokenizer, config, process_index=0, process_count=1))
    fast = list(pipeline.BatchIterator(cached, tokenizer, config, process_index=0, process_count=1))
    assert len(live) == len(fast) == 2 * (300 // 32)
    for a, b in zip(live, fast):
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_cache_is_reused_and_checked(tmp_path, tokenizer):
    """A finished cache is reopened, a mismatched truncation is refused, and no temp dir is left."""
    path = str(tmp_path / "cache")
    first = token_cache.build(_source(50), tokenizer, Framing(40, 12), path)
    mtime = os.path.getmtime(os.path.join(path, "meta.json"))
    again = token_cache.build(_source(50), tokenizer, Framing(40, 12), path)
    assert os.path.getmtime(os.path.join(path, "meta.json")) == mtime and len(again) == len(first)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".incomplete")] == []
    with pytest.raises(ValueError, match="token cache was framed as"):
        pipeline.BatchIterator(first, tokenizer, pipeline.PipelineConfig(global_batch_size=8), process_index=0, process_count=1)


def test_cache_key_depends_on_tokenizer_and_framing(tmp_path, tokenizer):
    """Another truncation, framing or tokenizer gets another cache folder, never a stale one."""
    a = token_cache.cache_dir(str(tmp_path), "src", tokenizer, Framing(40, 12))
    b = token_cache.cache_dir(str(tmp_path), "src", tokenizer, Framing(41, 12))
    c = token_cache.cache_dir(str(tmp_path), "other", tokenizer, Framing(40, 12))
    d = token_cache.cache_dir(str(tmp_path), "src", tokenizer, Framing(40, 12, context="bart"))
    e = token_cache.cache_dir(str(tmp_path), "src", tokenizer, Framing(40, 12, label="parlai"))
    assert len({a, b, c, d, e}) == 5
