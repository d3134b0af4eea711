"""benchmarks/serve_latency.py --tiny: it serves real users and its numbers agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "serve_latency.py")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The smoke run's JSON lines and its wall time. A 50 ms batch window makes the concurrent users'
    requests meet in one batch even on a loaded machine."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, SCRIPT, "--tiny", "--batch-wait-ms", "50",
                             "--workdir", str(tmp_path_factory.mktemp("serve_latency"))],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return lines, elapsed


def test_one_line_per_concurrency_level(tiny_run):
    lines, _ = tiny_run
    assert [line["users"] for line in lines] == [1, 4]
    for line in lines:
        assert line["preset"] == "tiny" and line["params"] > 0
        assert line["max_batch"] == 4
        assert line["generation"]["method"] == "greedy" and line["generation"]["max_len"] == 8
        assert set(line["search_s_by_batch"]) == {"1", "2", "4"}


def test_numbers_agree(tiny_run):
    lines, elapsed = tiny_run
    for line in lines:
        assert line["replies"] == line["users"] * line["messages_per_user"]
        assert 0 < line["p50_s"] <= line["p95_s"]
        assert 0 < line["wall_s"] < elapsed
        assert line["replies_per_s"] == pytest.approx(line["replies"] / line["wall_s"], rel=0.01)
        # each user's messages are sequential, so the wall time holds at least one user's sum of latencies
        assert line["wall_s"] >= 0.99 * line["mean_s"] * line["messages_per_user"]
        assert line["batches"] * line["mean_batch"] == pytest.approx(line["replies"], rel=1e-3)
        assert 1 <= line["mean_batch"] <= line["max_batch"]
        if line["users"] > 1:
            assert line["mean_batch"] > 1, "concurrent users' requests were never batched together"
        else:
            assert line["mean_batch"] == 1
