"""BB3 -> BB3x on the synthetic world: ``python -m bb3x_jax.experiments.bb3x_table``.

The paper's claim (BlenderBot 3x, Xu et al. 2023): a model trained by likelihood on
the deployed bot's messages imitates their mixture of good and bad responses;
CRINGE driven by the feedback, iterated on the model's own judged generations,
raises the share of good responses at every iteration (85.3% -> 88.7% ->
90.9% -> 94.4%). This script runs that recipe end to end on the synthetic
release, on CPU, with ``configs/bb3x_table.py``:

1. **baseline** (BB3's stand-in): ``baseline.objective`` (likelihood on every
   bot response) for ``baseline.steps`` steps from random weights;
2. **CRINGE iterations 1..N**: ``--mode=iterate`` from the baseline (generate
   with BB3's beam on training contexts, judge, balance, train, evaluate);
3. **control** (``control.enabled``): the baseline trained on by likelihood for
   as many steps as all iterations together, so the table separates what
   CRINGE adds from what more training adds;
   and (``control.same_data``) each named objective trained like the
   iterations on CRINGE's own generated splits, same steps (e.g.
   ``mle_positive_only``: rejection sampling; ``unlikelihood``);
4. **sampled evaluation** (``sampled.enabled``): every model also judged on
   sampled responses (temperature ``sampled.temperature``), which show the
   learned distribution where beam search shows only its mode;

and writes ``bb3x_table.md`` (the paper's Table 9 layout: the good-response
rate and every bad reason per model, judged by the world's ground truth on
every context of ``eval.split``), ``bb3x_table.png`` (bar chart) and
``bb3x_table.json`` (rows, goals, stage timings). Every stage reuses what a
previous (interrupted) run finished with the same settings, so running it again
continues; a finished training made with other settings is refused, naming the
setting, and an evaluation made otherwise is made again.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import textwrap
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from bb3x_jax import config as config_lib
from bb3x_jax.modes import iterate
from bb3x_jax.modes import train as loop
from bb3x_jax.train import stages

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bb3x_table.py", "Experiment configuration.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/bb3x_table", "Where the experiment writes everything.")

GOAL_POINTS = 5.0  # iteration N must be this many points above the baseline
CONTROL_POINTS = 3.0  # ... and this many above every control
GOALS_MISSED_STATUS = 3  # exit status when the run finished but missed a goal (a crash exits 1)


def baseline_config(config: config_dict.ConfigDict, workdir: str) -> config_dict.ConfigDict:
    return iterate.derived_config(config, workdir, {"train.objective": config.baseline.objective,
                                                    "train.steps": config.baseline.steps})


def control_config(config: config_dict.ConfigDict, workdir: str, start: str) -> config_dict.ConfigDict:
    return iterate.derived_config(config, workdir, {
        "train.objective": config.baseline.objective, "train.init_from": start,
        "train.steps": config.iterate.steps * config.iterate.iterations,
    })


def _timed(timings: dict[str, float], name: str, fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[name] = round(time.perf_counter() - started, 1)
    return out


def run_experiment(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    base = baseline_config(config, workdir)
    if not stages.training_finished(base, workdir, workdir):
        _timed(timings, "baseline_train", loop.run, base, workdir)
    rows = _timed(timings, "iterations", iterate.run, config, workdir)
    labels = ["BB3 stand-in (baseline, " + config.baseline.objective + ")"]
    labels += [f"BB3x CRINGE iteration {r['iteration']}" for r in rows[1:]]
    table_rows = [dict(row, name=name) for row, name in zip(rows, labels)]
    if config.control.enabled:
        control_dir = os.path.join(workdir, "control")
        cfg = control_config(config, workdir, rows[0]["model"])
        if not stages.training_finished(cfg, control_dir, workdir):
            _timed(timings, "control_train", loop.run, cfg, control_dir)
        evaluation = _timed(timings, "control_eval", iterate.evaluation, cfg, control_dir)
        row = iterate.result_row(0, iterate.latest_checkpoint(control_dir), evaluation, None)
        table_rows.append(dict(row, iteration=None,
                               name=f"control: baseline + {cfg.train.steps} more {cfg.train.objective} steps"))
    for objective in same_data_objectives(config):
        table_rows.append(_timed(timings, f"control_{objective}", same_data_control, config, workdir, objective,
                                 rows[0]["model"]))
    if config.sampled.enabled:
        _timed(timings, "sampled_eval", add_sampled_evaluations, config, workdir, table_rows)
    goals = check_goals(rows, [r for r in table_rows if r.get("iteration") is None])
    result = {
        "rows": table_rows, "goals": goals, "timings_s": timings,
        "wall_s": round(time.perf_counter() - started, 1),
        "eval_split": config.eval.split, "config": json.loads(config.to_json_best_effort()),
    }
    with open(os.path.join(workdir, "bb3x_table.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = format_table(table_rows)
    with open(os.path.join(workdir, "bb3x_table.md"), "w") as f:
        f.write(table + "\n")
    plot(table_rows, os.path.join(workdir, "bb3x_table.png"))
    print(table)
    for line in goals["lines"]:
        print(line)
    print(json.dumps({k: result[k] for k in ("goals", "timings_s", "wall_s")}))
    return result


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
        cfg = copy.deepcopy(iterate.iteration_config(config, workdir, iteration, previous))
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


def check_goals(rows: list[dict[str, Any]], controls: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The experiment's goals: good rate up at every iteration, the last >= baseline + 5 points and
    >= every control + ``CONTROL_POINTS``."""
    good = [100 * r["good_rate"] for r in rows]
    every = all(b > a for a, b in zip(good, good[1:]))
    gain = good[-1] - good[0]
    margins = {c["name"]: round(good[-1] - 100 * c["good_rate"], 2) for c in controls}
    beaten = all(m >= CONTROL_POINTS for m in margins.values())
    lines = [
        f"goal: better at every iteration: {'yes' if every else 'NO'} ({' -> '.join(f'{g:.1f}' for g in good)})",
        f"goal: last iteration >= baseline + {GOAL_POINTS:g} points: {'yes' if gain >= GOAL_POINTS else 'NO'} "
        f"({gain:+.1f} points)",
    ]
    if controls:
        lines.append(f"goal: last iteration >= every control + {CONTROL_POINTS:g} points: "
                     f"{'yes' if beaten else 'NO'} (" + "; ".join(f"{n}: {m:+.1f}" for n, m in margins.items()) + ")")
    return {"every_iteration_better": every, "gain_points": round(gain, 2), "gain_goal_met": gain >= GOAL_POINTS,
            "control_margins_points": margins, "controls_beaten": beaten, "lines": lines}


def goals_met(goals: dict[str, Any]) -> bool:
    return goals["every_iteration_better"] and goals["gain_goal_met"] and goals.get("controls_beaten", True)


REASON_ORDER = ("inappropriate", "nonsensical", "off_topic", "ignoring_last_turn", "repeating")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Table 9's layout: one row per model, good % then each bad reason's % (beam search), F1, and
    with sampled evaluations the sampled good % and nonsensical %."""
    sampled = all("sampled" in row for row in rows)
    head = ["Model", "Good %"] + [r.replace("_", " ") + " %" for r in REASON_ORDER] + ["F1"]
    head += ["sampled: good %", "sampled: nonsensical %"] if sampled else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cells = [row["name"], f"{100 * row['good_rate']:.1f}"]
        cells += [f"{100 * row['reasons'].get(r, 0.0):.1f}" for r in REASON_ORDER]
        cells.append(f"{row['f1']:.3f}")
        if sampled:
            cells += [f"{100 * row['sampled']['good_rate']:.1f}",
                      f"{100 * row['sampled']['reasons'].get('nonsensical', 0.0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> str | None:
    """Bars: good % per model, beam search and sampled (left); each bad reason's % per model under
    beam search (right)."""
    try:
        import matplotlib  # deferred: slow to import, only the plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: slow to import, only the plot needs it
    except ImportError:
        logging.warning("matplotlib is not installed: no chart")
        return None

    names = [textwrap.fill(r["name"].replace("BB3x CRINGE ", "CRINGE "), 16) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 3]})
    good = [100 * r["good_rate"] for r in rows]
    colors = ["#888888"] + ["#2b7bba"] * (len(rows) - 1)
    if rows[-1].get("iteration") is None:  # the control
        colors[-1] = "#d08c2a"
    positions = np.arange(len(rows), dtype=float)
    sampled = all("sampled" in row for row in rows)
    offset = 0.2 if sampled else 0.0
    bars = left.bar(positions - offset, good, 0.4 if sampled else 0.8, color=colors, label="beam search (BB3)")
    left.bar_label(bars, fmt="%.1f", fontsize=7)
    if sampled:
        bars = left.bar(positions + offset, [100 * r["sampled"]["good_rate"] for r in rows], 0.4, color=colors,
                        alpha=0.45, hatch="//", label="sampled (temperature 1)")
        left.bar_label(bars, fmt="%.1f", fontsize=7)
        left.legend(fontsize=7, loc="lower right")
    left.set_xticks(positions, names, fontsize=7)
    left.set_ylabel("good responses (%)")
    left.set_ylim(0, 100)
    left.set_title("judged good (synthetic world's ground truth)")
    width = 0.8 / len(rows)
    x = np.arange(len(REASON_ORDER))
    for i, (row, name) in enumerate(zip(rows, names)):
        right.bar(x + i * width, [100 * row["reasons"].get(r, 0.0) for r in REASON_ORDER], width,
                  label=name.replace("\n", " "), color=colors[i] if i == 0 or row.get("iteration") is None else None)
    right.set_xticks(x + width * (len(rows) - 1) / 2, [r.replace("_", " ") for r in REASON_ORDER])
    right.set_ylabel("share of responses (%)")
    right.set_title("bad responses by reason (beam search)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_lib.validate(_CONFIG.value)
    for section in ("baseline", "control", "sampled"):
        if section not in config:
            raise config_lib.ConfigError(section, "missing: use configs/bb3x_table.py or a config built on it")

    tfds.disable_progress_bar()
    result = run_experiment(config, _WORKDIR.value)
    goals = result["goals"]
    sys.exit(0 if goals_met(goals) else GOALS_MISSED_STATUS)


if __name__ == "__main__":
    app.run(main)
