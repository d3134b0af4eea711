"""The jitted train step: it learns, it is deterministic, and sharding does not change it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from bb3x_jax import cringe
from bb3x_jax.model import build, config
from bb3x_jax.train import step as step_lib
from tests import LOW_CODEGEN_EFFORT_ENV, REPO


def make_batch(seed: int = 0, batch: int = 8, lc: int = 12, ll: int = 6, vocab: int = 64):
    rng = np.random.default_rng(seed)
    context = rng.integers(4, vocab, size=(batch, lc)).astype(np.int32)
    context[:, lc - 3 :] = 0  # right padding
    label = rng.integers(4, vocab, size=(batch, ll)).astype(np.int32)
    label[:, -2] = 2  # end token
    label[:, -1] = 0
    feedback = np.array([1, 0, -1, 1, 0, -1, 1, 0][:batch], np.int32)
    return {"context_ids": context, "label_ids": label, "feedback": feedback, "valid": np.ones(batch, bool)}


def run_steps(n: int, objective: str = "cringe", seed: int = 0, grad_accum: int = 1, dropout: float = 0.1):
    cfg = config.preset("tiny", vocab_size=64, dropout=dropout)
    model = build.build(cfg, seed=seed)
    tx = step_lib.make_optimizer(learning_rate=3e-3, warmup_steps=2, total_steps=50, grad_accum=grad_accum)
    graphdef, state = step_lib.init_state(model, tx, seed)
    train_step = step_lib.make_train_step(graphdef, tx, objective=objective)
    batch = make_batch()
    history = []
    for _ in range(n):
        state, metrics = train_step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def test_cringe_step_learns_positive_and_pushes_down_negative():
    """On a fixed batch, CE on good/unlabeled labels falls and the negatives' CT loss falls too."""
    _, history = run_steps(30)
    assert history[-1]["ce_loss"] < 0.5 * history[0]["ce_loss"]
    assert history[-1]["ct_loss"] < history[0]["ct_loss"]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in history)


def test_step_is_deterministic_given_seed():
    """Same seed (dropout keys included) -> bit-identical parameters after several steps."""
    a, _ = run_steps(4)
    b, _ = run_steps(4)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(a.step) == 4


def test_bfloat16_compute_keeps_float32_parameters_and_learns():
    """model.dtype=bfloat16 computes in bf16 while parameters and Adam moments stay float32."""
    cfg = config.preset("tiny", vocab_size=64, dropout=0.0, dtype="bfloat16")
    tx = step_lib.make_optimizer(learning_rate=3e-3, warmup_steps=2, total_steps=50)
    graphdef, state = step_lib.init_state(build.build(cfg), tx, 0)
    train_step = step_lib.make_train_step(graphdef, tx)
    losses = []
    for _ in range(15):
        state, metrics = train_step(state, make_batch())
        losses.append(float(metrics["loss"]))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0]


def test_gradient_accumulation_updates_every_k_calls():
    """With grad_accum=2 the parameters change only on every second call."""
    cfg = config.preset("tiny", vocab_size=64, dropout=0.0)
    tx = step_lib.make_optimizer(learning_rate=1e-2, warmup_steps=1, total_steps=10, grad_accum=2)
    graphdef, state = step_lib.init_state(build.build(cfg), tx, 0)
    train_step = step_lib.make_train_step(graphdef, tx)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(state.params)]
    state, _ = train_step(state, make_batch())
    middle = [np.asarray(x).copy() for x in jax.tree.leaves(state.params)]
    state, _ = train_step(state, make_batch(1))
    after = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    assert all(np.array_equal(a, b) for a, b in zip(before, middle))
    assert any(not np.array_equal(a, b) for a, b in zip(middle, after))


SHARDED = textwrap.dedent(
    """
    import jax, numpy as np
    from bb3x_jax import sharding
    from bb3x_jax.model import build, config
    from bb3x_jax.train import step as step_lib
    from tests.train.test_step import make_batch

    import logging
    import optax

    # Every XLA compilation is logged: the step must compile once per mesh, not again for the state it returns.
    jax.config.update("jax_log_compiles", True)
    compiled = []
    handler = logging.Handler()
    handler.emit = lambda record: compiled.append(record.getMessage())
    logging.getLogger("jax").addHandler(handler)

    def step_compiles():
        return sum(m.startswith("Finished XLA compilation of jit(step)") for m in compiled)

    def run(mesh):
        cfg = config.preset("tiny", vocab_size=64, dropout=0.1)
        # SGD: Adam divides by sqrt(v), which turns float-rounding differences in
        # near-zero gradients into visible parameter differences; SGD keeps the
        # comparison about the step itself (forward, dropout, backward, update).
        tx = optax.sgd(0.05)
        # As the runtime does: with the mesh, the step counter and key are replicated over it.
        graphdef, state = step_lib.init_state(build.build(cfg, seed=0, mesh=mesh), tx, 0, mesh)
        placed = jax.tree.map(lambda x: x.sharding, state.params)  # the rules table's (test_sharding)
        train_step = step_lib.make_train_step(graphdef, tx)
        before = step_compiles()
        for i in range(3):
            batch = make_batch(i)
            if mesh is not None:
                batch = sharding.put_batch(batch, mesh)
                with jax.set_mesh(mesh):  # activations pinned by the rules table
                    if i == 0:
                        text = train_step.lower(state, batch).as_text()
                        assert text.count("sharding_constraint") >= 4, "activation constraints missing"
                    state, metrics = train_step(state, batch)
            else:
                state, metrics = train_step(state, batch)
        if mesh is not None:  # the step keeps every parameter where the rules table put it
            assert step_compiles() - before == 1, ("the step compiled again for its own output state", compiled)
            after = jax.tree.map(lambda x: x.sharding, state.params)
            assert all(a.is_equivalent_to(b, x.ndim) for a, b, x in
                       zip(jax.tree.leaves(placed), jax.tree.leaves(after), jax.tree.leaves(state.params)))
        return state, float(metrics["loss"])

    single, loss1 = run(None)
    for shape in ((2, 2, 2), (1, 8, 1), (8, 1, 1), (1, 2, 4)):
        mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
        sharded, loss8 = run(mesh)
        assert abs(loss1 - loss8) < 1e-5, (shape, loss1, loss8)
        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    print("OK")
    """
)


def test_sharded_step_equals_single_device_step():
    """On 8 simulated devices and four mesh shapes, 3 steps (dropout on, activations constrained by
    the rules table under the ambient mesh) give the single-device parameters to 1e-5, every
    parameter keeps the sharding the rules table gave it, and the step compiles once (its output
    state has its input's shardings)."""
    # The tests' low codegen effort for the five tiny programs: both sides of the comparison compile
    # alike, and the script takes about 45 s instead of 56 s.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               **LOW_CODEGEN_EFFORT_ENV)
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_learning_rate_schedule():
    """Warmup reaches the peak at `warmup_steps` (first update already moves), then decays linearly."""
    schedule = step_lib.lr_schedule(1.0, warmup_steps=4, total_steps=12, end_lr_ratio=0.1)
    values = [float(schedule(c)) for c in (0, 1, 2, 3, 4, 11, 20)]
    np.testing.assert_allclose(values, [0.25, 0.5, 0.75, 1.0, 1.0 - 0.9 / 8, 0.1, 0.1], rtol=1e-6)


def test_kl_anchor_keeps_the_model_near_its_start():
    """With kl_anchor the step adds the KL to the start's distributions: zero at the first step (no
    dropout: model == anchor), and after training the model's distributions sit closer to the start
    than without it, while it still learns the batch."""
    cfg = config.preset("tiny", vocab_size=64, dropout=0.0)
    batch = make_batch()
    runs = {}
    for weight in (0.0, 5.0):
        tx = step_lib.make_optimizer(learning_rate=3e-3, warmup_steps=2, total_steps=50)
        graphdef, state = step_lib.init_state(build.build(cfg, seed=0), tx, 0)
        anchor = jax.tree.map(jax.numpy.copy, state.params)
        train_step = step_lib.make_train_step(graphdef, tx, kl_anchor=weight)
        history = []
        for _ in range(25):
            state, metrics = train_step(state, batch, anchor if weight else None)
            history.append({k: float(v) for k, v in metrics.items()})
        runs[weight] = (graphdef, state, anchor, history)
    graphdef, _, anchor, anchored = runs[5.0]
    assert anchored[0]["kl_anchor"] == 0.0
    assert "kl_anchor" not in runs[0.0][3][0]

    @jax.jit
    def mean_kl(params, rest):
        logits = nnx.merge(graphdef, params, rest).label_logits(
            batch["context_ids"], batch["label_ids"], deterministic=True)
        start = nnx.merge(graphdef, anchor, rest).label_logits(
            batch["context_ids"], batch["label_ids"], deterministic=True)
        kl, covered = cringe.anchor_kl(logits, start, batch["label_ids"], batch["feedback"])
        return kl.sum() / covered.sum()

    free, held = (float(mean_kl(runs[w][1].params, runs[w][1].rest)) for w in (0.0, 5.0))
    assert held < 0.5 * free, (held, free)
    assert anchored[-1]["ce_loss"] < 0.8 * anchored[0]["ce_loss"]
    assert 0.0 < anchored[1]["kl_anchor"] and abs(anchored[-1]["kl_anchor"] - held) < 0.1 * held


def test_kl_anchor_without_anchor_parameters_is_refused():
    cfg = config.preset("tiny", vocab_size=64, dropout=0.0)
    tx = step_lib.make_optimizer(learning_rate=3e-3, warmup_steps=2, total_steps=50)
    graphdef, state = step_lib.init_state(build.build(cfg), tx, 0)
    train_step = step_lib.make_train_step(graphdef, tx, kl_anchor=1.0)
    with pytest.raises(ValueError, match="anchor"):
        train_step(state, make_batch())
