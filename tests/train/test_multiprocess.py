"""main.py --mode=train as a real multi-process JAX job, against one process with the same devices.

Two processes on 127.0.0.1, each with 4 simulated CPU devices, join through
``jax.distributed.initialize`` (coordinator on a free port; CPU collectives over
gloo, JAX's default) and train on a (data 1, fsdp 4, tensor 2) mesh of the 8
global devices: every parameter is split over both processes, so each process
reads only its rows of every batch and writes only its shards of every orbax
checkpoint. With several buckets they also agree on every batch's shapes. The
reference is one process with 8 devices and the same mesh and config (test_loop's
tiny run, with two buckets per length).

Cross-process reductions (gloo's ring) add in another order than one process
does, so the two topologies agree to float32 round-off, not to the bit. The
attention key biases are the exception that proves it: their gradient is zero
in exact arithmetic (softmax ignores a shift of all scores), Adam turns the
round-off into learning-rate-sized steps, and they end up as unrelated values
of order lr * steps in both runs; they are checked for that, the rest to 1e-5.

Gloo connects the processes of each device group at its first collective and
gives up when they arrive more than 30 s apart; the processes of a job start
together and compile the same step at the same time, which keeps them closer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.modes.test_train import REPO, RUN_FLAGS, SLOW_STEPS, STEPS, train_records

# Slow: 4 jobs, each compiling the step. Exclusive: a test beside it on the same cores could hold one
# process back past gloo's 30 s rendezvous.
pytestmark = [pytest.mark.slow, pytest.mark.exclusive]

MESH = ("--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2")
# Several buckets: the processes must agree on each batch's shapes (pipeline.jax_length_sync).
# With this data they need to: at step 7 process 0's label rows fit 16 tokens, process 1's need 32.
BUCKETS = ("--config.data.context_buckets=(64,128)", "--config.data.label_buckets=(16,32)")
FLAGS = tuple(f for f in RUN_FLAGS if "_buckets=" not in f) + BUCKETS + MESH
JOB_TIMEOUT_S = 1200
LEARNING_RATE = 1e-3  # configs/cringe.py's train.learning_rate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """``main.py --mode=train`` in ``processes`` processes that share one workdir and 8 CPU devices.

    Output goes to files (a full pipe would block a child); every child leads its
    own process group, so a failed or timed-out job is killed with its helpers.
    """

    def __init__(self, workdir: str, *, processes: int, logs: str, **extra_env: str):
        os.makedirs(logs, exist_ok=True)
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}", **extra_env)
        # No persistent compilation cache: only process 0 would load the step from it, the
        # other compiling far longer, beyond gloo's 30 s rendezvous (see the module docstring).
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        command = [sys.executable, "main.py", "--config", "configs/cringe.py", f"--workdir={workdir}",
                   "--mode=train", *FLAGS]
        if processes > 1:
            command += ["--config.distributed.enabled=True",
                        f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
                        f"--config.distributed.num_processes={processes}"]
        self.workdir, self.procs, self.outputs = workdir, [], []
        try:
            for i in range(processes):
                out = (os.path.join(logs, f"p{i}.out"), os.path.join(logs, f"p{i}.err"))
                flags = [f"--config.distributed.process_id={i}"] if processes > 1 else []
                with open(out[0], "w") as stdout, open(out[1], "w") as stderr:
                    self.procs.append(subprocess.Popen(command + flags, cwd=REPO, env=env, stdout=stdout,
                                                       stderr=stderr, start_new_session=True))
                self.outputs.append(out)
        except BaseException:
            self.kill()
            raise

    def stdout(self, i: int) -> str:
        return open(self.outputs[i][0]).read()

    def stderr(self, i: int) -> str:
        return open(self.outputs[i][1]).read()

    def report(self) -> str:
        return "\n".join(f"--- process {i} (status {p.returncode}) stderr tail:\n{self.stderr(i)[-3000:]}"
                         for i, p in enumerate(self.procs))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> list[int]:
        """Exit statuses; on timeout every process is killed and the test fails with their stderr."""
        deadline = time.time() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                if time.time() > deadline:
                    raise AssertionError(f"job in {self.workdir} timed out after {timeout} s\n{self.report()}")
                time.sleep(0.2)
        finally:
            self.kill()  # no-op once all have exited; never leave a child behind
        return [p.returncode for p in self.procs]

    def wait_ok(self) -> Job:
        codes = self.wait()
        assert codes == [0] * len(self.procs), f"job in {self.workdir} failed: {codes}\n{self.report()}"
        return self


def final_params(workdir: str) -> dict[str, np.ndarray]:
    """The step-STEPS parameters by path, read on this process's one device through
    ``checkpoint.read_params`` (whatever mesh and process count wrote them)."""
    import jax
    from flax import nnx

    from bb3x_jax.model import build
    from bb3x_jax.model.formats import orbax as orbax_io
    from bb3x_jax.train import checkpoint as checkpoint_lib

    directory = os.path.join(workdir, "checkpoints")
    meta = json.load(open(os.path.join(directory, str(STEPS), "meta", "metadata")))
    cfg = orbax_io.model_config_from_dict(meta["model_config"])
    abstract = nnx.state(nnx.eval_shape(lambda: build.construct(cfg, 0)), nnx.Param)
    params, meta = checkpoint_lib.read_params(directory, abstract, STEPS)
    assert meta["step"] == STEPS
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_params_close(reference: dict, other: dict) -> float:
    """Every parameter within 1e-5 (key biases: both at round-off scale); returns the largest difference."""
    assert reference.keys() == other.keys()
    worst = 0.0
    for key, a in reference.items():
        b = other[key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if "k_lin']['bias" in key:
            bound = STEPS * LEARNING_RATE  # Adam moves a zero-gradient parameter at most ~lr per step
            assert np.abs(a).max() < bound and np.abs(b).max() < bound, key
            continue
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=key)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def assert_records_close(reference: list[dict], other: list[dict]) -> None:
    assert [(r["kind"], r["step"]) for r in other] == [(r["kind"], r["step"]) for r in reference]
    for a, b in zip(reference, other):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a["kind"], a["step"], key)
            else:
                assert b[key] == value, (a["kind"], a["step"], key)


def checkpoint_writers(workdir: str, step: int) -> list[str]:
    return sorted(f for f in os.listdir(os.path.join(workdir, "checkpoints", str(step), "params"))
                  if f.startswith("ocdbt.process_"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(one process x 8 devices, two processes x 4 devices): the full run, started together in empty
    workdirs (so both processes of the second find no prepared data)."""
    root = tmp_path_factory.mktemp("straight")
    single = Job(str(root / "single"), processes=1, logs=str(root / "single_logs"))
    try:
        multi = Job(str(root / "multi"), processes=2, logs=str(root / "multi_logs"))
    except BaseException:
        single.kill()
        raise
    try:
        return single.wait_ok(), multi.wait_ok()
    finally:
        single.kill()
        multi.kill()


def test_two_processes_train_like_one_with_the_same_devices(straight):
    """Two processes (per-process batch slices, shapes agreed per batch, gloo collectives, parameters
    sharded across them) reach the one-process parameters and metrics.jsonl to float32 round-off; both processes
    prepared the data from one empty workdir without a race and wrote their checkpoint shards,
    and only process 0 wrote the logs."""
    single, multi = straight
    worst = assert_params_close(final_params(single.workdir), final_params(multi.workdir))
    print(f"largest parameter difference, 2 processes vs 1: {worst:.3g}")
    assert_records_close(train_records(single.workdir), train_records(multi.workdir))
    assert checkpoint_writers(multi.workdir, STEPS) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert len(os.listdir(os.path.join(multi.workdir, "tensorboard"))) == 1  # one event file: process 0's
    summary = json.load(open(os.path.join(multi.workdir, "summary.json")))
    assert summary["steps"] == STEPS and summary["resumed_from"] == 0
    assert "Writing the synthetic release" in multi.stderr(0) and "Writing the synthetic release" not in multi.stderr(1)


def test_preemption_stops_both_processes_at_one_step_and_resume_is_exact(straight, tmp_path):
    """SIGTERM to one process only: JAX's preemption notice reaches both, they agree on a step, both
    save their shards of that checkpoint and exit 143. Restarted, both restore it and finish with
    the parameters of the uninterrupted two-process run (bit for bit) and of the one-process run."""
    single, multi = straight
    workdir, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    job = Job(workdir, processes=2, logs=logs, **SLOW_STEPS)
    try:
        metrics = os.path.join(workdir, "metrics.jsonl")
        deadline = time.time() + JOB_TIMEOUT_S
        while time.time() < deadline and all(p.poll() is None for p in job.procs):
            if os.path.exists(metrics) and os.path.getsize(metrics) > 0:  # step 3 is logged
                break
            time.sleep(0.05)
        assert all(p.poll() is None for p in job.procs), job.report()
        job.procs[1].send_signal(signal.SIGTERM)
        codes = job.wait()
    finally:
        job.kill()
    assert codes == [128 + signal.SIGTERM] * 2, job.report()
    stopped = [re.findall(r"stopped by SIGTERM after step (\d+)", job.stderr(i)) for i in range(2)]
    assert stopped[0] and stopped[0] == stopped[1], job.report()
    step = int(stopped[0][-1])
    assert 3 <= step < STEPS
    assert checkpoint_writers(workdir, step) == ["ocdbt.process_0", "ocdbt.process_1"]

    resumed = Job(workdir, processes=2, logs=os.path.join(logs, "resumed")).wait_ok()
    for i in range(2):
        assert f"Resumed from {os.path.join(workdir, 'checkpoints')}/{step}" in resumed.stdout(i)
    params, uninterrupted = final_params(workdir), final_params(multi.workdir)
    for key, value in uninterrupted.items():
        np.testing.assert_array_equal(params[key], value, err_msg=key)
    assert_params_close(final_params(single.workdir), params)
    # The log is rewritten from the restored step: records whose window of log_every steps does
    # not straddle the stop are those of the uninterrupted run.
    log_every = 3
    same = [r for r in train_records(multi.workdir)
            if r["kind"] == "valid" or r["step"] <= step or r["step"] - log_every >= step]
    kept = [r for r in train_records(workdir) if (r["kind"], r["step"]) in {(s["kind"], s["step"]) for s in same}]
    assert kept == same
