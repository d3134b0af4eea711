"""Named presets: sizes match the published models, counted without allocating weights."""

from __future__ import annotations

import pytest

from bb3x_jax.model import config
from bb3x_jax.model.__main__ import PUBLISHED, count_parameters


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_big_presets_match_published_sizes(name):
    """bb3_3b, bb1_3b, bb3_30b and bb3_175b are within 2% of 2.7B, 2.7B, 30B and 175B parameters."""
    n = count_parameters(config.preset(name))
    assert abs(n / PUBLISHED[name] - 1) < 0.02, n


def test_count_equals_the_architecture_formula():
    """The traced count equals the closed form for an encoder-decoder and a decoder-only model."""
    for cfg in (config.preset("tiny"), config.preset("tiny_opt")):
        d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
        attention = 4 * (d * d + d)
        ffn = d * f + f + f * d + d
        norm = 2 * d
        encoder = cfg.n_encoder_layers * (attention + ffn + 2 * norm)
        cross = attention + norm if cfg.arch == "encoder_decoder" else 0
        decoder = cfg.n_decoder_layers * (attention + ffn + 2 * norm + cross)
        stacks = (2 if cfg.arch == "encoder_decoder" else 1) * ((cfg.n_positions + cfg.position_offset) * d + norm)
        assert count_parameters(cfg) == v * d + encoder + decoder + stacks
