"""The run's parts (bb3x_jax/train/runtime.py): here, where the KL anchor's weights come from."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from bb3x_jax import config as config_lib
from bb3x_jax.model import api as model_api
from bb3x_jax.model import build
from bb3x_jax.model import config as model_config
from bb3x_jax.train import runtime
from configs import cringe


def _saved_model(path, preset: str, seed: int):
    cfg = model_config.preset(preset)
    network = build.build(cfg, seed=seed)
    model_api.BB3Model(network, cfg).save_orbax(str(path))
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(network, nnx.Param))]


def _anchored_config(anchor_from: str):
    config = cringe.get_config()
    config.train.kl_anchor = 1.0
    config.train.kl_anchor_from = anchor_from
    return config


def test_the_anchor_is_kl_anchor_froms_weights_not_the_start(tmp_path):
    """With train.kl_anchor_from the anchor holds that checkpoint's parameters, whatever the run starts
    from (here random weights, no train.init_from): iterate.anchor=baseline anchors every iteration to
    the baseline this way."""
    saved = _saved_model(tmp_path / "anchor", "tiny", seed=7)
    setup = runtime.Setup(_anchored_config(str(tmp_path / "anchor")), str(tmp_path / "run"), with_data=False)
    anchor = [np.asarray(x) for x in jax.tree.leaves(setup.anchor)]
    start = [np.asarray(x) for x in jax.tree.leaves(setup.state.params)]
    assert len(anchor) == len(saved) == len(start)
    for a, s in zip(anchor, saved):
        np.testing.assert_array_equal(a, s)
    assert any(not np.array_equal(a, s) for a, s in zip(anchor, start))


def test_an_anchor_of_another_shape_or_a_missing_one_is_refused_naming_the_key(tmp_path):
    """An anchor whose parameters are not the trained model's, or that does not exist, stops the run in
    one line naming train.kl_anchor_from (not train.init_from)."""
    _saved_model(tmp_path / "other", "small", seed=0)
    with pytest.raises(config_lib.ConfigError, match=r"config.train.kl_anchor_from: .*other.* does not hold"):
        runtime.Setup(_anchored_config(str(tmp_path / "other")), str(tmp_path / "run"), with_data=False)
    with pytest.raises(config_lib.ConfigError, match=r"config.train.kl_anchor_from: .*missing"):
        runtime.Setup(_anchored_config(str(tmp_path / "missing")), str(tmp_path / "run"), with_data=False)
