"""BB3 -> BB3x on the synthetic world: ``python -m bb3x_jax.experiments.bb3x_table``.

The paper's claim (BlenderBot 3x, Xu et al. 2023): a model trained by likelihood on
the deployed bot's messages imitates their mixture of good and bad responses;
CRINGE driven by the feedback, iterated on the model's own generations labelled
by a classifier trained on that feedback, raises the share of good responses at
every iteration (85.3% -> 88.7% -> 90.9% -> 94.4%, graded by crowdworkers). This
script runs that recipe end to end on the synthetic release, on CPU, with
``configs/bb3x_table.py``, once per seed of ``experiment.seeds`` (the world's
and the training's), each in ``<workdir>/seed_<s>/``, the stages of every seed run as
jobs on ``experiment.workers`` pinned processes (``jobs.py``):

1. **baseline** (BB3's stand-in): ``baseline.objective`` (likelihood on every
   bot response) for ``baseline.steps`` steps from random weights;
2. **judge** (``experiment.label_judge=classifier``): the feedback classifier
   of ``--mode=train_judge``, fine-tuned from the baseline on the release's own
   likes, dislikes and crowdworker labels, and scored against the ground truth
   on the valid split;
3. **CRINGE iterations 1..N**: ``--mode=iterate`` from the baseline (generate
   with BB3's beam on training contexts, label with the judge, balance, train,
   evaluate);
4. **controls** (``control.enabled``): the baseline trained on by likelihood for
   as many steps as all iterations together; and (``control.same_data``) each
   named objective trained like the iterations on CRINGE's own generated splits,
   same steps (``mle_positive_only``: rejection sampling; ``unlikelihood``);
5. **sampled evaluation** (``sampled.enabled``): every model also graded on
   sampled responses (temperature ``sampled.temperature``), which show the
   learned distribution where beam search shows only its mode.

The synthetic world's ground truth plays the crowdworkers: it grades every
model on every context of ``eval.split`` and labels nothing that is trained on
(``experiment.label_judge=synthetic`` makes it the labeller too: an upper
bound, marked as such). The script writes ``bb3x_table.md`` (Table 9's layout,
mean +- standard deviation over the seeds), ``bb3x_table.png`` and
``bb3x_table.json`` (config, labeller, grader, seeds, goals, every cell and
every seed's value), and exits 0 only when every goal holds. Every stage reuses
what a previous (interrupted) run finished with the same settings, so running
it again continues; a finished training made with other settings is refused,
naming the setting, and an evaluation or judge made otherwise is made again.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import textwrap
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from ml_collections import config_dict, config_flags

from bb3x_jax import config as config_lib
from bb3x_jax import errors
from bb3x_jax.eval import judges
from bb3x_jax.experiments import jobs
from bb3x_jax.modes import iterate, train_judge
from bb3x_jax.modes import train as loop
from bb3x_jax.train import metrics_log, stages

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bb3x_table.py", "Experiment configuration.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/bb3x_table", "Where the experiment writes everything.")

GAIN_POINTS = 8.0  # the last iteration's mean beam good rate must be this many points above the baseline's
CONTROL_POINTS = 3.0  # ... and this many above every control's
SAMPLED_GOOD_POINTS = 3.0  # sampled good: last iteration >= baseline + this
SAMPLED_NONSENSE_POINTS = 2.0  # sampled nonsensical: last iteration <= baseline + this
JUDGE_BALANCED_ACCURACY = 85.0  # the labeller's balanced accuracy (%) on the valid split vs the ground truth
GOALS_MISSED_STATUS = 3  # exit status when the run finished but missed a goal (a crash exits 1)
GRADER = "the synthetic world's ground truth (synthetic.judge), on every context of the eval split"
JUDGE_SPLIT = "valid"


def seed_config(config: config_dict.ConfigDict, seed: int) -> config_dict.ConfigDict:
    """The experiment for one seed: the world (``data.synthetic.seed``) and the training
    (``seed``); the iterations labelled by ``experiment.label_judge``, every model graded by the
    ground truth."""
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        cfg.seed = seed
        cfg.data.synthetic.seed = seed
        cfg.iterate.judge = cfg.experiment.label_judge
        cfg.eval.judge = "synthetic"
    return config_lib.validate(cfg)


def baseline_config(config: config_dict.ConfigDict, workdir: str) -> config_dict.ConfigDict:
    # From random weights: nothing to anchor to.
    return iterate.derived_config(config, workdir, {"train.objective": config.baseline.objective,
                                                    "train.steps": config.baseline.steps, "train.kl_anchor": 0.0})


def control_config(config: config_dict.ConfigDict, workdir: str, start: str) -> config_dict.ConfigDict:
    return iterate.derived_config(config, workdir, {
        "train.objective": config.baseline.objective, "train.init_from": start,
        "train.steps": config.iterate.steps * config.iterate.iterations,
        "train.kl_anchor": 0.0,  # the baseline's own recipe, continued
    })


def label_judge_description(config: config_dict.ConfigDict) -> str:
    if config.experiment.label_judge == "synthetic":
        return ("the synthetic world's ground truth (an oracle that also grades: an upper bound, not the "
                "paper's setting)")
    j = config.judge
    start = "each seed's baseline" if j.init_from == "workdir" else (j.init_from or "random weights")
    return (f"feedback classifier (--mode=train_judge) trained on the release's own feedback only, "
            f"from {start}, {j.steps} steps")


class Stages:
    """Runs and times one seed's stages, printing a progress line as each ends."""

    def __init__(self, seed: int):
        self.seed, self.timings = seed, {}

    def __call__(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - started, 1)
        print(f"[seed {self.seed}] {name}: {self.timings[name]:.0f} s", flush=True)
        return out


def judge_stage(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """The feedback classifier of this seed, trained from the baseline unless one made with the same
    settings from the same baseline exists; returns its agreement with the ground truth on the
    valid split."""
    cfg = iterate.derived_config(config, workdir, {"eval.split": JUDGE_SPLIT})
    directory = judges.judge_path(cfg, workdir)
    settings = {key: value for key, value in cfg.judge.to_dict().items() if key != "path"}
    expected = {"judge": settings, "seed": cfg.seed, "eval_split": JUDGE_SPLIT,
                "baseline": os.path.relpath(iterate.latest_checkpoint(workdir), workdir)}
    stage_path = os.path.join(workdir, "judge_stage.json")
    report_path = os.path.join(directory, judges.REPORT_FILE)
    made = json.load(open(stage_path)) if os.path.exists(stage_path) else None
    if made == expected and os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
    else:
        report = train_judge.run(cfg, workdir)
        with open(stage_path, "w") as f:
            json.dump(expected, f, indent=1)
    return judge_summary(report)


def judge_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Percentages of the judge against the ground truth on every bot response of the valid split:
    accuracy, balanced accuracy, always-good's accuracy, precision and recall on bad responses, and
    the recall of each bad reason."""
    truth = report["ground_truth"]
    by_reason = truth["called_bad_by_true_reason"]
    pct = lambda x: None if x is None else round(100 * x, 2)  # noqa: E731
    return {
        "examples": truth["count"], "accuracy": pct(truth["accuracy"]),
        "balanced_accuracy": pct(truth["balanced_accuracy"]),
        "always_good_accuracy": pct(truth["good"] / truth["count"] if truth["count"] else None),
        "precision_bad": pct(truth["precision_bad"]), "recall_bad": pct(truth["recall_bad"]),
        "recall_bad_by_reason": {r: pct(v["called_bad"]) for r, v in by_reason.items() if r in REASON_ORDER},
        "good_called_bad": pct(by_reason["good"]["called_bad"]) if "good" in by_reason else None,
        "train_labelled": report["train"]["labelled"],
    }


def baseline_job(config: config_dict.ConfigDict, workdir: str, seed: int) -> dict[str, Any]:
    """Trains the seed's baseline unless a finished one made with the same settings exists; its timings."""
    os.makedirs(workdir, exist_ok=True)
    stage = Stages(seed)
    base = baseline_config(config, workdir)
    if not stages.training_finished(base, workdir, workdir):
        stage("baseline_train", loop.run, base, workdir)
    return {"rows": [], "timings_s": stage.timings}


def iterations_job(config: config_dict.ConfigDict, workdir: str, seed: int, _baseline: dict) -> dict[str, Any]:
    """The labelling judge (``experiment.label_judge=classifier``) and the CRINGE iterations from the
    baseline: one row per model (the baseline's first), the judge's scores, the timings."""
    stage = Stages(seed)
    judge = stage("judge", judge_stage, config, workdir) if config.experiment.label_judge == "classifier" else None
    rows = stage("iterations", iterate.run, config, workdir)
    labels = ["BB3 stand-in (baseline, " + config.baseline.objective + ")"]
    labels += [f"BB3x CRINGE iteration {r['iteration']}" for r in rows[1:]]
    return {"rows": [dict(row, name=name) for row, name in zip(rows, labels)], "judge": judge,
            "timings_s": stage.timings}


def control_job(config: config_dict.ConfigDict, workdir: str, seed: int, _baseline: dict) -> dict[str, Any]:
    """The baseline trained on by likelihood for as many steps as all the iterations take, evaluated."""
    stage = Stages(seed)
    control_dir = os.path.join(workdir, "control")
    cfg = control_config(config, workdir, iterate.starting_checkpoint(config, workdir))
    if not stages.training_finished(cfg, control_dir, workdir):
        stage("control_train", loop.run, cfg, control_dir)
    evaluation = stage("control_eval", iterate.evaluation, cfg, control_dir)
    row = iterate.result_row(0, iterate.latest_checkpoint(control_dir), evaluation, None)
    row = dict(row, iteration=None, name=f"control: baseline + {cfg.train.steps} more {cfg.train.objective} steps")
    return {"rows": [row], "timings_s": stage.timings}


def same_data_job(config: config_dict.ConfigDict, workdir: str, seed: int, objective: str,
                  iterations: dict) -> dict[str, Any]:
    """``objective`` trained like the iterations on CRINGE's generated splits (``same_data_control``)."""
    stage = Stages(seed)
    row = stage(f"control_{objective}", same_data_control, config, workdir, objective, iterations["rows"][0]["model"])
    return {"rows": [row], "timings_s": stage.timings}


def seed_result_job(config: config_dict.ConfigDict, workdir: str, seed: int, *parts: dict) -> dict[str, Any]:
    """One seed's table rows in order (baseline, iterations, controls), each also graded on sampled
    responses (``sampled.enabled``); written with the judge's scores and the stage timings to
    ``<workdir>/seed_result.json``."""
    stage = Stages(seed)
    table_rows = [row for part in parts for row in part["rows"]]
    if config.sampled.enabled:
        stage("sampled_eval", add_sampled_evaluations, config, workdir, table_rows)
    timings = {name: t for part in parts for name, t in part["timings_s"].items()}
    judge = next((part["judge"] for part in parts if "judge" in part), None)
    result = {"seed": seed, "rows": table_rows, "judge": judge, "timings_s": {**timings, **stage.timings}}
    with open(os.path.join(workdir, "seed_result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def experiment_jobs(config: config_dict.ConfigDict, workdir: str) -> list[jobs.Job]:
    """Every seed's stages as jobs, longest chains first: the baselines, the iterations, the same-data
    controls, the likelihood control, then each seed's sampled grading and result."""
    seeds = list(config.experiment.seeds)
    cfg = {s: seed_config(config, s) for s in seeds}
    run_dir = {s: os.path.join(workdir, f"seed_{s}") for s in seeds}
    name = lambda s, part: f"seed {s}: {part}"  # noqa: E731
    listed = [jobs.Job(name(s, "baseline"), baseline_job, (cfg[s], run_dir[s], s)) for s in seeds]
    listed += [jobs.Job(name(s, "iterations"), iterations_job, (cfg[s], run_dir[s], s), (name(s, "baseline"),))
               for s in seeds]
    listed += [jobs.Job(name(s, objective), same_data_job, (cfg[s], run_dir[s], s, objective),
                        (name(s, "iterations"),)) for s in seeds for objective in same_data_objectives(config)]
    if config.control.enabled:
        listed += [jobs.Job(name(s, "control"), control_job, (cfg[s], run_dir[s], s), (name(s, "baseline"),))
                   for s in seeds]
    for s in seeds:
        parts = [name(s, "baseline"), name(s, "iterations")] + ([name(s, "control")] if config.control.enabled else [])
        parts += [name(s, objective) for objective in same_data_objectives(config)]
        listed.append(jobs.Job(name(s, "result"), seed_result_job, (cfg[s], run_dir[s], s), tuple(parts)))
    return listed


def run_experiment(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    seeds = list(config.experiment.seeds)
    results = jobs.run_jobs(experiment_jobs(config, workdir), config.experiment.get("workers", 0),
                            setup=tfds.disable_progress_bar)
    per_seed = [results[f"seed {s}: result"] for s in seeds]
    rows = aggregate(per_seed)
    judge = [r["judge"] for r in per_seed] if config.experiment.label_judge == "classifier" else None
    checked = check_goals(rows, judge)
    result = {
        "label_judge": label_judge_description(config), "grader": GRADER, "seeds": seeds,
        "goals": checked["goals"], "goal_lines": checked["lines"], "gain_points": checked["gain_points"],
        "control_margins_points": checked["control_margins_points"], "rows": rows,
        "judge": None if judge is None else {"split": JUDGE_SPLIT, "per_seed": judge, **judge_means(judge)},
        "eval_split": config.eval.split, "timings_s": {str(r["seed"]): r["timings_s"] for r in per_seed},
        "wall_s": round(time.perf_counter() - started, 1), "config": json.loads(config.to_json_best_effort()),
    }
    with open(os.path.join(workdir, "bb3x_table.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = format_report(result)
    with open(os.path.join(workdir, "bb3x_table.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(workdir, "bb3x_table.png"), len(seeds))
    print(text)
    print(json.dumps({k: result[k] for k in ("goals", "wall_s")}))
    return result


def _stat(name: str, values: list[float]) -> dict[str, float | None]:
    """``<name>_mean`` and ``<name>_sd`` (the sample standard deviation; None for one seed), in points."""
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {f"{name}_mean": round(statistics.fmean(values), 2), f"{name}_sd": None if sd is None else round(sd, 2)}


def aggregate(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model over the seeds (percentages): mean and standard deviation of the beam and
    sampled good rates and the sampled nonsensical share, the mean of each beam bad reason and F1,
    and every seed's own values."""
    names = [r["name"] for r in per_seed[0]["rows"]]
    for result in per_seed[1:]:
        if [r["name"] for r in result["rows"]] != names:
            raise ValueError(f"seed {result['seed']} has other models than seed {per_seed[0]['seed']}")
    out = []
    for i, name in enumerate(names):
        cells = [result["rows"][i] for result in per_seed]
        seeds = [{"seed": result["seed"], "checkpoint": cell["model"], "beam_good": round(100 * cell["good_rate"], 2),
                  "f1": cell["f1"]} for result, cell in zip(per_seed, cells)]
        row = {"model": name, "iteration": cells[0].get("iteration"),
               **_stat("beam_good", [s["beam_good"] for s in seeds]),
               "beam_reasons_mean": {r: round(statistics.fmean(100 * c["reasons"].get(r, 0.0) for c in cells), 2)
                                     for r in REASON_ORDER},
               "f1_mean": round(statistics.fmean(c["f1"] for c in cells), 4)}
        if all("sampled" in c for c in cells):
            for s, c in zip(seeds, cells):
                s["sampled_good"] = round(100 * c["sampled"]["good_rate"], 2)
                s["sampled_nonsensical"] = round(100 * c["sampled"]["reasons"].get("nonsensical", 0.0), 2)
            row.update(_stat("sampled_good", [s["sampled_good"] for s in seeds]))
            row.update(_stat("sampled_nonsensical", [s["sampled_nonsensical"] for s in seeds]))
        row["per_seed"] = seeds
        out.append(row)
    return out


def judge_means(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("accuracy", "balanced_accuracy", "always_good_accuracy", "precision_bad", "recall_bad")
    means = {f"{k}_mean": round(statistics.fmean(j[k] for j in per_seed), 2) for k in keys}
    if len(per_seed) > 1:
        means["balanced_accuracy_sd"] = round(statistics.stdev(j["balanced_accuracy"] for j in per_seed), 2)
    reasons = sorted({r for j in per_seed for r in j["recall_bad_by_reason"]})
    means["recall_bad_by_reason_mean"] = {
        r: round(statistics.fmean(j["recall_bad_by_reason"][r] for j in per_seed if r in j["recall_bad_by_reason"]), 2)
        for r in reasons}
    return means


def same_data_objectives(config: config_dict.ConfigDict) -> list[str]:
    return [o.strip() for o in config.control.get("same_data", "").split(",") if o.strip()]


def same_data_control(config: config_dict.ConfigDict, workdir: str, objective: str, start: str) -> dict[str, Any]:
    """CRINGE's iterations with another objective: from the baseline, step ``i`` trains
    ``iterate.steps`` steps of ``objective`` on the release plus CRINGE's generated splits 1..i,
    the same data and steps CRINGE had (``mle_positive_only`` on them is rejection sampling), so the
    table separates what the loss adds from what the judged generations add. Its last model is
    evaluated like the iterations'."""
    previous = start
    for iteration in range(1, config.iterate.iterations + 1):
        run_dir = os.path.join(workdir, "controls", objective, str(iteration))
        cfg = copy.deepcopy(iterate.iteration_config(config, workdir, iteration, previous, start))
        with cfg.unlocked():
            cfg.train.objective = objective
        cfg = config_lib.validate(cfg)
        if not stages.training_finished(cfg, run_dir, workdir):
            loop.run(cfg, run_dir)
        previous = iterate.latest_checkpoint(run_dir)
    row = iterate.result_row(config.iterate.iterations, previous, iterate.evaluation(cfg, run_dir), None)
    return dict(row, iteration=None, name=f"control: {objective} on CRINGE's generated data")


def sampled_config(config: config_dict.ConfigDict, workdir: str, checkpoint: str) -> config_dict.ConfigDict:
    """Ancestral sampling (temperature ``sampled.temperature``, no filtering or blocking) of ``checkpoint``."""
    return iterate.derived_config(config, workdir, {
        "eval.checkpoint": os.path.basename(checkpoint),
        "eval.batches": 1,  # the likelihood metrics are the beam evaluation's; this one is about samples
        "generation.method": "sample", "generation.beam_size": 1, "generation.block_ngram": 0,
        "generation.context_block_ngram": 0, "generation.top_k": 0, "generation.top_p": 1.0,
        "generation.temperature": config.sampled.temperature,
    })


def add_sampled_evaluations(config: config_dict.ConfigDict, workdir: str, rows: list[dict[str, Any]]) -> None:
    """Adds ``sampled`` (good rate and reasons of sampled responses) to every row.

    Beam search shows a model's most likely response; sampling shows the
    distribution it learned, e.g. the bad share a likelihood-trained model
    imitates even where its mode is good. Written to ``<model's run>/sampled/``.
    """
    for row in rows:
        checkpoint = row["model"]
        run_dir = os.path.dirname(os.path.dirname(checkpoint))
        if os.path.abspath(run_dir) == os.path.abspath(workdir):  # the baseline: beside its other evaluation
            run_dir = iterate.iteration_dir(workdir, 0)
        out = os.path.join(run_dir, "sampled")
        os.makedirs(out, exist_ok=True)
        evaluation = iterate.evaluation(sampled_config(config, workdir, checkpoint), out,
                                        checkpoints_dir=os.path.dirname(checkpoint))
        gen = evaluation["generation"]
        row["sampled"] = {"good_rate": gen["good_rate"], "reasons": gen["reasons"], "examples": gen["examples"]}


def check_goals(rows: list[dict[str, Any]], judge: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The goals on the seeds' means: beam good up at every iteration, the last >= baseline +
    ``GAIN_POINTS`` and by more than two standard deviations (the larger of the two cells'), >= every
    control + ``CONTROL_POINTS``; sampled good >= baseline + ``SAMPLED_GOOD_POINTS`` and sampled
    nonsense <= baseline + ``SAMPLED_NONSENSE_POINTS``; the labelling judge's balanced accuracy >=
    ``JUDGE_BALANCED_ACCURACY`` and its accuracy above always-good's. ``goals`` maps each name to
    true or false; ``lines`` says each with its numbers."""
    iterations = [r for r in rows if r.get("iteration") is not None]
    controls = [r for r in rows if r.get("iteration") is None]
    base, last = iterations[0], iterations[-1]
    good = [r["beam_good_mean"] for r in iterations]
    gain = good[-1] - good[0]
    spread = None if base["beam_good_sd"] is None or last["beam_good_sd"] is None else max(
        base["beam_good_sd"], last["beam_good_sd"])
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    goals = {
        "beam_good_rises_every_iteration": all(b > a for a, b in zip(good, good[1:])),
        f"last_iteration_at_least_baseline_plus_{GAIN_POINTS:g}": gain >= GAIN_POINTS,
        "gain_exceeds_two_sd": spread is not None and gain > 2 * spread,
    }
    lines = [
        f"goal: beam good rises at every iteration: {yes(goals['beam_good_rises_every_iteration'])} "
        f"({' -> '.join(f'{g:.1f}' for g in good)})",
        f"goal: last iteration >= baseline + {GAIN_POINTS:g} points: "
        f"{yes(gain >= GAIN_POINTS)} ({gain:+.1f} points)",
        f"goal: gain > 2 standard deviations: {yes(goals['gain_exceeds_two_sd'])} "
        f"({gain:+.1f} against 2 x {'n/a (one seed)' if spread is None else f'{spread:.1f}'})",
    ]
    margins = {c["model"]: round(good[-1] - c["beam_good_mean"], 2) for c in controls}
    if controls:
        goals[f"beats_every_control_by_{CONTROL_POINTS:g}"] = all(m >= CONTROL_POINTS for m in margins.values())
        lines.append(f"goal: last iteration >= every control + {CONTROL_POINTS:g} points: "
                     f"{yes(goals[f'beats_every_control_by_{CONTROL_POINTS:g}'])} ("
                     + "; ".join(f"{n}: {m:+.1f}" for n, m in margins.items()) + ")")
    if "sampled_good_mean" in last and "sampled_good_mean" in base:
        good_gain = last["sampled_good_mean"] - base["sampled_good_mean"]
        nonsense_gain = last["sampled_nonsensical_mean"] - base["sampled_nonsensical_mean"]
        goals[f"sampled_good_at_least_baseline_plus_{SAMPLED_GOOD_POINTS:g}"] = good_gain >= SAMPLED_GOOD_POINTS
        goals[f"sampled_nonsensical_at_most_baseline_plus_{SAMPLED_NONSENSE_POINTS:g}"] = (
            nonsense_gain <= SAMPLED_NONSENSE_POINTS)
        lines.append(f"goal: sampled good >= baseline + {SAMPLED_GOOD_POINTS:g} points: "
                     f"{yes(good_gain >= SAMPLED_GOOD_POINTS)} ({base['sampled_good_mean']:.1f} -> "
                     f"{last['sampled_good_mean']:.1f}, {good_gain:+.1f})")
        lines.append(f"goal: sampled nonsensical <= baseline + {SAMPLED_NONSENSE_POINTS:g} points: "
                     f"{yes(nonsense_gain <= SAMPLED_NONSENSE_POINTS)} ({base['sampled_nonsensical_mean']:.1f} -> "
                     f"{last['sampled_nonsensical_mean']:.1f}, {nonsense_gain:+.1f})")
    if judge:
        means = judge_means(judge)
        balanced, accuracy = means["balanced_accuracy_mean"], means["accuracy_mean"]
        goals[f"judge_balanced_accuracy_at_least_{JUDGE_BALANCED_ACCURACY:g}"] = balanced >= JUDGE_BALANCED_ACCURACY
        goals["judge_accuracy_above_always_good"] = accuracy > means["always_good_accuracy_mean"]
        lines.append(f"goal: judge balanced accuracy >= {JUDGE_BALANCED_ACCURACY:g}% ({JUDGE_SPLIT} split): "
                     f"{yes(balanced >= JUDGE_BALANCED_ACCURACY)} ({balanced:.1f}%)")
        lines.append(f"goal: judge accuracy above always-good: "
                     f"{yes(goals['judge_accuracy_above_always_good'])} ({accuracy:.1f}% against "
                     f"{means['always_good_accuracy_mean']:.1f}%)")
    return {"goals": goals, "lines": lines, "gain_points": round(gain, 2), "control_margins_points": margins}


def goals_met(goals: dict[str, bool]) -> bool:
    return all(goals.values())


REASON_ORDER = ("inappropriate", "nonsensical", "off_topic", "ignoring_last_turn", "repeating")


def _cell(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.1f}" if sd is None else f"{mean:.1f} ± {sd:.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Table 9's layout: one row per model, good % (mean ± sd over the seeds) then each bad reason's
    mean % (beam search), F1, and with sampled evaluations the sampled good % and nonsensical %."""
    sampled = all("sampled_good_mean" in row for row in rows)
    head = ["Model", "Good %"] + [r.replace("_", " ") + " %" for r in REASON_ORDER] + ["F1"]
    head += ["sampled: good %", "sampled: nonsensical %"] if sampled else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cells = [row["model"], _cell(row["beam_good_mean"], row["beam_good_sd"])]
        cells += [f"{row['beam_reasons_mean'][r]:.1f}" for r in REASON_ORDER]
        cells.append(f"{row['f1_mean']:.3f}")
        if sampled:
            cells += [_cell(row["sampled_good_mean"], row["sampled_good_sd"]),
                      _cell(row["sampled_nonsensical_mean"], row["sampled_nonsensical_sd"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(result: dict[str, Any]) -> str:
    """The table with what labelled and what graded it, the judge's scores and the goals."""
    seeds = ", ".join(str(s) for s in result["seeds"])
    parts = [format_table(result["rows"]), "",
             f"Seeds {seeds}: mean ± standard deviation of the percentage per model.",
             f"Labels of the iterations' generations: {result['label_judge']}.",
             f"Graded by {result['grader']} ({result['eval_split']})."]
    judge = result.get("judge")
    if judge:
        reasons = ", ".join(f"{r.replace('_', ' ')} {v:.0f}%" for r, v in judge["recall_bad_by_reason_mean"].items())
        parts.append(f"The labelling judge on the {judge['split']} split against the ground truth (mean over the "
                     f"seeds): accuracy {judge['accuracy_mean']:.1f}% (always-good "
                     f"{judge['always_good_accuracy_mean']:.1f}%), balanced accuracy "
                     f"{judge['balanced_accuracy_mean']:.1f}%, precision on bad {judge['precision_bad_mean']:.1f}%, "
                     f"recall on bad {judge['recall_bad_mean']:.1f}% (by reason: {reasons}).")
    return "\n".join(parts + [""] + result["goal_lines"])


def plot(rows: list[dict[str, Any]], path: str, seeds: int) -> str | None:
    """Bars: mean good % per model with the seeds' standard deviation, beam search and sampled
    (left); each bad reason's mean % per model under beam search (right)."""
    fig = metrics_log.agg_figure((13, 4.5), "chart")
    if fig is None:
        return None
    names = [textwrap.fill(r["model"].replace("BB3x CRINGE ", "CRINGE "), 16) for r in rows]
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 3]})
    colors = ["#888888" if r.get("iteration") == 0 else "#d08c2a" if r.get("iteration") is None else "#2b7bba"
              for r in rows]
    positions = np.arange(len(rows), dtype=float)
    sampled = all("sampled_good_mean" in row for row in rows)
    offset, width = (0.2, 0.4) if sampled else (0.0, 0.8)
    sd = lambda key: [r[key] or 0.0 for r in rows] if seeds > 1 else None  # noqa: E731
    bars = left.bar(positions - offset, [r["beam_good_mean"] for r in rows], width, color=colors,
                    yerr=sd("beam_good_sd"), capsize=3, label="beam search (BB3)")
    left.bar_label(bars, fmt="%.1f", fontsize=7)
    if sampled:
        bars = left.bar(positions + offset, [r["sampled_good_mean"] for r in rows], width, color=colors, alpha=0.45,
                        hatch="//", yerr=sd("sampled_good_sd"), capsize=3, label="sampled (temperature 1)")
        left.bar_label(bars, fmt="%.1f", fontsize=7)
        left.legend(fontsize=7, loc="lower right")
    left.set_xticks(positions, names, fontsize=7)
    left.set_ylabel(f"good responses (%), mean of {seeds} seed{'s' if seeds > 1 else ''}")
    left.set_ylim(0, 100)
    left.set_title("graded by the synthetic world's ground truth")
    bar = 0.8 / len(rows)
    x = np.arange(len(REASON_ORDER))
    for i, (row, name) in enumerate(zip(rows, names)):
        right.bar(x + i * bar, [row["beam_reasons_mean"][r] for r in REASON_ORDER], bar,
                  label=name.replace("\n", " "), color=colors[i] if row.get("iteration") in (0, None) else None)
    right.set_xticks(x + bar * (len(rows) - 1) / 2, [r.replace("_", " ") for r in REASON_ORDER])
    right.set_ylabel("share of responses (%)")
    right.set_title("bad responses by reason (beam search)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def validate_experiment(config: config_dict.ConfigDict) -> None:
    """The experiment's own sections, checked before anything runs (one line each)."""
    for section in ("baseline", "control", "sampled", "experiment"):
        if section not in config:
            raise config_lib.ConfigError(section, "missing: use configs/bb3x_table.py or a config built on it")
    seeds = list(config.experiment.seeds)
    if not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise config_lib.ConfigError("experiment.seeds", f"{tuple(seeds)!r} is not a tuple of distinct seeds >= 0")
    workers, cpus = config.experiment.get("workers", 0), len(os.sched_getaffinity(0))
    if not isinstance(workers, int) or not 0 <= workers <= cpus:
        raise config_lib.ConfigError("experiment.workers", f"{workers!r} is not 0..{cpus} (worker processes; 0 or 1: "
                                     f"this process; {cpus} usable CPUs here)")
    if config.experiment.label_judge not in ("classifier", "synthetic"):
        raise config_lib.ConfigError("experiment.label_judge",
                                     f"{config.experiment.label_judge!r} is not classifier or synthetic")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = config_lib.validate(_CONFIG.value)
        validate_experiment(config)
        result = run_experiment(config, _WORKDIR.value)
    except (errors.UserError, FileNotFoundError) as error:  # what the user fixes: one line, exit 2
        if os.environ.get("BB3X_DEBUG"):
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if goals_met(result["goals"]) else GOALS_MISSED_STATUS)


if __name__ == "__main__":
    app.run(main)
