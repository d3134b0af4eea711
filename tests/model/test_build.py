"""Building a model: the same (config, seed) builds equal, independent models, compiling once per process."""

from __future__ import annotations

import logging

import jax
import numpy as np
from flax import nnx

from bb3x_jax.model import build, config


def test_building_again_reuses_the_compiled_initialiser_and_gives_independent_equal_weights(caplog):
    """A second build of the same model (an experiment's next stage) compiles nothing, holds the same values in
    buffers of its own (donating one model's arrays leaves the other intact), and another seed differs."""
    cfg = config.preset("tiny", vocab_size=48)
    first = build.build(cfg, seed=11)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        second = build.build(cfg, seed=11)
    assert not [r for r in caplog.records if "compilation of jit(" in r.getMessage()], caplog.text
    a, b = nnx.state(first, nnx.Param), nnx.state(second, nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(a)
    assert all(not x.is_deleted() for x in jax.tree.leaves(b))
    other = nnx.state(build.build(cfg, seed=12), nnx.Param)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(b),
                                                                                jax.tree.leaves(other)))
