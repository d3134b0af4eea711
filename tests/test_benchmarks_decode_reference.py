"""benchmarks/decode_reference.py: both frameworks decode the same weights to the same tokens, and every
record the script prints is complete."""

from __future__ import annotations

import pytest

from tests import benchmark_scripts


@pytest.fixture(scope="module")
def bench():
    return benchmark_scripts.load("decode_reference")


@pytest.fixture(scope="module")
def records(bench):
    return bench.main(["--tiny", "--threads", "1", "2"])


def test_greedy_agrees_with_transformers(records):
    """Greedy search on the same float32 weights gives transformers' tokens, every position: the speed is
    compared on equal work, and the exporter and the decoder agree."""
    (greedy,) = [r for r in records if r.get("check") == "agreement" and r["method"] == "greedy"]
    assert greedy["token_match"] == 1.0 and greedy["rows_equal"] == greedy["rows"] == 2


def test_beam_mostly_agrees_with_transformers(records):
    """Beam search agrees on most tokens (a near tie may flip a beam, so not on all)."""
    (beam,) = [r for r in records if r.get("check") == "agreement" and r["method"] == "beam"]
    assert beam["beams"] == 2 and beam["token_match"] >= 0.5


def test_one_timing_per_framework_method_and_thread_count(records):
    """Each method has a bb3x-jax line and one transformers line per --threads count, with positive
    speeds, and the speedup relates the two medians."""
    timings = [r for r in records if "framework" in r]
    assert sorted((r["method"], r["framework"], r["threads"] or 0) for r in timings) == [
        ("beam", "bb3x-jax", 0), ("beam", "transformers", 1), ("beam", "transformers", 2),
        ("greedy", "bb3x-jax", 0), ("greedy", "transformers", 1), ("greedy", "transformers", 2)]
    for method in ("greedy", "beam"):
        ours = next(r for r in timings if r["method"] == method and r["framework"] == "bb3x-jax")
        ref = next(r for r in timings if r["method"] == method and r["threads"] == 1)
        assert ours["new_tokens_per_s"] > 0 and ref["new_tokens_per_s"] > 0
        assert ours["bb3x_jax_speedup"] == pytest.approx(ref["s_median"] / ours["s_median"], rel=0.01)
        assert ours["new_tokens"] == 6 and ours["batch"] == 2


def test_bad_flags_are_refused(bench):
    """A beam of one is greedy search, not a beam benchmark: refused with a usage error."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--beams", "1"])
