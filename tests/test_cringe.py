"""The training objective (bb3x_jax/cringe.py): CRINGE and its baselines.

The CRINGE value and gradient are checked against an independent PyTorch
reference written here from the formula (loops and masks, ``torch.topk``,
``cross_entropy`` with ``ignore_index``, the way ParlAI writes it), and, where
ParlAI's ``projects/cringe`` is importable, against ParlAI itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from bb3x_jax import cringe
from bb3x_jax.cringe import METRIC_KEYS, OBJECTIVES, cringe_candidates, cringe_loss, objective_loss

PAD = 0
REPO = Path(__file__).resolve().parents[1]


def make_batch(seed: int = 0, b: int = 5, t: int = 7, v: int = 37, feedback=(1, 0, -1, 0, 1)):
    """Random logits, targets (never the pad id), padded rows, all three feedback classes.

    At about half the positions the gold logit is raised so that the gold token
    often sits inside the top-2 (the "remove gold" branch of CRINGE).
    """
    r = np.random.default_rng(seed)
    logits = r.normal(scale=2.0, size=(b, t, v)).astype(np.float32)
    targets = r.integers(1, v, size=(b, t))
    lift = r.random((b, t)) < 0.5
    bi, ti = np.nonzero(lift)
    logits[bi, ti, targets[bi, ti]] += 4.0
    lengths = np.full(b, t)
    lengths[1] = 3
    lengths[3] = 5
    targets = np.where(np.arange(t)[None, :] < lengths[:, None], targets, PAD).astype(np.int32)
    return logits, targets, np.asarray(feedback, np.int32)


def torch_cringe(
    logits,
    targets,
    feedback,
    *,
    alpha=1.0,
    pad_id=PAD,
    detach_positives=False,
    train_ce_on_positive=True,
    ct_on_positive_parlai_style=False,
    candidates=None,
):
    """Reference CRINGE in float64 PyTorch, position by position; returns (loss, grad).

    k = 1 (best non-gold among ``torch.topk(x, 2)``) unless ``candidates`` gives
    the s+ token per position. ``ct_on_positive_parlai_style`` also runs CT on
    positive examples the reference's way: pair target 0, ignored when it is
    the pad id; their tokens then count in the denominator.
    """
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    b, t, v = x.shape
    flat = x.reshape(-1, v)
    y = torch.tensor(targets, dtype=torch.long).reshape(-1)
    labels = torch.tensor(feedback).repeat_interleave(t)
    ce = F.cross_entropy(flat, y, ignore_index=pad_id, reduction="none")
    total = flat.new_zeros(())
    counted = 0
    for i in range(b * t):
        if y[i].item() == pad_id:
            continue
        label = labels[i].item()
        use_ce = label == -1 or (label == 1 and train_ce_on_positive)
        use_ct = label == 0 or (label == 1 and ct_on_positive_parlai_style)
        if use_ce:
            total = total + ce[i]
        if use_ct:
            if candidates is None:
                top = torch.topk(flat[i], 2).indices.tolist()
                j = [c for c in top if c != y[i].item()][0]
            else:
                j = int(candidates.reshape(-1)[i])
            s_plus = flat[i, j].detach() if detach_positives else flat[i, j]
            pair = torch.stack([flat[i, y[i]], s_plus])[None]
            pair_target = torch.tensor([1 if label == 0 else 0])
            total = total + alpha * F.cross_entropy(pair, pair_target, ignore_index=pad_id, reduction="sum")
        counted += use_ce or use_ct
    loss = total / max(counted, 1)
    loss.backward()
    return loss.item(), x.grad.numpy()


def jax_value_and_grad(logits, targets, feedback, rng=None, **kw):
    fn = lambda x: cringe_loss(x, jnp.asarray(targets), jnp.asarray(feedback), rng, **kw)[0]  # noqa: E731
    value, grad = jax.value_and_grad(fn)(jnp.asarray(logits))
    return float(value), np.asarray(grad)


# --- 1. the independent PyTorch reference ----------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.37])
@pytest.mark.parametrize("detach_positives", [False, True])
@pytest.mark.parametrize("train_ce_on_positive", [True, False])
def test_matches_torch_reference(alpha, detach_positives, train_ce_on_positive):
    """Loss and gradient equal an independent PyTorch CRINGE (k=1) to 1e-5 under every option."""
    logits, targets, feedback = make_batch(seed=int(alpha == 1.0) + 2 * detach_positives + 4 * train_ce_on_positive)
    kw = dict(alpha=alpha, detach_positives=detach_positives, train_ce_on_positive=train_ce_on_positive)
    want, want_grad = torch_cringe(logits, targets, feedback, **kw)
    got, got_grad = jax_value_and_grad(logits, targets, feedback, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def test_reference_ct_on_positives_is_a_no_op():
    """The reference's CT on positives (pair target 0 == pad id) changes nothing when CE runs on positives."""
    logits, targets, feedback = make_batch(2)
    quirky, quirky_grad = torch_cringe(logits, targets, feedback, ct_on_positive_parlai_style=True)
    got, got_grad = jax_value_and_grad(logits, targets, feedback)
    np.testing.assert_allclose(got, quirky, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, quirky_grad, rtol=1e-5, atol=1e-5)
    # Without CE on positives, the quirk's only trace is positive tokens in the denominator.
    quirky, _ = torch_cringe(
        logits, targets, feedback, train_ce_on_positive=False, ct_on_positive_parlai_style=True
    )
    got, metrics = cringe_loss(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(feedback), train_ce_on_positive=False
    )
    positive_tokens = float(np.sum((targets != PAD) & (feedback == 1)[:, None]))
    np.testing.assert_allclose(
        float(got) * float(metrics["tokens"]) / (float(metrics["tokens"]) + positive_tokens), quirky, rtol=1e-5
    )


def test_metrics_follow_their_definitions():
    """Metrics: CE/CT means over their tokens, accuracies over counted tokens, pos = positive or unlabeled."""
    logits, targets, feedback = make_batch(3)
    _, m = cringe_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(feedback), alpha=0.5)
    nonpad = targets != PAD
    ce = -np.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    pos = nonpad & (feedback != 0)[:, None]
    neg = nonpad & (feedback == 0)[:, None]
    correct = logits.argmax(-1) == targets
    top2 = np.argsort(-logits, -1)[..., :2]
    best_non_gold = np.where(top2[..., :1] == targets[..., None], top2[..., 1:], top2[..., :1])
    s_plus = np.take_along_axis(logits, best_non_gold, -1)[..., 0]
    ct = np.logaddexp(0.0, np.take_along_axis(logits, targets[..., None], -1)[..., 0] - s_plus)
    want = {
        "ce_loss": ce[pos].mean(),
        "ct_loss": ct[neg].mean(),
        "token_acc": correct[nonpad].mean(),
        "token_acc_pos": correct[pos].mean(),
        "token_acc_neg": correct[neg].mean(),
        "ppl_ce": np.exp(ce[pos].mean()),
        "ppl_pos": np.exp(ce[pos].mean()),
        "ppl_ct": np.exp(ct[neg].mean()),
        "tokens": nonpad.sum(),
        "ce_tokens": pos.sum(),
        "ct_tokens": neg.sum(),
        "pos_tokens": pos.sum(),
        "neg_tokens": neg.sum(),
        "loss": (ce[pos].sum() + 0.5 * ct[neg].sum()) / nonpad.sum(),
    }
    assert set(m) == set(METRIC_KEYS)
    for key, value in want.items():
        assert m[key].dtype == jnp.float32, key
        np.testing.assert_allclose(float(m[key]), value, rtol=1e-5, err_msg=key)


# --- 2. ParlAI's own ContrastiveCrossEntropyLoss, when installed ---------------------


def _parlai_criterion_class():
    from projects.cringe.cringe_loss import ContrastiveCrossEntropyLoss

    return ContrastiveCrossEntropyLoss


@pytest.mark.parlai_projects
@pytest.mark.parametrize(
    "alpha,detach_positives,train_ce_on_positive,train_ct_on_positive",
    [(1.0, False, True, False), (0.37, True, True, False), (0.37, False, False, False), (1.0, False, True, True)],
)
def test_matches_parlai(alpha, detach_positives, train_ce_on_positive, train_ct_on_positive):
    """Loss, gradient and CE/CT metrics equal ParlAI's ContrastiveCrossEntropyLoss + compute_loss reduction (k=1)."""
    criterion_class = _parlai_criterion_class()
    logits, targets, feedback = make_batch(4)
    criterion = criterion_class(
        ct_loss_weight=alpha,
        num_pos_predictions=1,
        detach_positives_during_ct=detach_positives,
        train_ct_on_positive_examples=train_ct_on_positive,
        train_ce_on_positive_examples=train_ce_on_positive,
        ignore_index=PAD,
        reduction="none",
    )
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(targets, dtype=torch.long)
    labels = torch.tensor(feedback, dtype=torch.long)[:, None]
    t = y.shape[1]
    loss, ce, ct, ce_mask, ct_mask = criterion(x.reshape(-1, x.shape[-1]), y.view(-1), labels.repeat(1, t).view(-1))
    # compute_loss's reduction: sum over tokens / tokens with notnull & (ce_mask | ct_mask).
    notnull = y.ne(PAD)
    ce_mask = notnull & ce_mask.view(-1, t).bool()
    ct_mask = notnull & ct_mask.view(-1, t).bool()
    target_tokens = (ce_mask | ct_mask).sum()
    want = loss.sum() / target_tokens
    want.backward()

    kw = dict(alpha=alpha, detach_positives=detach_positives, train_ce_on_positive=train_ce_on_positive)
    got, got_grad = jax_value_and_grad(logits, targets, feedback, **kw)
    _, m = cringe_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(feedback), **kw)
    np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, x.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m["ce_loss"]), (ce.sum() / ce_mask.sum()).item(), rtol=1e-5)
    # CT over negative tokens (the reference's ct_mask also holds positives under train_ct_on_positive).
    negative_tokens = (notnull & labels.eq(0)).sum()
    np.testing.assert_allclose(float(m["ct_loss"]), (ct.sum() / negative_tokens).item(), rtol=1e-5)
    assert float(m["tokens"]) == target_tokens.item()


# --- 3. k > 1: the sampled candidate ------------------------------------------------


@pytest.mark.parametrize("gold_rank", [1, None])
def test_k_candidates_follow_softmax_over_top_k_non_gold(gold_rank):
    """k=4: candidates ~ softmax over the top-4 non-gold logits; never gold, always within the top-5."""
    k, v, draws = 4, 37, 20000
    x = np.random.default_rng(5).normal(size=v).astype(np.float32)
    order = np.argsort(-x)
    gold = int(order[gold_rank]) if gold_rank is not None else int(order[-1])  # inside / outside the top-5
    pool = [int(i) for i in order[: k + 1] if i != gold][:k]
    expected = np.exp(x[pool] - x[pool].max())
    expected /= expected.sum()

    logits, targets = jnp.asarray(x)[None, None], jnp.asarray([[gold]])
    keys = jax.random.split(jax.random.key(0), draws)
    drawn = np.asarray(jax.vmap(lambda r: cringe_candidates(logits, targets, r, k=k))(keys)).ravel()
    assert gold not in drawn
    assert set(drawn.tolist()) <= set(order[: k + 1].tolist())
    freq = np.array([(drawn == c).mean() for c in pool])
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_k_sampled_loss_matches_reference_given_candidates():
    """k=3: the loss equals the reference evaluated on the same drawn candidates, which obey the top-k rule."""
    logits, targets, feedback = make_batch(6)
    rng = jax.random.key(7)
    cand = np.asarray(cringe_candidates(jnp.asarray(logits), jnp.asarray(targets), rng, k=3))
    top4 = np.argsort(-logits, -1)[..., :4]
    assert np.all(cand != targets)
    assert np.all((top4 == cand[..., None]).any(-1))
    want, want_grad = torch_cringe(logits, targets, feedback, alpha=0.5, candidates=cand)
    got, got_grad = jax_value_and_grad(logits, targets, feedback, rng, alpha=0.5, k=3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def test_k1_is_deterministic_and_k_is_validated():
    """k=1 ignores the rng; k>1 without rng, k<1 and k+1 > V are errors."""
    logits, targets, feedback = (jnp.asarray(a) for a in make_batch(0))
    a, _ = cringe_loss(logits, targets, feedback, None)
    b, _ = cringe_loss(logits, targets, feedback, jax.random.key(3))
    assert float(a) == float(b)
    with pytest.raises(ValueError, match="rng"):
        cringe_loss(logits, targets, feedback, None, k=2)
    with pytest.raises(ValueError, match="k must be"):
        cringe_loss(logits, targets, feedback, None, k=0)
    with pytest.raises(ValueError, match="vocabulary"):
        cringe_loss(logits, targets, feedback, jax.random.key(0), k=37)


# --- 4. edge cases -----------------------------------------------------------------


def _finite_grad(fn, logits):
    grad = np.asarray(jax.grad(lambda x: fn(x)[0])(logits), np.float32)
    assert np.all(np.isfinite(grad))
    return grad


def test_no_negatives_is_plain_ce():
    """Without negative examples CRINGE is the mean CE over non-pad tokens, with finite gradients."""
    logits, targets, _ = make_batch(8)
    feedback = jnp.asarray([1, -1, 1, -1, 1])
    x, y = jnp.asarray(logits), jnp.asarray(targets)
    loss, m = cringe_loss(x, y, feedback)
    ce = optax.softmax_cross_entropy_with_integer_labels(x, y)
    np.testing.assert_allclose(float(loss), float(jnp.sum(ce * (y != PAD)) / jnp.sum(y != PAD)), rtol=1e-6)
    assert float(m["ct_tokens"]) == 0 and float(m["ct_loss"]) == 0 and float(m["ppl_ct"]) == 1
    assert float(m["neg_tokens"]) == 0 and float(m["token_acc_neg"]) == 0
    _finite_grad(lambda z: cringe_loss(z, y, feedback), x)


def test_all_negatives_is_alpha_times_mean_ct():
    """With only negatives the loss is alpha * mean CT, CE metrics are empty, gradients finite."""
    logits, targets, _ = make_batch(9)
    feedback = jnp.zeros(5, jnp.int32)
    x, y = jnp.asarray(logits), jnp.asarray(targets)
    loss, m = cringe_loss(x, y, feedback, alpha=0.25)
    np.testing.assert_allclose(float(loss), 0.25 * float(m["ct_loss"]), rtol=1e-6)
    assert float(m["ce_tokens"]) == 0 and float(m["pos_tokens"]) == 0 and float(m["ppl_pos"]) == 1
    assert float(m["ct_tokens"]) == float(jnp.sum(y != PAD))
    _finite_grad(lambda z: cringe_loss(z, y, feedback), x)


def test_all_padding_row_changes_nothing():
    """A row of padding only contributes no loss, no count and no gradient."""
    logits, targets, feedback = make_batch(10)
    padded = targets.copy()
    padded[2] = PAD
    keep = [0, 1, 3, 4]
    full, m_full = cringe_loss(jnp.asarray(logits), jnp.asarray(padded), jnp.asarray(feedback))
    dropped, m_dropped = cringe_loss(jnp.asarray(logits[keep]), jnp.asarray(padded[keep]), jnp.asarray(feedback[keep]))
    np.testing.assert_allclose(float(full), float(dropped), rtol=1e-6)
    for key in METRIC_KEYS:
        np.testing.assert_allclose(float(m_full[key]), float(m_dropped[key]), rtol=1e-6, err_msg=key)
    grad = _finite_grad(lambda z: cringe_loss(z, jnp.asarray(padded), jnp.asarray(feedback)), jnp.asarray(logits))
    assert np.all(grad[2] == 0)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_everything_padding_is_zero_not_nan(name):
    """A batch of padding only: loss 0, every metric finite, zero gradients (for every objective)."""
    logits, _, feedback = make_batch(11)
    x, y, fb = jnp.asarray(logits), jnp.zeros((5, 7), jnp.int32), jnp.asarray(feedback)
    loss, m = objective_loss(name, x, y, fb, jax.random.key(0), k=2)
    assert float(loss) == 0
    assert all(np.isfinite(float(v)) for v in m.values())
    assert np.all(_finite_grad(lambda z: objective_loss(name, z, y, fb, jax.random.key(0), k=2), x) == 0)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_extreme_logits_stay_finite(name):
    """Huge logits (p(gold) = 1 on negatives, or far below the candidates) give finite loss and gradients."""
    logits, targets, feedback = make_batch(12)
    x = np.array(logits)
    np.put_along_axis(x, targets[..., None], 1e4, axis=-1)
    x[0] *= 100.0
    x, y, fb = jnp.asarray(x), jnp.asarray(targets), jnp.asarray(feedback)
    loss, m = objective_loss(name, x, y, fb, jax.random.key(0), k=2)
    assert np.isfinite(float(loss))
    assert all(not np.isnan(float(v)) for v in m.values())
    _finite_grad(lambda z: objective_loss(name, z, y, fb, jax.random.key(0), k=2), x)


# --- 5. baselines ------------------------------------------------------------------


def test_mle_is_optax_mean_over_non_pad():
    """mle = optax integer-label softmax CE averaged over non-pad tokens, whatever the feedback."""
    logits, targets, feedback = make_batch(13)
    x, y = jnp.asarray(logits), jnp.asarray(targets)
    loss, m = objective_loss("mle", x, y, jnp.asarray(feedback))
    ce = optax.softmax_cross_entropy_with_integer_labels(x, y)
    want = jnp.sum(jnp.where(y != PAD, ce, 0)) / jnp.sum(y != PAD)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    assert float(m["ce_tokens"]) == float(jnp.sum(y != PAD)) and float(m["ct_tokens"]) == 0


def test_mle_positive_only_ignores_negatives():
    """mle_positive_only: negative rows' logits change neither loss nor get gradient; it is CE over the rest."""
    logits, targets, feedback = make_batch(14)
    y, fb = jnp.asarray(targets), jnp.asarray(feedback)
    loss, _ = objective_loss("mle_positive_only", jnp.asarray(logits), y, fb)
    other = logits.copy()
    other[feedback == 0] = np.random.default_rng(0).normal(size=other[feedback == 0].shape)
    loss_other, _ = objective_loss("mle_positive_only", jnp.asarray(other), y, fb)
    assert float(loss) == float(loss_other)
    keep = feedback != 0
    want, _ = objective_loss("mle", jnp.asarray(logits[keep]), y[keep], fb[keep])
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    grad = jax.grad(lambda z: objective_loss("mle_positive_only", z, y, fb)[0])(jnp.asarray(logits))
    assert np.all(np.asarray(grad)[feedback == 0] == 0)


def test_unlikelihood_hand_example():
    """unlikelihood on a hand example: (CE(pos) + alpha * -log(1 - p(neg target))) / 2."""
    probs = np.array([0.5, 0.3, 0.2])
    logits = jnp.asarray(np.log(np.stack([probs, probs]))[:, None, :], jnp.float32)  # [2, 1, 3]
    targets = jnp.asarray([[2], [1]])  # positive row says token 2; negative row says token 1
    feedback = jnp.asarray([1, 0])
    loss, m = objective_loss("unlikelihood", logits, targets, feedback, alpha=0.5)
    np.testing.assert_allclose(float(loss), (-np.log(0.2) + 0.5 * -np.log(0.7)) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(m["ct_loss"]), -np.log(0.7), rtol=1e-6)
    np.testing.assert_allclose(float(m["ce_loss"]), -np.log(0.2), rtol=1e-6)


def test_objective_dispatch():
    """objective_loss: same keys everywhere, cringe equals cringe_loss, bad names and options are refused."""
    logits, targets, feedback = (jnp.asarray(a) for a in make_batch(15))
    for name in OBJECTIVES:
        _, m = objective_loss(name, logits, targets, feedback, alpha=0.5, k=1, pad_id=PAD)
        assert tuple(m) == METRIC_KEYS
    a, _ = objective_loss("cringe", logits, targets, feedback, alpha=0.5, detach_positives=True)
    b, _ = cringe_loss(logits, targets, feedback, alpha=0.5, detach_positives=True)
    assert float(a) == float(b)
    with pytest.raises(ValueError, match="cringe, mle, mle_positive_only, unlikelihood"):
        objective_loss("cringey", logits, targets, feedback)
    with pytest.raises(TypeError, match="alhpa"):
        objective_loss("mle", logits, targets, feedback, alhpa=1.0)
    with pytest.raises(ValueError, match="expected logits"):
        cringe_loss(logits, targets[:, :3], feedback)


# --- 6. jit and bf16 -----------------------------------------------------------------


def test_jit_and_bf16():
    """Under jit: f32 equals eager; bf16 logits give the f32 value within bf16 tolerance; jit(grad) works."""
    logits, targets, feedback = make_batch(16)
    y, fb, rng = jnp.asarray(targets), jnp.asarray(feedback), jax.random.key(1)
    fn = jax.jit(lambda x, r: cringe_loss(x, y, fb, r, alpha=0.5, k=2))
    x32 = jnp.asarray(logits)
    x16 = x32.astype(jnp.bfloat16)
    eager, _ = cringe_loss(x32, y, fb, rng, alpha=0.5, k=2)
    jit32, m32 = fn(x32, rng)
    jit16, m16 = fn(x16, rng)
    np.testing.assert_allclose(float(jit32), float(eager), rtol=1e-6)
    assert jit16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m16.values())
    # Exactly the f32 computation on the rounded logits, and close to the unrounded one.
    np.testing.assert_allclose(float(jit16), float(fn(x16.astype(jnp.float32), rng)[0]), rtol=1e-6)
    np.testing.assert_allclose(float(jit16), float(jit32), rtol=2e-2, atol=2e-2)
    grad_fn = jax.jit(jax.grad(lambda x: cringe_loss(x, y, fb, None, alpha=0.5)[0]))
    g16, g32 = grad_fn(x16), grad_fn(x32)
    assert g16.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g16, np.float32)))
    np.testing.assert_allclose(np.asarray(g16, np.float32), np.asarray(g32), atol=1e-2)


def test_sharded_inputs_match_unsharded():
    """On a 2x2 CPU mesh (batch over data, vocab over tensor) jit(value_and_grad) equals the unsharded result."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from bb3x_jax.cringe import cringe_loss
        r = np.random.default_rng(0)
        x = jnp.asarray(r.normal(size=(4, 6, 40)), jnp.float32)
        y = jnp.asarray(r.integers(1, 40, size=(4, 6)), jnp.int32).at[1, 3:].set(0)
        fb = jnp.asarray([1, 0, -1, 0], jnp.int32)
        f = jax.jit(jax.value_and_grad(lambda x, y, fb: cringe_loss(x, y, fb, jax.random.key(0), k=3)[0]))
        want = f(x, y, fb)
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tensor"))
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        got = f(put(x, P("data", None, "tensor")), put(y, P("data")), put(fb, P("data")))
        np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=1e-6)
        print("SHARDED_OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", script]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "SHARDED_OK" in done.stdout, done.stderr[-3000:]


def test_module_docstring_carries_the_math():
    """The module docstring states the CRINGE formula and the reduction, for newcomers."""
    doc = cringe.__doc__
    for phrase in ("softplus(s- - s+)", "top", "denominator", "train_ct_on_positive_examples"):
        assert phrase in doc, phrase


def torch_anchor_kl(logits, anchor_logits, targets, feedback, pad_id=PAD, direction="forward"):
    """KL(anchor || model) (forward) or KL(model || anchor) (reverse) per position in float64
    PyTorch, the bad token of negative examples sliced out of both distributions before the
    softmax; returns (kl [B, T], grad of its sum)."""
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(anchor_logits, dtype=torch.float64)
    b, t, v = x.shape
    kls = [[x.new_zeros(()) for _ in range(t)] for _ in range(b)]
    for i in range(b):
        for j in range(t):
            y = int(targets[i, j])
            if y == pad_id:
                continue
            keep = [w for w in range(v) if not (feedback[i] == 0 and w == y)]
            log_r, log_x = F.log_softmax(r[i, j, keep], -1), F.log_softmax(x[i, j, keep], -1)
            if direction == "reverse":
                log_r, log_x = log_x, log_r
            kls[i][j] = torch.sum(log_r.exp() * (log_r - log_x))
    kl = torch.stack([torch.stack(row) for row in kls])
    kl.sum().backward()
    return kl.detach().numpy(), x.grad.numpy()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_anchor_kl_matches_pytorch_and_leaves_the_bad_token_alone(direction):
    """anchor_kl's value and gradient equal the KL of the renormalised distributions without the bad
    token (negatives) or over the whole vocabulary (others); padding gets 0; the bad token's own logit
    gets no gradient, so the anchor never resists what the negative term pushes down."""
    logits, targets, feedback = make_batch(seed=3)
    anchor = logits + np.random.default_rng(4).normal(scale=1.0, size=logits.shape).astype(np.float32)
    kl, covered = cringe.anchor_kl(jnp.asarray(logits), jnp.asarray(anchor), jnp.asarray(targets),
                                   jnp.asarray(feedback), direction=direction)
    grad = jax.grad(lambda x: jnp.sum(cringe.anchor_kl(x, jnp.asarray(anchor), jnp.asarray(targets),
                                                       jnp.asarray(feedback), direction=direction)[0]))(
        jnp.asarray(logits))
    want_kl, want_grad = torch_anchor_kl(logits, anchor, targets, feedback, direction=direction)
    np.testing.assert_allclose(np.asarray(kl), want_kl, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(covered), targets != PAD)
    bi, ti = np.nonzero((feedback[:, None] == 0) & (targets != PAD))
    assert len(bi) and np.all(np.asarray(grad)[bi, ti, targets[bi, ti]] == 0.0)
    assert np.all(np.asarray(kl)[targets == PAD] == 0.0)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_anchor_kl_is_zero_at_the_anchor_and_finite_when_the_anchor_is_certain(direction):
    """Equal logits give KL 0 and gradient 0; an anchor that put all its mass on the bad token (a beam
    search's negative) still gives finite values: the remaining distribution is well defined."""
    logits, targets, feedback = make_batch(seed=5)
    x, y, f = jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(feedback)
    kl, _ = cringe.anchor_kl(x, x, y, f, direction=direction)
    grad = jax.grad(lambda z: jnp.sum(cringe.anchor_kl(z, x, y, f, direction=direction)[0]))(x)
    np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-6)
    certain = np.array(logits)
    bi, ti = np.nonzero(targets != PAD)
    certain[bi, ti, targets[bi, ti]] = 200.0
    kl, _ = cringe.anchor_kl(x, jnp.asarray(certain), y, f, direction=direction)
    grad = jax.grad(lambda z: jnp.sum(cringe.anchor_kl(z, jnp.asarray(certain), y, f, direction=direction)[0]))(x)
    assert np.isfinite(np.asarray(kl)).all() and np.isfinite(np.asarray(grad)).all()
