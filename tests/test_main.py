"""main.py end to end: the default job on a small synthetic release, on 1 and 8 simulated devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import REPO


def run_main(workdir, *overrides, devices=1, check=True):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [
        sys.executable, "main.py", "--config", "configs/cringe.py", f"--workdir={workdir}", "--mode=data",
        "--config.data.synthetic.conversations=300", "--config.data_check.batches=4", "--config.data.batch_size=8",
        "--config.data.tokenizer.vocab_size=1000", *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=check)


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    return workdir, _last_json(run_main(workdir).stdout)


def test_default_job_synthesizes_prepares_and_runs_batches(single_device_run):
    """With no manual_dir the job writes the synthetic release, prepares it and pushes real batches."""
    workdir, result = single_device_run
    assert result["release"] == os.path.join(workdir, "synthetic_release")
    assert result["examples"] == 4 * 8
    assert result["context_tokens"] > 0 and result["label_tokens"] >= result["examples"]
    assert result["positive"] + result["negative"] + result["unlabeled"] == result["examples"]
    with open(os.path.join(workdir, "data_check.json")) as f:
        saved = json.load(f)
    assert saved["splits"]["train"]["examples"] > 0 and saved["iterator_state"]["step_in_epoch"] == 4


def test_eight_devices_give_the_same_numbers(single_device_run, tmp_path):
    """On a (2, 2, 2) mesh of simulated devices the sharded step sees exactly the same batches."""
    _, single = single_device_run
    result = _last_json(
        run_main(str(tmp_path), "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", devices=8).stdout
    )
    assert result["devices"] == 8 and result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    for key in ("examples", "context_tokens", "label_tokens", "positive", "negative", "unlabeled"):
        assert result[key] == single[key], key


def test_unknown_or_mistyped_override_fails_with_its_name(tmp_path):
    """A typo in a config key, or a value of the wrong type, stops the run at start-up naming it."""
    bad_key = run_main(str(tmp_path), "--config.data.batch_sise=8", check=False)
    assert bad_key.returncode != 0 and "batch_sise" in bad_key.stderr
    bad_type = run_main(str(tmp_path), "--config.data.batch_size=eight", check=False)
    assert bad_type.returncode != 0 and "batch_size" in bad_type.stderr
    bad_value = run_main(str(tmp_path), "--config.data.stream=bots", check=False)
    assert bad_value.returncode != 0 and "config.data.stream" in bad_value.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), "synthetic_release"))


def test_train_mode_trains_logs_and_evaluates(tmp_path):
    """--mode=train runs the CRINGE step, writes metrics.jsonl and a valid-split summary with finite numbers."""
    workdir = str(tmp_path)
    out = run_main(workdir, "--mode=train", "--config.train.steps=6", "--config.train.log_every=3",
                   "--config.train.warmup_steps=2", "--config.train.eval_batches=2", "--config.data.context_buckets=(128,)")
    summary = _last_json(out.stdout)
    assert summary["objective"] == "cringe" and summary["steps"] == 6
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 3), ("train", 6), ("valid", 6)]
    records = [r for r in records if r["kind"] == "train"]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite, positive
    valid = summary["valid"]
    assert valid["tokens_positive"] + valid["tokens_negative"] + valid["tokens_unlabeled"] > 0
    assert valid["ppl_unlabeled"] > 1


def _user_mistakes(tmp_path):
    """(flags, what the one line must say): mistakes a user makes at the command line."""
    from tests.data.release_fixtures import write_release

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    malformed = write_release(str(tmp_path / "malformed"), extra_lines={7: [b'{"chat_id": "x", "message_history": [']})
    return {
        "key typo": (["--config.train.stesp=5"], 'Did you mean "steps"'),
        "wrong type": (["--config.train.steps=abc"], "--config.train.steps=abc"),
        "bad value": (["--config.train.learning_rate=-1"], "config.train.learning_rate"),
        "workdir is a file": ([f"--workdir={a_file}"], f"--workdir {a_file} is a file"),
        "mesh larger than the devices": (["--config.mesh.data=3"], "config.mesh: "),
        "malformed release": ([f"--config.data.manual_dir={malformed}"], "release_data_07.jsonl"),
    }


@pytest.mark.parametrize("case", ["key typo", "wrong type", "bad value", "workdir is a file",
                                  "mesh larger than the devices", "malformed release"])
def test_a_user_mistake_is_one_line_and_status_2(case, tmp_path):
    """Every mistake a user can fix ends with one line on stderr naming what to fix, exit status 2,
    and no traceback (a traceback is for bugs)."""
    args, expected = _user_mistakes(tmp_path)[case]
    if not any(a.startswith("--workdir") for a in args):
        args = [f"--workdir={tmp_path / 'run'}", *args]
    cmd = [sys.executable, "main.py", "--config", "configs/cringe.py", "--mode=data",
           "--config.data.synthetic.conversations=100", *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
