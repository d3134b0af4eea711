"""main.py --mode=train end to end: exact resume after SIGKILL and SIGTERM, outputs, eval mode.

Every run trains the tiny preset for 12 steps on one small synthetic release
(prepared once for the module and copied into each run's workdir).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import REPO, shared_runs

STEPS = 12
RUN_FLAGS = (
    "--config.data.synthetic.conversations=300", "--config.data.batch_size=8",
    "--config.data.tokenizer.vocab_size=1000", "--config.data.context_buckets=(128,)",
    f"--config.train.steps={STEPS}", "--config.train.warmup_steps=2", "--config.train.log_every=3",
    "--config.train.eval_every=6", "--config.train.eval_batches=0", "--config.checkpoint.every_steps=4",
    "--config.checkpoint.keep=5",
)


# Steps slowed to 0.5 s each, so a signal sent once step 3 is logged arrives before the last
# step however fast the machine (without it a fast machine can finish first).
SLOW_STEPS = {"BB3X_FAULT_STEP_DELAY_S": "0.5"}


def main_command(workdir, *overrides, mode="train"):
    return [sys.executable, "main.py", "--config", "configs/cringe.py", f"--workdir={workdir}", f"--mode={mode}",
            *RUN_FLAGS, *overrides]


def environment(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env.pop("XLA_FLAGS", None)
    return env


def run_main(workdir, *overrides, mode="train", check=True, **env):
    return subprocess.run(main_command(workdir, *overrides, mode=mode), cwd=REPO, env=environment(**env),
                          capture_output=True, text=True, timeout=900, check=check)


def final_params(workdir, step=STEPS):
    """The parameters of checkpoint ``step`` (the last, 12) as numpy arrays, read through the public
    checkpoint reader."""
    import jax

    from bb3x_jax.train import checkpoint as checkpoint_lib

    directory = os.path.join(workdir, "checkpoints")
    meta = json.load(open(os.path.join(directory, str(step), "meta", "metadata")))
    assert meta["step"] == step
    from flax import nnx

    from bb3x_jax.model import build
    from bb3x_jax.model import config as model_config

    cfg = model_config.ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in meta["model_config"].items()})
    abstract = nnx.state(nnx.eval_shape(lambda: build.construct(cfg, 0)), nnx.Param)
    params, _ = checkpoint_lib.read_params(directory, abstract, step)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def train_records(workdir):
    """metrics.jsonl without the wall-clock fields (they differ between runs)."""
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in records]


@pytest.fixture(scope="module")
def prepared():
    """A workdir holding the prepared release and tokenizer, to copy (not re-prepare) per run."""
    return shared_runs.prepared()


def fresh_workdir(prepared, tmp_path, name):
    workdir = str(tmp_path / name)
    shutil.copytree(prepared, workdir, ignore=shutil.ignore_patterns("data_check.json"))
    return workdir


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory):
    """The reference: 12 steps in one go."""
    workdir = fresh_workdir(prepared, tmp_path_factory.mktemp("straight"), "run")
    out = run_main(workdir)
    return workdir, out


def test_straight_run_writes_checkpoints_logs_plot_and_summary(straight):
    """A run leaves checkpoints (newest + best), JSONL metrics, TensorBoard events, a PNG and a summary."""
    workdir, out = straight
    summary = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["steps"] == STEPS and summary["resumed_from"] == 0
    assert summary["best_step"] in (6, 12)
    assert summary["valid"]["examples_positive"] > 0, "validation (the whole valid split) needs positives"
    assert np.isfinite(summary["valid"]["ppl_positive"])
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [4, 6, 8, 12]  # every 4, every validation (6, 12); keep=5
    records = train_records(workdir)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 3), ("train", 6), ("valid", 6), ("train", 9), ("train", 12), ("valid", 12)]
    assert os.listdir(os.path.join(workdir, "tensorboard"))[0].startswith("events.out.tfevents")
    with open(os.path.join(workdir, "loss_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "negative - positive NLL gap" in out.stdout


def test_sigkill_then_resume_is_bit_identical(straight, prepared, tmp_path):
    """Killed (SIGKILL) after step 7 and restarted: resumes from step 6 and ends with identical
    parameters and an identical metrics log."""
    workdir = fresh_workdir(prepared, tmp_path, "killed")
    killed = run_main(workdir, check=False, BB3X_FAULT_KILL_AFTER_STEP="7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_main(workdir)
    assert f"Resumed from {os.path.join(workdir, 'checkpoints')}/6" in resumed.stdout
    for a, b in zip(final_params(straight[0]), final_params(workdir)):
        np.testing.assert_array_equal(a, b)
    assert train_records(workdir) == train_records(straight[0])


def test_sigterm_saves_and_resume_is_bit_identical(straight, prepared, tmp_path):
    """SIGTERM mid-run saves a checkpoint at the step it stops on and exits 143; the resumed run
    ends with the same parameters as the straight one."""
    workdir = fresh_workdir(prepared, tmp_path, "terminated")
    process = subprocess.Popen(main_command(workdir), cwd=REPO, env=environment(**SLOW_STEPS),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:  # step 3 is logged: training is under way
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped = [line for line in stderr.splitlines() if "stopped by SIGTERM after step" in line]
    assert stopped, stderr[-2000:]
    step = int(stopped[-1].split("after step ")[1].split()[0])
    assert 3 <= step < STEPS
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
    resumed = run_main(workdir)
    assert f"checkpoints/{step}" in resumed.stdout
    for a, b in zip(final_params(straight[0]), final_params(workdir)):
        np.testing.assert_array_equal(a, b)


def test_resume_with_a_changed_objective_fails_naming_the_key(straight, tmp_path):
    """Resuming a finished run with a different train.alpha is refused, naming config.train.alpha."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(straight[0], workdir)
    out = run_main(workdir, "--config.train.alpha=2.0", check=False)
    assert out.returncode != 0 and "config.train.alpha" in out.stderr


def _tree(workdir):
    """Every path under the workdir with its size and modification time."""
    return sorted((os.path.relpath(os.path.join(d, name), workdir), os.path.getsize(os.path.join(d, name)),
                   os.path.getmtime(os.path.join(d, name)))
                  for d, _, names in os.walk(workdir) for name in names)


def _step_folders(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.parametrize("overrides, key, before, after", [
    (("--config.model.preset=small", "--config.train.steps=14", "--config.checkpoint.every_steps=7"),
     "model.preset", "'tiny'", "'small'"),
    (("--config.data.synthetic.conversations=400",), "data.synthetic.conversations", "300", "400"),
])
def test_resume_with_another_model_or_vocabulary_is_refused_before_writing(straight, tmp_path, overrides, key,
                                                                            before, after):
    """A finished run resumed with another preset, or a data setting that changes the vocabulary,
    is refused (exit 2) naming the key and both values, and nothing in the workdir changes: every
    step folder of the run is still there."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(straight[0], workdir)
    files = _tree(workdir)
    out = run_main(workdir, *overrides, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    line = [line for line in out.stderr.splitlines() if line.startswith("error: ")][-1]
    assert f"config.{key}:" in line and f"{before} -> {after}" in line, line
    assert _step_folders(workdir) == ["12", "4", "6", "8"]
    assert _tree(workdir) == files


def test_damaged_newest_checkpoint_is_moved_aside_and_training_passes_its_step(straight, tmp_path):
    """With the newest checkpoint's parameters damaged, the rerun restores the one before, renames
    the damaged one to <step>.damaged, trains past that step again and ends bit-identical to the
    straight run."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(straight[0], workdir)
    params = os.path.join(workdir, "checkpoints", str(STEPS), "params")
    damaged = [os.path.join(d, name) for d, _, names in os.walk(params) for name in names if "/d" in d]
    assert damaged
    for path in damaged:
        with open(path, "wb") as f:
            f.write(b"garbage")
    out = run_main(workdir, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Resumed from {os.path.join(workdir, 'checkpoints')}/8" in out.stdout
    assert "moved aside to" in out.stderr and "StepAlreadyExists" not in out.stderr
    assert _step_folders(workdir) == ["12", f"{STEPS}.damaged", "4", "6", "8"]
    for a, b in zip(final_params(straight[0]), final_params(workdir)):
        np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_before_saving(prepared, tmp_path):
    """With a huge learning rate the loss turns NaN: the run exits 1 naming the step and its batch's
    position, caught by the check before the save (no log step before the end); every checkpoint
    is older than that step, the newest has finite parameters and the best (if any) is finite."""
    from bb3x_jax.train import checkpoint as checkpoint_lib

    workdir = fresh_workdir(prepared, tmp_path, "nan")
    out = run_main(workdir, "--config.train.learning_rate=1e6", "--config.checkpoint.every_steps=1",
                   f"--config.train.log_every={STEPS}", check=False)
    assert out.returncode == 1, out.stderr[-3000:]
    line = [line for line in out.stderr.splitlines() if line.startswith("error: training diverged at step")][-1]
    step = int(line.split("at step ")[1].split()[0])
    assert "(batch: epoch 0, step" in line and "nan" in line, line
    checkpoints = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), best_metric="ppl_positive")
    try:
        steps, best = checkpoints.steps(), checkpoints.best_step()
    finally:
        checkpoints.close()
    assert steps and max(steps) < step, (steps, line)
    assert f"the newest checkpoint is step {max(steps)}" in line
    for checked in {max(steps), best} - {None}:
        assert all(np.isfinite(x).all() for x in final_params(workdir, checked)), checked
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


def test_eval_mode_reports_the_checkpoint_metrics(straight):
    """--mode=eval on the latest checkpoint reproduces the final validation of the run (same batches)."""
    workdir, out = straight
    summary = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    evaluated = run_main(workdir, "--config.eval.checkpoint=latest", "--config.eval.batches=0", *GENERATE_FLAGS,
                         mode="eval")
    report = json.load(open(os.path.join(workdir, "eval_valid.json")))
    assert report["step"] == STEPS and "positive" in evaluated.stdout
    for key in ("nll_positive", "nll_unlabeled", "tokens_positive", "examples_unlabeled"):
        assert report[key] == pytest.approx(summary["valid"][key], rel=1e-6), key


GENERATE_FLAGS = ("--config.eval.generate_examples=6", "--config.eval.generate_batch=4",
                  "--config.generation.method=greedy", "--config.generation.beam_size=1",
                  "--config.generation.max_len=8")


def test_eval_mode_judges_the_generations(straight):
    """--mode=eval generates for evenly spread valid contexts: every response is written with the
    synthetic world's verdict, and the reported good rate, reasons and F1 are those of the file."""
    from bb3x_jax.data import synthetic
    from bb3x_jax.eval import generation as generation_eval

    workdir, _ = straight
    evaluated = run_main(workdir, "--config.eval.checkpoint=latest", "--config.eval.batches=1", *GENERATE_FLAGS,
                         mode="eval")
    generation = json.load(open(os.path.join(workdir, "eval_valid.json")))["generation"]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "generations_valid.jsonl"))]
    assert len(rows) == generation["examples"] == 6 and "judge: good" in evaluated.stdout
    verdicts = [synthetic.judge(r["context"], r["response"]) for r in rows]
    assert [r["verdict"] for r in rows] == verdicts
    assert generation["good_rate"] == pytest.approx(verdicts.count("good") / 6)
    assert set(generation["reasons"]) >= set(synthetic.BAD_REASONS)
    assert sum(generation["reasons"].values()) == pytest.approx(1 - generation["good_rate"])
    f1 = np.mean([generation_eval.f1_score(r["response"], r["label"]) for r in rows])
    assert generation["f1"] == pytest.approx(f1)


def test_chat_mode_keeps_the_history_and_resets(straight):
    """--mode=chat answers each piped line, and [reset] empties the history (the first reply after
    it equals the first reply of the conversation, greedy decoding being deterministic)."""
    workdir, _ = straight
    lines = "Hi!\nWhat is your favorite food?\n[reset]\nHi!\n[exit]\nnever read\n"
    out = subprocess.run(main_command(workdir, "--config.eval.checkpoint=latest", *GENERATE_FLAGS, mode="chat"),
                         cwd=REPO, env=environment(), input=lines, capture_output=True, text=True, timeout=600,
                         check=True)
    bot = [line[len("BOT: "):] for line in out.stdout.splitlines() if line.startswith("BOT: ")]
    assert len(bot) == 3 and "(new conversation)" in out.stdout
    assert bot[0] == bot[2]


def test_validation_divergence_counts_only_a_class_nll_with_tokens():
    """A split without negative labels has a NaN gap and NaN negative NLL: not a divergence. A
    non-finite NLL of a class that has tokens is."""
    from bb3x_jax.errors import TrainingDiverged
    from bb3x_jax.modes import train as loop

    fine = {"nll_positive": 2.0, "tokens_positive": 10, "nll_negative": float("nan"), "tokens_negative": 0,
            "nll_gap_negative_minus_positive": float("nan")}
    loop._check_valid(fine, 4, {"epoch": 0, "step_in_epoch": 4}, None)
    with pytest.raises(TrainingDiverged, match="step 4"):
        loop._check_valid({**fine, "nll_positive": float("inf")}, 4, {"epoch": 0, "step_in_epoch": 4}, None)


@pytest.mark.slow
def test_kl_anchored_run_resumes_bit_identical_with_the_same_anchor(straight, prepared, tmp_path):
    """train.kl_anchor anchors to train.init_from, and a resumed run anchors to it again (not to its
    own checkpoint): killed after step 7 and restarted, it ends with the parameters and metrics of
    the same run made in one go; its log records the KL."""
    start = os.path.join(straight[0], "checkpoints", str(STEPS))
    anchored = ("--config.train.kl_anchor=1.0", "--config.train.kl_anchor_direction=reverse",
                f"--config.train.init_from={start}", "--config.train.objective=cringe")
    whole = fresh_workdir(prepared, tmp_path, "anchored")
    run_main(whole, *anchored)
    records = train_records(whole)
    kl = [r["kl_anchor"] for r in records if r["kind"] == "train"]
    assert len(kl) == 4 and all(np.isfinite(kl)) and all(value > 0 for value in kl)
    workdir = fresh_workdir(prepared, tmp_path, "anchored_killed")
    killed = run_main(workdir, *anchored, check=False, BB3X_FAULT_KILL_AFTER_STEP="7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_main(workdir, *anchored)
    assert f"Resumed from {os.path.join(workdir, 'checkpoints')}/6" in resumed.stdout
    for a, b in zip(final_params(whole), final_params(workdir)):
        np.testing.assert_array_equal(a, b)
    assert train_records(workdir) == records
