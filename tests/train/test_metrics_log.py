"""The loss plot: a PNG of the logged curves, drawn without touching the caller's matplotlib
backend (training can run inside a notebook that has its own)."""

from __future__ import annotations

import os

import pytest

from bb3x_jax.train import metrics_log
from tests import plotted_under_another_backend


def test_plot_writes_a_png_and_leaves_the_callers_backend_alone(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"kind": "train", "step": s, "loss": 3.0 / s, "ce_loss": 2.0 / s, "ct_loss": 1.0 / s} for s in (1, 2, 3)]
    records += [{"kind": "valid", "step": 3, "ppl_positive": 20.0, "ppl_negative": 40.0, "ppl_unlabeled": None}]
    path = plotted_under_another_backend(metrics_log.plot_curves, records, str(tmp_path / "curves.png"), title="run")
    assert path == str(tmp_path / "curves.png") and os.path.getsize(path) > 1000
