"""benchmarks/gpu_check.sh: its CPU dry run prints every measurement, and one failure never stops the rest."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import pytest

from tests import REPO, benchmark_scripts

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
COMMON_KEYS = ("measurement", "framework", "device", "dry_run", "model", "encoder_layers", "decoder_layers",
               "d_model", "n_heads", "ffn_dim", "vocab_size", "dtype", "batch", "context", "label", "step_s_median",
               "tokens_per_s", "mfu")
EXPECTED = [("device", None), ("train_step", "jax"), ("train_step", "torch"), ("decode", "jax"), ("decode", "torch")]


@pytest.fixture(scope="module")
def gpu_check():
    return benchmark_scripts.load("gpu_check")


@pytest.fixture(scope="module")
def dry_run():
    """The dry run's stdout lines, its exit status and wall time (mostly compiling the JAX step)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    result = subprocess.run(["bash", SCRIPT, "--cpu-dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    return result, time.perf_counter() - start


@pytest.mark.slow
def test_dry_run_prints_every_measurement(dry_run):
    """Only JSON lines on stdout, one per measurement in order, with the same leading keys and no error."""
    result, _ = dry_run
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # anything else on stdout fails here
    assert [(line["measurement"], line["framework"]) for line in lines] == EXPECTED
    assert all("error" not in line and line["dry_run"] is True for line in lines)
    device = lines[0]
    assert device["jax_device_kind"] == "cpu" and device["torch_device_name"] == "cpu"
    assert device["jax_version"] and device["torch_version"] and device["transformers_version"]
    for line in lines[1:]:
        assert set(COMMON_KEYS) <= set(line), set(COMMON_KEYS) - set(line)


@pytest.mark.slow
def test_dry_run_numbers_are_finite_and_positive(dry_run):
    result, _ = dry_run
    for line in map(json.loads, result.stdout.splitlines()[1:]):
        for key in ("step_s_median", "tokens_per_s", "params", "encoder_layers", "decoder_layers", "batch"):
            assert isinstance(line[key], (int, float)) and math.isfinite(line[key]) and line[key] > 0, (key, line)
        assert line["mfu"] is None  # no peak for CPUs
        if line["measurement"] == "train_step":
            assert line["model_tflops_per_s"] > 0 and math.isfinite(line["loss"])
            assert line["tokens_per_s"] * line["step_s_median"] == pytest.approx(
                line["batch"] * (line["context"] + line["label"]))
        else:
            assert line["tokens_per_s"] * line["step_s_median"] == pytest.approx(line["batch"] * line["decode_len"])
    params = {line["params"] for line in map(json.loads, result.stdout.splitlines()[1:])}
    assert len(params) == 1, "both frameworks must build the same model"


def test_peak_table(gpu_check):
    peak = gpu_check.peak_bf16_flops
    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == peak("NVIDIA GH200 480GB") == 989e12
    assert peak("NVIDIA H100 PCIe") == 756e12 and peak("NVIDIA H200 NVL") == 835e12
    assert peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak("cpu") is None and peak("NVIDIA GeForce RTX 4090") is None


def test_measure_reports_crashes_and_timeouts(gpu_check):
    """A child without a result line, or one past its time, becomes a reason, never an exception."""
    env = dict(os.environ)
    crash = gpu_check.measure("decode/jax", [sys.executable, "-c", "import sys; sys.exit(3)"], env, 60)
    assert crash.startswith("exit status 3")
    slow = gpu_check.measure("decode/jax", [sys.executable, "-c", "import time; time.sleep(30)"], env, 1)
    assert slow == "timed out after 1 s"
    line = gpu_check.measure("decode/jax", [sys.executable, "-c", "print('noise'); print('{\"a\": 1}')"], env, 60)
    assert line == {"a": 1}


def _fake_measure(gpu_check, args, fails: dict[str, str], oom_above: int):
    """measure() without processes: train steps above ``oom_above`` layers run out of memory."""

    def measure(key, command, env, timeout_s):
        layers = int(command[command.index("--layers", command.index("--child")) + 1])
        measurement, _, framework = key.partition("/")
        if key in fails:
            return fails[key]
        if measurement == "train_step" and layers > oom_above:
            return gpu_check.record(measurement, framework, args, error="RESOURCE_EXHAUSTED: Out of memory")
        return gpu_check.record(measurement, framework or None, argparse.Namespace(**{**vars(args), "layers": layers}),
                                step_s_median=0.5, tokens_per_s=100.0)

    return measure


def test_out_of_memory_halves_the_layers(gpu_check, monkeypatch, capsys):
    """The JAX step retries at half the depth; the PyTorch step starts from the depth JAX fitted."""
    args = gpu_check.parse_args(["--layers", "22"])
    monkeypatch.setattr(gpu_check, "measure", _fake_measure(gpu_check, args, {}, oom_above=6))
    assert gpu_check.drive(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    jax_train, torch_train = lines[1], lines[2]
    assert jax_train["encoder_layers"] == 5 and jax_train["out_of_memory_at_layers"] == [22, 11]
    assert torch_train["encoder_layers"] == 5 and "out_of_memory_at_layers" not in torch_train
    assert lines[3]["encoder_layers"] == 22  # decoding keeps the requested depth


def test_a_failure_prints_an_error_line_and_the_rest_still_run(gpu_check, monkeypatch, capsys):
    args = gpu_check.parse_args(["--layers", "4"])
    fails = {"train_step/torch": "exit status -9 without a result line (see stderr)"}
    monkeypatch.setattr(gpu_check, "measure", _fake_measure(gpu_check, args, fails, oom_above=99))
    assert gpu_check.drive(args) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["measurement"], line["framework"]) for line in lines] == EXPECTED
    assert [line.get("error") for line in lines] == [None, None, fails["train_step/torch"], None, None]
