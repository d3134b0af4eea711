"""The BB3 -> BB3x experiment script: its stages, outputs and goal checks (on a tiny, fast setting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bb3x_jax import config as config_lib
from bb3x_jax.experiments import bb3x_table
from tests import REPO, plotted_under_another_backend


def _cell(name, good, iteration=0, sampled=None, **reasons):
    """One seed's row as ``run_seed`` makes it (rates as fractions)."""
    row = {"name": name, "model": f"/w/{name}/checkpoints/8", "good_rate": good, "reasons": reasons, "f1": 0.25,
           "iteration": iteration}
    if sampled is not None:
        row["sampled"] = {"good_rate": sampled[0], "reasons": {"nonsensical": sampled[1]}}
    return row


def _seed(seed, goods, controls=(), sampled=None):
    """A seed's result: the baseline and iterations with beam good rates ``goods``, then controls."""
    rows = [_cell(f"m{i}", g, i, None if sampled is None else sampled[i]) for i, g in enumerate(goods)]
    rows += [_cell(f"c{i}", g, None, None if sampled is None else (0.5, 0.1)) for i, g in enumerate(controls)]
    return {"seed": seed, "rows": rows}


def _rows(*seeds):
    return bb3x_table.aggregate(list(seeds))


def test_aggregate_gives_mean_and_sample_sd_per_model_in_points():
    """Each model's cells over the seeds: mean and sample standard deviation in percentage points,
    every seed's own value kept; one seed has no standard deviation."""
    rows = _rows(_seed(0, [0.40, 0.50]), _seed(1, [0.42, 0.56]), _seed(2, [0.44, 0.53]))
    assert rows[0]["model"] == "m0" and rows[0]["beam_good_mean"] == pytest.approx(42.0)
    assert rows[0]["beam_good_sd"] == pytest.approx(2.0) and rows[1]["beam_good_sd"] == pytest.approx(3.0)
    assert [s["beam_good"] for s in rows[1]["per_seed"]] == [50.0, 56.0, 53.0]
    assert [s["seed"] for s in rows[1]["per_seed"]] == [0, 1, 2]
    assert _rows(_seed(0, [0.4, 0.5]))[0]["beam_good_sd"] is None
    with pytest.raises(ValueError, match="seed 1 has other models"):
        _rows(_seed(0, [0.4, 0.5]), _seed(1, [0.4]))


def test_goals_need_a_rise_at_every_iteration_eight_points_and_two_sds():
    """On the seeds' means: every iteration above the one before, the last >= baseline + 8 points,
    and the gain above twice the larger standard deviation of the two cells."""
    clear = bb3x_table.check_goals(_rows(_seed(0, [0.40, 0.44, 0.50]), _seed(1, [0.42, 0.46, 0.52])))["goals"]
    assert clear == {"beam_good_rises_every_iteration": True, "last_iteration_at_least_baseline_plus_8": True,
                     "gain_exceeds_two_sd": True}
    dip = bb3x_table.check_goals(_rows(_seed(0, [0.40, 0.52, 0.50]), _seed(1, [0.40, 0.52, 0.50])))["goals"]
    assert not dip["beam_good_rises_every_iteration"] and dip["last_iteration_at_least_baseline_plus_8"]
    small = bb3x_table.check_goals(_rows(_seed(0, [0.40, 0.43, 0.47]), _seed(1, [0.40, 0.43, 0.47])))
    assert small["gain_points"] == pytest.approx(7.0) and not small["goals"]["last_iteration_at_least_baseline_plus_8"]
    noisy = bb3x_table.check_goals(_rows(_seed(0, [0.30, 0.45, 0.50]), _seed(1, [0.50, 0.55, 0.60])))["goals"]
    assert noisy["last_iteration_at_least_baseline_plus_8"] and not noisy["gain_exceeds_two_sd"]  # 15 vs 2 x 14.1
    one_seed = bb3x_table.check_goals(_rows(_seed(0, [0.30, 0.45, 0.50])))
    assert not one_seed["goals"]["gain_exceeds_two_sd"] and not bb3x_table.goals_met(one_seed["goals"])


def test_every_control_must_be_beaten_by_three_points():
    """With controls, the last iteration must be at least three points above each; every margin is
    reported by the control's name."""
    close = bb3x_table.check_goals(_rows(_seed(0, [0.40, 0.50], [0.40, 0.48]), _seed(1, [0.42, 0.52], [0.40, 0.48])))
    assert close["control_margins_points"] == {"c0": pytest.approx(11.0), "c1": pytest.approx(3.0)}
    assert close["goals"]["beats_every_control_by_3"]
    short = bb3x_table.check_goals(_rows(_seed(0, [0.40, 0.50], [0.49]), _seed(1, [0.42, 0.52], [0.49])))
    assert not short["goals"]["beats_every_control_by_3"] and not bb3x_table.goals_met(short["goals"])


def test_sampling_goals_compare_the_last_iteration_with_the_baseline():
    """Sampled good must rise by >= 3 points and sampled nonsense by <= 2 points (seed means)."""
    better = [(0.60, 0.06), (0.64, 0.07)]
    worse = [(0.66, 0.06), (0.62, 0.22)]
    goals = bb3x_table.check_goals(_rows(_seed(0, [0.4, 0.5], sampled=better), _seed(1, [0.42, 0.52],
                                                                                     sampled=better)))["goals"]
    assert goals["sampled_good_at_least_baseline_plus_3"] and goals["sampled_nonsensical_at_most_baseline_plus_2"]
    goals = bb3x_table.check_goals(_rows(_seed(0, [0.4, 0.5], sampled=worse), _seed(1, [0.42, 0.52],
                                                                                    sampled=worse)))["goals"]
    assert not goals["sampled_good_at_least_baseline_plus_3"]
    assert not goals["sampled_nonsensical_at_most_baseline_plus_2"]


def test_the_labelling_judge_must_reach_85_balanced_accuracy_and_beat_always_good():
    """The judge's goals use the mean over the seeds of its scores against the ground truth."""
    def judge(balanced, accuracy):
        return {"accuracy": accuracy, "balanced_accuracy": balanced, "always_good_accuracy": 78.8,
                "precision_bad": 80.0, "recall_bad": 70.0, "recall_bad_by_reason": {"off_topic": 30.0}}

    rows = _rows(_seed(0, [0.40, 0.50]), _seed(1, [0.42, 0.52]))
    good = bb3x_table.check_goals(rows, [judge(86.0, 92.0), judge(85.0, 91.0)])["goals"]
    assert good["judge_balanced_accuracy_at_least_85"] and good["judge_accuracy_above_always_good"]
    weak = bb3x_table.check_goals(rows, [judge(86.0, 78.0), judge(83.0, 79.0)])["goals"]
    assert not weak["judge_balanced_accuracy_at_least_85"] and not weak["judge_accuracy_above_always_good"]


def test_table_has_table_9_columns_with_mean_and_sd():
    """One row per model: good % as mean ± sd, then every bad reason's mean % (0.0 where unseen) and F1."""
    rows = _rows({"seed": 0, "rows": [_cell("BB3", 0.5, off_topic=0.3, nonsensical=0.2)]},
                 {"seed": 1, "rows": [_cell("BB3", 0.6, off_topic=0.2)]})
    lines = bb3x_table.format_table(rows).splitlines()
    assert lines[0] == ("| Model | Good % | inappropriate % | nonsensical % | off topic % | ignoring last turn % "
                        "| repeating % | F1 |")
    assert lines[2] == "| BB3 | 55.0 ± 7.1 | 0.0 | 10.0 | 25.0 | 0.0 | 0.0 | 0.250 |"


def test_chart_is_a_png_drawn_without_touching_the_callers_backend(tmp_path):
    """The chart of aggregated rows (sampled bars, controls) is a PNG; the caller's matplotlib backend
    is the same afterwards (the script can run inside a notebook)."""
    pytest.importorskip("matplotlib")
    rows = _rows(*(_seed(s, [0.40, 0.50], controls=[0.45], sampled=[(0.3, 0.2), (0.4, 0.1)]) for s in (0, 1)))
    plotted_under_another_backend(bb3x_table.plot, rows, str(tmp_path / "chart.png"), seeds=2)


def test_experiment_settings_are_checked_before_anything_runs():
    """Seeds must be distinct and non-negative, the labeller the classifier or the ground truth, the
    workers no more than the usable CPUs."""
    from configs import bb3x_table as experiment_config

    config = experiment_config.get_config()
    bb3x_table.validate_experiment(config)
    for key, value, message in (("seeds", (), "distinct seeds"), ("seeds", (1, 1), "distinct seeds"),
                                ("label_judge", "auto", "not classifier or synthetic"),
                                ("workers", len(os.sched_getaffinity(0)) + 1, "worker processes")):
        bad = experiment_config.get_config()
        bad.experiment[key] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            bb3x_table.validate_experiment(bad)


@pytest.mark.slow  # six trainings and evaluations in subprocesses, twice (about 5 min on 2 cores)
def test_the_script_runs_every_stage_with_learned_labels_and_writes_table_chart_and_json(tmp_path):
    """A tiny end-to-end run of one seed: baseline, the feedback classifier fine-tuned from it, one
    CRINGE iteration whose generations the classifier labelled, the controls, beam and sampled
    grading by the ground truth; the table, PNG and JSON (with the issue's keys) are written, and
    the exit status reflects the goals."""
    workdir = str(tmp_path / "exp")
    flags = [
        "--config.model.preset=tiny", "--config.data.synthetic.conversations=300",
        "--config.data.tokenizer.vocab_size=1000", "--config.data.batch_size=8",
        "--config.baseline.steps=8", "--config.iterate.iterations=1", "--config.iterate.steps=4",
        "--config.iterate.contexts=16", "--config.eval.generate_batch=16", "--config.eval.batches=2",
        "--config.generation.beam_size=2", "--config.generation.max_len=8", "--config.judge.steps=4",
        "--config.judge.batch_size=8", "--config.control.same_data=mle_positive_only", "--config.experiment.seeds=(3,)",
    ]
    out = subprocess.run([sys.executable, "-m", "bb3x_jax.experiments.bb3x_table", f"--workdir={workdir}", *flags],
                         cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert out.returncode in (0, bb3x_table.GOALS_MISSED_STATUS), out.stderr[-3000:]
    result = json.load(open(os.path.join(workdir, "bb3x_table.json")))
    assert result["seeds"] == [3] and result["label_judge"].startswith("feedback classifier")
    assert result["grader"].startswith("the synthetic world's ground truth")
    assert all(isinstance(v, bool) for v in result["goals"].values())
    assert "judge_balanced_accuracy_at_least_85" in result["goals"]
    names = [r["model"] for r in result["rows"]]
    assert names[0].startswith("BB3 stand-in") and names[1] == "BB3x CRINGE iteration 1"
    assert names[2] == "control: baseline + 4 more mle steps"
    assert names[3] == "control: mle_positive_only on CRINGE's generated data"
    for row in result["rows"]:
        assert {"beam_good_mean", "beam_good_sd", "sampled_good_mean", "sampled_nonsensical_mean"} <= set(row)
    seed_dir = os.path.join(workdir, "seed_3")
    seeded = json.load(open(os.path.join(seed_dir, "checkpoints", "8", "meta", "metadata")))["config"]
    assert seeded["seed"] == 3 and seeded["data"]["synthetic"]["seed"] == 3  # the training's and the world's
    # the learned judge labelled the generations; the ground truth graded
    split = json.load(open(os.path.join(seed_dir, "iterations", "1", "generated", "meta.json")))
    assert split["judge"].startswith(f"feedback classifier {os.path.join(seed_dir, 'judge')} (weights ")
    judge_report = json.load(open(os.path.join(seed_dir, "judge", "report.json")))
    assert judge_report["eval"]["split"] == "valid" and judge_report["train"]["steps"] == 4
    assert result["judge"]["per_seed"][0]["balanced_accuracy"] == pytest.approx(
        100 * judge_report["ground_truth"]["balanced_accuracy"], abs=0.01)
    test_split = json.load(open(os.path.join(seed_dir, "iterations", "0", "eval_test.json")))
    assert test_split["generation"]["judge"] == "synthetic world ground truth"
    assert result["rows"][0]["per_seed"][0]["beam_good"] == pytest.approx(100 * test_split["generation"]["good_rate"],
                                                                        abs=0.01)
    same_data = json.load(open(os.path.join(seed_dir, "controls", "mle_positive_only", "1", "checkpoints", "4", "meta",
                                            "metadata")))["config"]
    assert same_data["train"]["objective"] == "mle_positive_only" and same_data["train"]["steps"] == 4
    assert same_data["data"]["extra_train"] == [os.path.join(seed_dir, "iterations", "1", "generated")]
    assert same_data["train"]["init_from"] == result["rows"][0]["per_seed"][0]["checkpoint"]
    assert set(result["control_margins_points"]) == set(names[2:])
    assert out.returncode == (0 if bb3x_table.goals_met(result["goals"]) else bb3x_table.GOALS_MISSED_STATUS)
    table = open(os.path.join(workdir, "bb3x_table.md")).read()
    assert table.startswith("| Model | Good % |") and "sampled: good %" in table.splitlines()[0]
    assert "Labels of the iterations' generations: feedback classifier" in table
    with open(os.path.join(workdir, "bb3x_table.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(result["timings_s"]["3"]) >= {"baseline_train", "judge", "iterations", "control_train", "sampled_eval"}
    assert "[seed 3] judge:" in out.stdout  # a progress line per stage
    sampled = json.load(open(os.path.join(seed_dir, "iterations", "1", "sampled", "eval_test.json")))["generation"]
    assert sampled["settings"]["method"] == "sample" and sampled["settings"]["block_ngram"] == 0
    assert result["rows"][1]["sampled_good_mean"] == pytest.approx(100 * sampled["good_rate"], abs=0.01)
    assert "goal: beam good rises at every iteration" in out.stdout
    rerun = subprocess.run([sys.executable, "-m", "bb3x_jax.experiments.bb3x_table", f"--workdir={workdir}", *flags],
                           cwd=REPO, capture_output=True, text=True, timeout=900,
                           env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert rerun.returncode == out.returncode and "[seed 3] judge:" in rerun.stdout  # every stage reused
    assert json.load(open(os.path.join(workdir, "bb3x_table.json")))["rows"] == result["rows"]
    # The committed config's two pinned worker processes (one thread each) run the same stages on the
    # same inputs as one process running them in turn: on this tiny run, the same table value for value
    # (over thousands of steps XLA's other summation order with one thread shows; docs/experiments.md).
    one_process = str(tmp_path / "one_process")
    sequential = subprocess.run([sys.executable, "-m", "bb3x_jax.experiments.bb3x_table", f"--workdir={one_process}",
                                 *flags, "--config.experiment.workers=0"], cwd=REPO, capture_output=True, text=True,
                                timeout=900, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert sequential.returncode == out.returncode, sequential.stderr[-3000:]
    in_turn = json.load(open(os.path.join(one_process, "bb3x_table.json")))
    assert json.dumps(in_turn["rows"]).replace(one_process, workdir) == json.dumps(result["rows"])
    assert in_turn["judge"] == result["judge"]
