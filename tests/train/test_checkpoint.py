"""Checkpoints: exact round trip, which ones are kept, and recovery from damaged ones."""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest
from absl import logging

from bb3x_jax.errors import WorkdirError
from bb3x_jax.model import build, config
from bb3x_jax.train import checkpoint as checkpoint_lib
from bb3x_jax.train import step as step_lib
from tests.train.test_step import make_batch


@pytest.fixture(scope="module")
def trained():
    """A tiny model's state after a few real steps (non-trivial optimizer state and RNG),
    and a differently initialised state of the same shapes to restore into."""
    cfg = config.preset("tiny", vocab_size=64, dropout=0.1)
    tx = step_lib.make_optimizer(learning_rate=3e-3, warmup_steps=2, total_steps=50)
    graphdef, state = step_lib.init_state(build.build(cfg, seed=0), tx, 0)
    template = jax.tree.map(lambda x: x, step_lib.init_state(build.build(cfg, seed=1), tx, 1)[1])
    train_step = step_lib.make_train_step(graphdef, tx)
    for _ in range(3):
        state, _ = train_step(state, make_batch())
    return template, train_step, state


def _assert_same(a, b):
    unwrap = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x  # noqa: E731
    la, lb = jax.tree.leaves(jax.tree.map(unwrap, a)), jax.tree.leaves(jax.tree.map(unwrap, b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_training_continues_identically(trained, tmp_path):
    """Restoring gives bit-identical params, optimizer state, step and RNG key, and the next step matches."""
    template, train_step, state = trained
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(3, state, {"iterator": {"epoch": 0}})
    ckpt.wait()
    restored = ckpt.restore_latest(template)
    assert restored.step == 3 and restored.meta["iterator"] == {"epoch": 0}
    _assert_same(restored.state, state)
    a, _ = train_step(restored.state, make_batch())
    b, _ = train_step(ckpt.restore(3, template).state, make_batch())
    _assert_same(a, b)
    ckpt.close()


def test_keeps_newest_and_best(trained, tmp_path):
    """With keep=2 and a best metric, the newest two and the best (even if old) survive."""
    template, _, state = trained
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2, best_metric="ppl_positive", best_mode="min")
    for step, ppl in ((1, 9.0), (2, 3.0), (3, None), (4, 5.0), (5, None)):
        ckpt.save(step, state, {}, metrics=None if ppl is None else {"ppl_positive": ppl})
    ckpt.wait()
    assert ckpt.steps() == [2, 4, 5]
    assert ckpt.best_step() == 2
    ckpt.close()


def _damage_params(directory, step):
    for path in glob.glob(os.path.join(str(directory), str(step), "params", "**", "*"), recursive=True):
        if os.path.isfile(path) and "/d/" in path:
            with open(path, "wb") as f:
                f.write(b"garbage")


def test_damaged_latest_falls_back_to_previous_and_is_moved_aside(trained, tmp_path, monkeypatch):
    """A checkpoint whose array files were damaged after writing is skipped with a warning naming it,
    moved aside to <step>.damaged (<step>.damaged.1 when that is taken), and its step can be saved again."""
    template, _, state = trained
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(1, state, {"n": 1})
    ckpt.save(2, state, {"n": 2})
    _damage_params(tmp_path, 2)
    os.makedirs(os.path.join(str(tmp_path), "2.damaged"))  # an earlier one moved aside
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    restored = ckpt.restore_latest(template)
    assert restored.step == 1 and restored.meta["n"] == 1
    assert any(f"{tmp_path}/2 cannot be restored" in w for w in warnings)
    assert any(f"moved aside to {tmp_path}/2.damaged.1" in w for w in warnings)
    assert sorted(os.listdir(str(tmp_path))) == ["1", "2.damaged", "2.damaged.1"]
    assert ckpt.steps() == [1]
    ckpt.save(2, restored.state, {"n": 3})  # the step is free again
    assert ckpt.steps() == [1, 2] and ckpt.read_meta(2)["n"] == 3
    ckpt.close()


def test_nothing_restorable_raises_and_changes_nothing(trained, tmp_path):
    """When every checkpoint fails to restore, restore_latest names them in a WorkdirError and
    renames or deletes none (a fresh start there would let the keep policy delete them)."""
    template, _, state = trained
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(1, state, {})
    ckpt.save(2, state, {})
    _damage_params(tmp_path, 1)
    _damage_params(tmp_path, 2)
    with pytest.raises(WorkdirError, match=f"{tmp_path}/2: .*{tmp_path}/1: .*move {tmp_path} aside"):
        ckpt.restore_latest(template)
    assert sorted(os.listdir(str(tmp_path))) == ["1", "2"]
    ckpt.close()


def test_newest_meta_skips_an_unreadable_one(trained, tmp_path, monkeypatch):
    """newest_meta reads the JSON meta only; a step whose meta is unreadable is named and skipped."""
    _, _, state = trained
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(1, state, {"n": 1})
    ckpt.save(2, state, {"n": 2})
    ckpt.close()
    with open(os.path.join(str(tmp_path), "2", "meta", "metadata"), "w") as f:
        f.write("{not json")
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    step, meta = checkpoint_lib.newest_meta(str(tmp_path))
    assert step == 1 and meta["n"] == 1
    assert any(f"{tmp_path}/2: its meta cannot be read" in w for w in warnings)
    assert checkpoint_lib.newest_meta(str(tmp_path / "missing")) is None


def test_half_written_checkpoint_is_ignored_and_removed(trained, tmp_path, monkeypatch):
    """A save interrupted before its atomic rename (orbax's temporary folder) is not a checkpoint;
    restoring for a run that continues removes it with a log line."""
    template, _, state = trained
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=3, async_save=False)
    ckpt.save(1, state, {})
    tmp = os.path.join(str(tmp_path), "2.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(tmp, "params"))
    assert ckpt.steps() == [1]
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    assert ckpt.restore_latest(template).step == 1
    assert not os.path.exists(tmp) and any(f"removing {tmp}" in w for w in warnings)
    ckpt.close()


def test_no_checkpoint_restores_none(trained, tmp_path):
    """An empty directory means a fresh start, not an error."""
    template, _, _ = trained
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
    assert ckpt.restore_latest(template) is None and ckpt.best_step() is None
    ckpt.close()


def test_read_params_reads_only_parameters(trained, tmp_path):
    """Inference reads the params item alone (no optimizer state template needed)."""
    template, _, state = trained
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(7, state, {"model_config": {"d_model": 64}})
    ckpt.close()
    params, meta = checkpoint_lib.read_params(str(tmp_path), checkpoint_lib.abstract(state.params))
    assert meta["step"] == 7 and meta["model_config"] == {"d_model": 64}
    _assert_same(params, state.params)
