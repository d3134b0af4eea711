"""The BB3 -> BB3x experiment script: its stages, outputs and goal checks (on a tiny, fast setting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bb3x_jax.experiments import bb3x_table
from tests import REPO


def _row(name, good, **reasons):
    return {"name": name, "good_rate": good, "reasons": reasons, "f1": 0.25, "iteration": 0}


def test_goals_need_a_gain_at_every_iteration_and_five_points_overall():
    """check_goals passes only when every iteration beats the previous one and the last beats the
    baseline by at least five points."""
    rows = [_row("b", 0.40), _row("1", 0.43), _row("2", 0.44), _row("3", 0.46)]
    goals = bb3x_table.check_goals(rows)
    assert goals["every_iteration_better"] and goals["gain_goal_met"] and goals["gain_points"] == pytest.approx(6.0)
    dip = bb3x_table.check_goals([_row("b", 0.40), _row("1", 0.50), _row("2", 0.49), _row("3", 0.60)])
    assert not dip["every_iteration_better"] and dip["gain_goal_met"]
    small = bb3x_table.check_goals([_row("b", 0.40), _row("1", 0.41), _row("2", 0.42), _row("3", 0.44)])
    assert small["every_iteration_better"] and not small["gain_goal_met"]


def test_every_control_must_be_beaten_by_three_points():
    """With controls, the goals also need the last iteration at least three points above each of
    them; every margin is reported by the control's name."""
    rows = [_row("b", 0.40), _row("1", 0.43), _row("2", 0.44), _row("3", 0.46)]
    close = bb3x_table.check_goals(rows, [_row("mle", 0.40), _row("positives", 0.44)])
    assert close["control_margins_points"] == {"mle": pytest.approx(6.0), "positives": pytest.approx(2.0)}
    assert not close["controls_beaten"] and not bb3x_table.goals_met(close)
    clear = bb3x_table.check_goals(rows, [_row("mle", 0.40), _row("positives", 0.42)])
    assert clear["controls_beaten"] and bb3x_table.goals_met(clear)


def test_table_has_table_9_columns_for_every_model():
    """One row per model: good % then every bad reason's % (0.0 where unseen) and F1."""
    table = bb3x_table.format_table([_row("BB3", 0.5, off_topic=0.3, nonsensical=0.2),
                                     _row("BB3x 1", 0.75, off_topic=0.25)])
    lines = table.splitlines()
    assert lines[0] == ("| Model | Good % | inappropriate % | nonsensical % | off topic % | ignoring last turn % "
                        "| repeating % | F1 |")
    assert lines[2] == "| BB3 | 50.0 | 0.0 | 20.0 | 30.0 | 0.0 | 0.0 | 0.250 |"
    assert lines[3].startswith("| BB3x 1 | 75.0 | 0.0 | 0.0 | 25.0 |")


@pytest.mark.slow  # five trainings and evaluations in subprocesses (2-3 min on 2 cores)
def test_the_script_runs_every_stage_and_writes_table_chart_and_json(tmp_path):
    """A tiny end-to-end run: baseline, one CRINGE iteration and the control are trained and
    evaluated with beam search and with sampling; the table, PNG and JSON are written, and the exit
    status reflects the goals."""
    workdir = str(tmp_path / "exp")
    flags = [
        "--config.model.preset=tiny", "--config.data.synthetic.conversations=300",
        "--config.data.tokenizer.vocab_size=1000", "--config.data.batch_size=8",
        "--config.baseline.steps=8", "--config.iterate.iterations=1", "--config.iterate.steps=4",
        "--config.iterate.contexts=16", "--config.eval.generate_batch=16", "--config.eval.batches=2",
        "--config.generation.beam_size=2", "--config.generation.max_len=8",
        "--config.control.same_data=mle_positive_only",
    ]
    out = subprocess.run([sys.executable, "-m", "bb3x_jax.experiments.bb3x_table", f"--workdir={workdir}", *flags],
                         cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert out.returncode in (0, bb3x_table.GOALS_MISSED_STATUS), out.stderr[-3000:]
    result = json.load(open(os.path.join(workdir, "bb3x_table.json")))
    names = [r["name"] for r in result["rows"]]
    assert names[0].startswith("BB3 stand-in") and names[1] == "BB3x CRINGE iteration 1"
    assert names[2] == "control: baseline + 4 more mle steps"
    assert names[3] == "control: mle_positive_only on CRINGE's generated data"
    same_data = json.load(open(os.path.join(workdir, "controls", "mle_positive_only", "1", "checkpoints", "4", "meta",
                                            "metadata")))["config"]
    assert same_data["train"]["objective"] == "mle_positive_only" and same_data["train"]["steps"] == 4
    assert same_data["data"]["extra_train"] == [os.path.join(workdir, "iterations", "1", "generated")]
    assert same_data["train"]["init_from"] == result["rows"][0]["model"]
    assert set(result["goals"]["control_margins_points"]) == set(names[2:])
    assert out.returncode == (0 if bb3x_table.goals_met(result["goals"]) else bb3x_table.GOALS_MISSED_STATUS)
    test_split = json.load(open(os.path.join(workdir, "iterations", "0", "eval_test.json")))
    assert result["rows"][0]["generations"] == test_split["generation"]["examples"] > 16  # the whole split
    assert open(os.path.join(workdir, "bb3x_table.md")).read().startswith("| Model | Good % |")
    with open(os.path.join(workdir, "bb3x_table.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(result["timings_s"]) >= {"baseline_train", "iterations", "control_train", "sampled_eval"}
    sampled = json.load(open(os.path.join(workdir, "iterations", "1", "sampled", "eval_test.json")))["generation"]
    assert sampled["settings"]["method"] == "sample" and sampled["settings"]["block_ngram"] == 0
    assert result["rows"][1]["sampled"]["good_rate"] == sampled["good_rate"]
    assert all("sampled" in row for row in result["rows"])
    assert "sampled: good %" in open(os.path.join(workdir, "bb3x_table.md")).readline()
    assert "goal: better at every iteration" in out.stdout
