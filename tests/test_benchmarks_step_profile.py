"""benchmarks/step_profile.py: the trace of the real step is read, every executed op lands in one
(phase, kind) group, and the matmuls of both passes are found."""

from __future__ import annotations

import pytest

from tests import benchmark_scripts


@pytest.fixture(scope="module")
def records():
    return benchmark_scripts.load("step_profile").main(["--tiny", "--top", "3"])


def test_groups_cover_both_passes_and_the_update(records):
    """Forward and backward matmuls, the update and the dropout masks' random bits each have a group with
    time in it; phases and kinds come from the documented sets."""
    groups = {(r["phase"], r["kind"]): r for r in records if "phase" in r}
    assert {phase for phase, _ in groups} == {"forward", "backward", "update"}
    assert {kind for _, kind in groups} <= {"matmul", "dropout rng", "copy/transpose", "elementwise"}
    for key in [("forward", "matmul"), ("backward", "matmul"), ("update", "elementwise"), ("forward", "dropout rng")]:
        assert groups[key]["ms_per_step"] > 0 and groups[key]["ops"] > 0, key


def test_total_line_adds_up(records):
    """The groups sum to the profiled time per step; the top ops are the slowest singles, slowest first."""
    *rest, total = records
    groups = [r for r in rest if "phase" in r]
    tops = [r for r in rest if "op" in r]
    assert total["model"] == "tiny" and total["step_s_median"] > 0
    assert sum(g["ms_per_step"] for g in groups) == pytest.approx(total["profiled_ms_per_step"], abs=0.2)
    assert len(tops) == 3 and [t["ms_per_step"] for t in tops] == sorted((t["ms_per_step"] for t in tops),
                                                                         reverse=True)
