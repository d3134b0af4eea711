"""--mode=plan: memory and FLOPs of the real train step from abstract shapes, on simulated devices.

The two plans of BB3-30B (30B parameters: 360 GB of float32 parameters and
Adam moments) run as main.py subprocesses, side by side, because the
simulated device count must be set before JAX starts. A decoder-only model
compiles faster than a small encoder-decoder one, and its size proves that
nothing is allocated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from bb3x_jax import config as config_lib
from bb3x_jax.modes import plan
from configs import cringe as cringe_config
from tests import REPO

SHAPES = ("--config.model.preset=bb3_30b", "--config.model.dtype=bfloat16", "--config.bench.batch=8",
          "--config.bench.context=32", "--config.bench.label=16", "--config.mesh.data=1")


def _start(workdir, *overrides):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the plan sets the device count itself
    env.pop("JAX_PLATFORMS", None)
    cmd = [sys.executable, "main.py", "--config", "configs/cringe.py", "--mode=plan", f"--workdir={workdir}",
           *SHAPES, *overrides]
    out = open(os.path.join(workdir, "stdout"), "w")
    err = open(os.path.join(workdir, "stderr"), "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err), out, err


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """{fsdp: (json line, stdout, peak RSS bytes)} of bb3_30b on 1 device (16 GB) and on 8 (200 GB each)."""
    runs = {}
    for fsdp, memory_gb in ((1, 16), (8, 200)):
        workdir = str(tmp_path_factory.mktemp(f"plan_fsdp{fsdp}"))
        runs[fsdp] = (workdir, *_start(workdir, f"--config.mesh.fsdp={fsdp}",
                                       f"--config.plan.device_memory_gb={memory_gb}"))
    results = {}
    for fsdp, (workdir, proc, out, err) in runs.items():
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.close(), err.close()
        stdout = open(os.path.join(workdir, "stdout")).read()
        assert proc.returncode == 0, open(os.path.join(workdir, "stderr")).read()[-3000:]
        line = [line for line in stdout.splitlines() if line.startswith("{")][-1]
        with open(os.path.join(workdir, "plan.json")) as f:
            assert json.load(f) == json.loads(line)
        results[fsdp] = (json.loads(line), stdout, usage.ru_maxrss * 1024)
    return results


def test_plan_reports_every_promised_figure(plans):
    """One JSON line (also plan.json) and a table name the mesh, shapes, dtype, remat, parameter count,
    per-device memory and FLOPs, with plausible values."""
    result, stdout, _ = plans[8]
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and result["devices"] == 8
    assert (result["preset"], result["dtype"], result["param_dtype"], result["remat"]) == \
        ("bb3_30b", "bfloat16", "float32", "none")
    assert (result["batch"], result["batch_per_shard"], result["context"], result["label"]) == (8, 1, 32, 16)
    assert 29e9 < result["params"] < 31e9 and result["scan_layers"] is True
    for key in ("argument_bytes_per_device", "temp_bytes_per_device", "output_bytes_per_device",
                "alias_bytes_per_device", "total_bytes_per_device", "xla_flops_per_device"):
        assert result[key] > 0, key
    # Adam's two moments are float32 like the parameters, placed like them.
    assert result["opt_state_bytes_per_device"] == pytest.approx(2 * result["params_bytes_per_device"], rel=1e-3)
    assert result["total_bytes_per_device"] >= result["argument_bytes_per_device"] + result["temp_bytes_per_device"]
    assert result["state_layout_kept"]  # the step returns the state placed as planned: one compile, steady state
    for label in ("arguments / device", "temporaries / device", "total / device", "model FLOPs / step", "mesh"):
        assert label in stdout


def test_fsdp_divides_the_arguments_by_the_shard_count(plans):
    """Parameters and optimizer state are sharded over fsdp: 8 devices each hold about 1/8 of what one
    device holds (a few replicated biases and counters aside), and the arguments are those bytes."""
    one, eight = plans[1][0], plans[8][0]
    for result in (one, eight):
        state = result["params_bytes_per_device"] + result["opt_state_bytes_per_device"]
        assert result["argument_bytes_per_device"] == pytest.approx(state, rel=0.01)
    assert one["params_bytes_per_device"] == pytest.approx(4 * one["params"], rel=1e-6)  # float32, unsharded
    assert eight["argument_bytes_per_device"] / one["argument_bytes_per_device"] == pytest.approx(1 / 8, rel=0.05)


def test_flops_agree_with_the_architecture_formula(plans):
    """The matmul FLOPs of the traced step (every scanned layer counted) are within 10% of bench's
    formula, which counts the same step independently of the sharding."""
    for result, _, _ in plans.values():
        assert result["program_flops_per_step"] == pytest.approx(result["model_flops_per_step"], rel=0.10)
    assert plans[1][0]["program_flops_per_step"] == plans[8][0]["program_flops_per_step"]


def test_no_weights_are_allocated(plans):
    """Planning 30B float32 parameters with their Adam moments (360 GB of arguments, 15 times this
    machine's memory) keeps the process under 8 GB: the state is shapes only. (One stacked
    projection of bb3_30b alone, 48 x 7168 x 7168 floats, is 9.9 GB; peaks seen: 1-3 GB on the
    development machine, 4.3 GB in a fresh CI environment, where XLA's compile takes more.)"""
    result, _, rss = plans[1]
    assert result["argument_bytes_per_device"] > 300e9
    assert rss < 8e9, f"peak RSS {rss / 1e9:.1f} GB"


def test_fits_compares_the_total_with_the_device_memory(plans):
    """The verdict is total per-device bytes against plan.device_memory_gb (10^9 bytes)."""
    for result, stdout, _ in plans.values():
        assert result["fits"] == (result["total_bytes_per_device"] <= result["device_memory_gb"] * 1e9)
        assert ("does not fit" in stdout) == (not result["fits"])
    assert plans[1][0]["fits"] is False and plans[8][0]["fits"] is True


_SAME_STATE = """
import json, jax
jax.config.update("jax_num_cpu_devices", 8)
from bb3x_jax.modes import plan
from bb3x_jax.train import runtime as setup_lib
from configs import cringe
config = cringe.get_config()
config.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
config.model.update({"preset": "tiny", "scan_layers": True})
real = setup_lib.Setup(config, "unused", with_data=False)
_, abstract = plan.abstract_state(plan.planned_model(config), real.tx, config.seed, real.mesh)
leaves = lambda t: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
r, a = leaves(real.state), leaves(abstract)
print(json.dumps({"leaves": len(r), "missing": sorted(set(r) ^ set(a)), "different": [
    k for k in set(r) & set(a) if (r[k].shape, r[k].dtype) != (a[k].shape, a[k].dtype)
    or not r[k].sharding.is_equivalent_to(a[k].sharding, r[k].ndim)]}))
"""


def test_abstract_state_is_the_runs_state():
    """The plan's shapes-only state has exactly the leaves, shapes, dtypes and shardings of the state
    a run builds (Setup: real weights, step.init_state), on a (2, 2, 2) mesh: the plan sizes the real run."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _SAME_STATE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["leaves"] > 100 and result["missing"] == [] and result["different"] == []


def test_device_count_follows_the_mesh_or_plan_devices():
    """0 devices: the product of the explicit mesh sizes; plan.devices fills the -1 axis, and must
    match a mesh without one (the error names the key)."""
    config = cringe_config.get_config()
    config.mesh.update({"data": -1, "fsdp": 4, "tensor": 2})
    assert plan.device_count(config) == 8
    config.plan.devices = 64
    assert plan.device_count(config) == 64
    config.mesh.data = 2
    with pytest.raises(config_lib.ConfigError, match="config.plan.devices"):
        plan.device_count(config)
    config.plan.devices = -1
    with pytest.raises(config_lib.ConfigError, match="config.plan.devices"):
        config_lib.validate(config)


def test_started_backend_with_too_few_devices_says_what_to_set():
    """Once JAX runs with fewer CPU devices than the plan needs, the error names the XLA flag to set."""
    jax.devices()
    needed = len(jax.devices("cpu")) + 1
    with pytest.raises(RuntimeError, match=f"xla_force_host_platform_device_count={needed}"):
        plan.simulated_devices(needed)
