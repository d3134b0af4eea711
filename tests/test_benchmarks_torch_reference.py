"""benchmarks/torch_reference.py: its CRINGE equals ours, and it runs a few steps of each model kind."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bb3x_jax.cringe import cringe_loss
from tests import benchmark_scripts


@pytest.fixture(scope="module")
def bench():
    return benchmark_scripts.load("torch_reference")


def _batch(seed=0, b=6, t=9, v=41, pad_id=0):
    """Logits with the gold token often in the top 2, padded rows, all three feedback classes."""
    r = np.random.default_rng(seed)
    logits = r.normal(scale=2.0, size=(b, t, v)).astype(np.float32)
    targets = r.integers(3, v, size=(b, t))
    bi, ti = np.nonzero(r.random((b, t)) < 0.5)
    logits[bi, ti, targets[bi, ti]] += 4.0
    targets[1, 4:] = pad_id
    targets[2, 7:] = pad_id
    return logits, targets.astype(np.int32), np.array([1, 0, -1, 0, 1, 0], np.int32)


@pytest.mark.parametrize("pad_id", [0, 1])
def test_cringe_equals_ours(bench, pad_id):
    """The script's torch CRINGE has bb3x_jax.cringe.cringe_loss's value and gradient (1e-5)."""
    logits, targets, feedback = _batch(pad_id, pad_id=pad_id)
    want = cringe_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(feedback), pad_id=pad_id)[0]
    x = torch.tensor(logits, requires_grad=True)
    got = bench.cringe_loss(x, torch.tensor(targets, dtype=torch.long), torch.tensor(feedback), pad_id=pad_id)
    got.backward()
    np.testing.assert_allclose(got.item(), float(want), rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda z: cringe_loss(z, jnp.asarray(targets), jnp.asarray(feedback), pad_id=pad_id)[0])(
        jnp.asarray(logits)
    )
    np.testing.assert_allclose(x.grad.numpy(), np.asarray(grad), rtol=1e-5, atol=1e-6)


@pytest.mark.parlai_projects
def test_parlai_criterion_equals_ours(bench):
    """The parlai backend's loss (ParlAI's ContrastiveCrossEntropyLoss + its reduction) equals ours."""
    logits, targets, feedback = _batch(3)
    want = cringe_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(feedback))[0]
    got = bench.parlai_loss("cringe")(torch.tensor(logits), torch.tensor(targets, dtype=torch.long),
                                      torch.tensor(feedback, dtype=torch.long))
    np.testing.assert_allclose(got.item(), float(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model, backend, objective",
    [("tiny", "hf", "cringe"), ("tiny_opt", "hf", "cringe")]
    # ParlAI's models come with its wheel; its CRINGE criterion only with projects/.
    + [pytest.param(m, "parlai", "mle", marks=pytest.mark.parlai) for m in ("tiny", "tiny_opt")]
    + [pytest.param(m, "parlai", "cringe", marks=pytest.mark.parlai_projects) for m in ("tiny", "tiny_opt")],
)
def test_runs_and_prints_one_json_line(bench, capsys, model, backend, objective):
    """Two timed steps on a tiny model print one JSON line with the documented fields."""
    bench.main(["--model", model, "--backend", backend, "--objective", objective, "--steps", "2", "--warmup", "1",
                "--batch", "4", "--context", "12", "--label", "6", "--threads", "1"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ("backend", "model", "objective", "batch", "context", "label", "params", "step_s_median",
                "step_s_mean", "tokens_per_s", "label_tokens_per_s", "threads", "torch_version"):  # fmt: skip
        assert key in out, key
    assert (out["backend"], out["model"], out["objective"], out["threads"]) == (backend, model, objective, 1)
    assert out["tokens_per_s"] == pytest.approx(4 * 18 / out["step_s_median"], rel=1e-3)
    assert np.isfinite(out["loss_first"]) and np.isfinite(out["loss_last"])


class _SteadyClock:
    """A perf_counter whose every call is ``tick`` seconds after the previous one: each timed
    step then measures exactly ``tick``, however fast the machine really is."""

    def __init__(self, tick):
        self.tick, self.now = tick, 0.0

    def __call__(self):
        self.now += self.tick
        return self.now


@pytest.mark.parametrize("step_s", [3.7e-7, 3.8e-3, 0.1234567, 41.0])
def test_printed_figures_agree_at_any_speed(bench, capsys, monkeypatch, step_s):
    """Step time and tokens/s in the JSON line agree to 1e-3 whether a step takes microseconds or
    a minute (a fixed number of decimals once broke the relation on a fast machine)."""
    monkeypatch.setattr(bench.time, "perf_counter", _SteadyClock(step_s))
    bench.main(["--model", "tiny", "--steps", "2", "--warmup", "0", "--batch", "4", "--context", "12", "--label", "6",
                "--threads", "1"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["step_s_median"] == pytest.approx(step_s, rel=1e-3)
    assert out["tokens_per_s"] == pytest.approx(4 * 18 / out["step_s_median"], rel=1e-3)
    assert out["label_tokens_per_s"] == pytest.approx(4 * 6 / out["step_s_median"], rel=1e-3)
