"""The experiment's job runner: dependencies, results, pinned workers, failures that name the job."""

import operator
import os
import subprocess
import sys
import time

import pytest

from bb3x_jax import errors
from bb3x_jax.experiments import jobs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")


def _chain() -> list[jobs.Job]:
    return [
        jobs.Job("a", operator.add, (1, 2)),
        jobs.Job("b", operator.mul, (10,), ("a",)),  # 10 * a
        jobs.Job("c", operator.sub, (100,), ("b",)),  # 100 - b
        jobs.Job("d", operator.add, (), ("a", "c")),  # a + c
    ]


def test_in_process_jobs_get_their_dependencies_results_in_order():
    assert jobs.run_jobs(_chain(), workers=0) == {"a": 3, "b": 30, "c": 70, "d": 73}


@TWO_CPUS
def test_worker_processes_give_the_same_results_each_pinned_to_its_own_cpus():
    """Two workers: the same results as in process; every job ran in a process pinned to one CPU, and
    the two workers' CPUs differ (so XLA in each sizes its thread pool to one core)."""
    before = os.sched_getaffinity(0)
    assert jobs.run_jobs(_chain(), workers=2) == {"a": 3, "b": 30, "c": 70, "d": 73}
    pinned = jobs.run_jobs([jobs.Job(f"affinity {i}", _affinity_after, (0.3,)) for i in range(4)], workers=2)
    assert all(len(cpus) == 1 for cpus in pinned.values())
    assert len(set().union(*pinned.values())) == 2 and set().union(*pinned.values()) <= os.sched_getaffinity(0)
    assert os.sched_getaffinity(0) == before  # the parent itself is not pinned


def test_jobs_must_come_after_what_they_need_and_have_distinct_names():
    with pytest.raises(ValueError, match="runs after \\['b'\\]"):
        jobs.run_jobs([jobs.Job("a", operator.neg, (1,), ("b",)), jobs.Job("b", operator.neg, (1,))], workers=0)
    with pytest.raises(ValueError, match="two jobs named 'a'"):
        jobs.run_jobs([jobs.Job("a", operator.neg, (1,)), jobs.Job("a", operator.neg, (2,))], workers=0)
    cpus = len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=f"{cpus + 1} workers but {cpus} usable CPUs"):
        jobs.cpu_shares(cpus + 1)


@TWO_CPUS
def test_a_failing_job_stops_the_run_and_is_named():
    """A bug in a worker comes back as JobFailed with the job's name and the worker's traceback; a
    user's mistake stays a UserError (one line at the entry point), also named."""
    failing = [jobs.Job("fine", operator.add, (1, 1)), jobs.Job("divides", operator.truediv, (1, 0))]
    with pytest.raises(jobs.JobFailed, match="divides: ZeroDivisionError") as raised:
        jobs.run_jobs(failing, workers=2)
    assert "Traceback" in str(raised.value)
    with pytest.raises(errors.UserError, match="^missing: config.data.dir: not there$"):
        jobs.run_jobs([jobs.Job("missing", _raise_config_error, ("data.dir", "not there"))], workers=2)


def _affinity_after(seconds):
    time.sleep(seconds)  # long enough that both workers take jobs
    return os.sched_getaffinity(0)


def _raise_config_error(key, message):
    raise errors.ConfigError(key, message)


def _write_pid_then_sleep(path, seconds):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)


@TWO_CPUS
@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_workers_end_when_the_script_is_killed(tmp_path):
    """A script killed mid-run (SIGKILL: no cleanup of its own) leaves no worker computing on."""
    pid_file = tmp_path / "worker.pid"
    script = (f"from bb3x_jax.experiments import jobs; from tests.experiments import test_jobs; "
              f"jobs.run_jobs([jobs.Job('sleep', test_jobs._write_pid_then_sleep, ({str(pid_file)!r}, 600))], 2)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _mark_setup():
    os.environ["BB3X_TEST_JOB_SETUP"] = "done"


def _setup_mark():
    return os.environ.get("BB3X_TEST_JOB_SETUP")


@TWO_CPUS
def test_setup_runs_in_every_process_that_runs_jobs(monkeypatch):
    """``setup`` (e.g. the experiment's progress-bar switch) reaches each worker, and this process
    when there are no workers, before any job."""
    monkeypatch.delenv("BB3X_TEST_JOB_SETUP", raising=False)
    read = [jobs.Job(f"read {i}", _setup_mark) for i in range(4)]
    assert set(jobs.run_jobs(read, workers=2, setup=_mark_setup).values()) == {"done"}
    assert "BB3X_TEST_JOB_SETUP" not in os.environ  # set in the workers only
    assert set(jobs.run_jobs(read, workers=0, setup=_mark_setup).values()) == {"done"}
