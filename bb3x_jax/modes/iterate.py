"""``--mode=iterate``: iterative CRINGE, the BB3x procedure, from the workdir's model.

Iteration 0 is the model already trained in the workdir (``--mode=train``,
e.g. the MLE baseline standing in for BB3). Iteration ``i`` then

1. generates, with the configured decoding (``config.generation``: BB3's beam
   search by default), a response for ``iterate.contexts`` contexts drawn from
   the train split (a fresh seeded draw per iteration), using model ``i - 1``;
2. labels each response with the judge (the synthetic world's ground truth,
   or the feedback classifier of ``--mode=train_judge``);
3. balances them 50/50 into positives and negatives, each distinct positive at
   most twice (``generated.balance``) and writes them as a prepared split;
4. trains ``iterate.steps`` steps of ``config.train`` (CRINGE) starting from
   model ``i - 1``'s weights, on the release's train split followed by every
   generated split so far (``data.extra_train``), so the negatives track what
   the current model does wrong while the organic feedback stays in the mix;
5. evaluates the new model like ``--mode=eval`` (likelihoods, F1, the judge's
   good rate by bad reason).

Layout: ``<workdir>/iterations/<i>/`` holds iteration ``i``'s generated split
(``generated/``), its training run (checkpoints, metrics, summary) and its
evaluation; ``iterations/0/`` holds the starting model's evaluation. Each
stage is skipped when its output is complete and was made with this run's
settings (``bb3x_jax.train.stages``), and the training run resumes from its own
checkpoints, so an interrupted ``--mode=iterate`` picks up where it stopped; a
rerun with other settings evaluates again, or refuses a finished split or
training made otherwise, naming the setting. ``<workdir>/iterations/results.json`` and ``results.md`` gather one row
per iteration.

With ``iterate.deployment`` set to a deployment folder (people's rated chats
with the newest model, in the release's format), the run makes one iteration,
the one after those already trained, whose split is that feedback instead of
generations judged (``deployment_feedback``); a folder an evaluated iteration
already trained on is refused, so the same feedback is never trained on twice.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from ml_collections import config_dict

from bb3x_jax import config as config_lib
from bb3x_jax.data import deployment_feedback, generated, schema
from bb3x_jax.data.tokenizers.base import as_text
from bb3x_jax.eval import generation as generation_eval
from bb3x_jax.eval import judges
from bb3x_jax.modes import eval as eval_run
from bb3x_jax.modes import train as loop
from bb3x_jax.train import checkpoint as checkpoint_lib
from bb3x_jax.train import inputs as dataset
from bb3x_jax.train import runtime, stages


def iteration_dir(workdir: str, iteration: int) -> str:
    return os.path.join(workdir, "iterations", str(iteration))


def derived_config(config: config_dict.ConfigDict, workdir: str, changes: dict[str, Any]) -> config_dict.ConfigDict:
    """``config`` with ``changes`` (dotted keys), reading ``workdir``'s prepared data and judge, validated.

    Every run this mode (and the experiment) starts inside the workdir shares
    the workdir's release and feedback classifier instead of preparing its own.
    A shortened run keeps its warmup within its steps.
    """
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        cfg.data.dir = dataset.data_root(config.data, workdir)
        cfg.judge.path = judges.judge_path(config, workdir)
        cfg.update_from_flattened_dict(changes)
        cfg.train.warmup_steps = min(cfg.train.warmup_steps, cfg.train.steps)
    return config_lib.validate(cfg)


def iteration_config(config: config_dict.ConfigDict, workdir: str, iteration: int,
                     init_from: str, baseline: str) -> config_dict.ConfigDict:
    """The training run of ``iteration``: ``config.train`` for ``iterate.steps`` steps from
    ``init_from``, on the train split plus generated splits 1..iteration; anchored (``train.kl_anchor``)
    to ``init_from`` or, with ``iterate.anchor=baseline``, to ``baseline`` (iteration 0's model)."""
    splits = [os.path.join(iteration_dir(workdir, i), "generated") for i in range(1, iteration + 1)]
    # Iteration 1 starts from the baseline: the same run either way, and the same recorded settings.
    anchored_to_baseline = config.train.kl_anchor and config.iterate.anchor == "baseline" and baseline != init_from
    return derived_config(config, workdir, {
        "seed": config.seed + iteration,
        "train.steps": config.iterate.steps,
        "train.init_from": init_from,
        "train.kl_anchor_from": baseline if anchored_to_baseline else config.train.kl_anchor_from,
        "data.extra_train": tuple(p for p in splits for _ in range(config.iterate.generated_repeat)),
        "eval.checkpoint": "latest",  # the model the next iteration continues from
    })


def starting_checkpoint(config: config_dict.ConfigDict, workdir: str) -> str:
    """The step folder of iteration 0: the workdir's ``eval.checkpoint`` (best by default)."""
    checkpoints = runtime.checkpointer(config, workdir)
    try:
        step = runtime.choose_step(checkpoints, config.eval.checkpoint)
    finally:
        checkpoints.close()
    return os.path.join(checkpoints.directory, str(step))


def latest_checkpoint(run_dir: str) -> str:
    directory = os.path.join(run_dir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
    if not steps:
        raise FileNotFoundError(f"{directory}: no checkpoint")
    return os.path.join(directory, str(steps[-1]))


def draw_contexts(records, count: int, seed: int, iteration: int) -> list[dict]:
    """``count`` train records (all when 0 or more than there are), a seeded draw per iteration."""
    n = len(records)
    if not count or count >= n:
        indices = np.arange(n)
    else:
        indices = np.sort(np.random.default_rng([seed, iteration]).choice(n, size=count, replace=False))
    return records.__getitems__([int(i) for i in indices])


def generate_split(config: config_dict.ConfigDict, workdir: str, iteration: int, checkpoint: str,
                   judge: judges.Judge) -> dict[str, Any]:
    """Stage 1-3: generate with the model at ``checkpoint``, judge, balance, write the split."""

    started = time.perf_counter()
    # The model (architecture and weights) and its tokenizer are those of `checkpoint`.
    cfg = derived_config(config, workdir, {"train.init_from": checkpoint})
    setup = runtime.Setup(cfg, workdir, with_optimizer=False)
    records = draw_contexts(dataset.source(setup.built, "train"), config.iterate.contexts, config.seed, iteration)
    contexts = [as_text(r["context"]) for r in records]
    network = nnx.merge(setup.graphdef, setup.params, setup.rest)
    settings = config_lib.generation_settings(config)
    responses = generation_eval.generate_texts(
        network, setup.tokenizer, contexts, settings, framing=setup.framing,
        batch_size=config.eval.generate_batch,
        seed=config.seed + iteration,
    )
    generated_s = time.perf_counter() - started
    verdicts = list(judge.verdicts(contexts, responses))
    examples = [
        {"context": c, "label": r, "verdict": v, "iteration": iteration,
         "feedback": schema.POSITIVE if v == "good" else schema.NEGATIVE}
        for c, r, v in zip(contexts, responses, verdicts)
    ]
    balanced, counts = generated.balance(examples, seed=config.seed + iteration)
    meta = {
        "iteration": iteration, "model": checkpoint, "model_in_workdir": os.path.relpath(checkpoint, workdir),
        "judge": judge.name, "settings": dataclasses.asdict(settings), "seed": config.seed,
        "contexts_requested": config.iterate.contexts, "contexts": len(contexts), "balance": counts,
        "verdicts": generation_eval.judge_summary(verdicts, judge.bad_reasons),
        "generate_s": round(generated_s, 1),
    }
    path = os.path.join(iteration_dir(workdir, iteration), "generated")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    written = generated.write_split(path, balanced, meta)
    print(f"iteration {iteration}: {len(contexts)} generations in {generated_s:.0f}s, "
          f"judged good {100 * meta['verdicts']['good_rate']:.1f}%; kept {counts['positive_kept']} positive + "
          f"{counts['negative_kept']} negative -> {path}")
    return written


def _judge_identity(name: Any) -> Any:
    """A recorded value as compared: a feedback classifier is the same judge wherever its folder lies
    (a moved or copied workdir), so its name counts by its weights' digest; anything else as it is."""
    match = re.fullmatch(r"feedback classifier .+ \(weights (\w+)\)", name) if isinstance(name, str) else None
    return ("feedback classifier", match.group(1)) if match else name


def check_split_matches(meta: dict[str, Any], path: str, config: config_dict.ConfigDict, workdir: str,
                        checkpoint: str, judge_name: str) -> None:
    """A finished split is reused only if it was made the way this run would make it (the model
    compared by its place in the workdir, so a moved workdir still resumes)."""
    expected = {"model_in_workdir": os.path.relpath(checkpoint, workdir)}
    if meta.get("labels") != deployment_feedback.LABELS:  # feedback is read, not generated: no settings
        expected.update({"judge": judge_name, "contexts_requested": config.iterate.contexts, "seed": config.seed,
                         "settings": dataclasses.asdict(config_lib.generation_settings(config))})
    different = [key for key, value in expected.items() if _judge_identity(meta.get(key)) != _judge_identity(value)]
    if different:
        raise config_lib.ConfigError(
            "iterate", f"{path} was generated with other {', '.join(different)} than this run's "
            f"({', '.join(f'{k}={meta.get(k)!r}' for k in different)}); move it away to generate it again")


def evaluation_path(config: config_dict.ConfigDict, run_dir: str) -> str:
    return os.path.join(run_dir, f"eval_{config.eval.split}.json")


def evaluated_checkpoint(config: config_dict.ConfigDict, run_dir: str, checkpoints_dir: str | None = None) -> str:
    """The step folder ``--mode=eval`` would read: ``eval.checkpoint`` of ``checkpoints_dir`` (or the run's)."""
    directory = checkpoints_dir or os.path.join(run_dir, "checkpoints")
    checkpoints = checkpoint_lib.Checkpointer(directory, best_metric=config.checkpoint.best_metric,
                                              best_mode=config.checkpoint.best_mode, async_save=False)
    try:
        return os.path.join(directory, str(runtime.choose_step(checkpoints, config.eval.checkpoint)))
    finally:
        checkpoints.close()


def evaluation(config: config_dict.ConfigDict, run_dir: str, checkpoints_dir: str | None = None) -> dict[str, Any]:
    """The run's evaluation (``--mode=eval``), reused only when it was made from the same checkpoint with
    the same settings (``stages.evaluation_settings``), else made again."""
    path = evaluation_path(config, run_dir)
    expected = stages.evaluation_settings(config, evaluated_checkpoint(config, run_dir, checkpoints_dir), run_dir)
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
        changed = stages.changed_settings(report.get(stages.SETTINGS_KEY), expected)
        if not changed:
            return report
        logging.info("%s was made with other settings (%s): evaluating again", path, ", ".join(changed[:5]))
    eval_run.run(config, run_dir, checkpoints_dir=checkpoints_dir)
    with open(path) as f:
        report = json.load(f)
    report[stages.SETTINGS_KEY] = expected
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    return report


def _baseline_evaluation(config: config_dict.ConfigDict, workdir: str, checkpoint: str) -> dict[str, Any]:
    """Iteration 0's evaluation, written to iterations/0 (the workdir's own eval files stay as they are)."""
    run_dir = iteration_dir(workdir, 0)
    os.makedirs(run_dir, exist_ok=True)
    cfg = derived_config(config, workdir, {"eval.checkpoint": os.path.basename(checkpoint)})
    return evaluation(cfg, run_dir, checkpoints_dir=os.path.dirname(checkpoint))


def result_row(iteration: int, checkpoint: str, evaluation: dict[str, Any],
               split_meta: dict[str, Any] | None) -> dict[str, Any]:
    gen = evaluation.get("generation", {})
    row = {
        "iteration": iteration, "model": checkpoint,
        "good_rate": gen.get("good_rate"), "reasons": gen.get("reasons", {}), "f1": gen.get("f1"),
        "generations": gen.get("examples"),
        "ppl_positive": evaluation.get("ppl_positive"), "ppl_negative": evaluation.get("ppl_negative"),
        "nll_gap": evaluation.get("nll_gap_negative_minus_positive"),
    }
    if split_meta is not None:
        row["train_generated"] = {"good_rate": _labelled_good_rate(split_meta),
                                  "positive": split_meta["positive"], "negative": split_meta["negative"]}
        if "deployment" in split_meta:
            row["train_generated"]["deployment"] = split_meta["deployment"]
    return row


def _labelled_good_rate(split_meta: dict[str, Any]) -> float | None:
    """The share of the split's labelled responses that were good, before balancing."""
    if "verdicts" in split_meta:
        return split_meta["verdicts"]["good_rate"]
    counts = split_meta["deployment_counts"]
    rated = counts["rated_positive"] + counts["rated_negative"]
    return counts["rated_positive"] / rated if rated else None


def format_results(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per iteration, good rate and each bad reason (percent)."""
    reasons = sorted({r for row in rows for r in row["reasons"]})
    head = ["iteration", "good %"] + [f"{r} %" for r in reasons] + ["F1", "ppl +", "ppl -"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        cells = [str(row["iteration"]), pct(row["good_rate"])] + [pct(row["reasons"].get(r, 0.0)) for r in reasons]
        cells += [num(row["f1"], ".3f"), num(row["ppl_positive"], ".2f"), num(row["ppl_negative"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(config: config_dict.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    if jax.process_count() > 1:
        raise config_lib.ConfigError("distributed", "--mode=iterate runs in one process: its generation and "
                                     "judging are single-host (train the baseline on many hosts, iterate on one)")
    if not config.eval.generate_examples:
        raise config_lib.ConfigError("eval.generate_examples", "--mode=iterate evaluates generations: must be > 0")
    if config.iterate.deployment:
        return run_from_deployment(config, workdir)
    judge = judges.make_judge(config, workdir, config.iterate.judge)
    if judge is None:
        raise config_lib.ConfigError("iterate.judge", "no judge: train one with --mode=train_judge "
                                     f"(looked for {judges.judge_path(config, workdir)}) or name one")
    return iterations(
        config, workdir, config.iterate.iterations, judge.name,
        make_split=lambda i, previous: generate_split(config, workdir, i, previous, judge),
        check_split=lambda meta, path, previous, i: check_split_matches(meta, path, config, workdir, previous,
                                                                        judge.name))


def iterations(config: config_dict.ConfigDict, workdir: str, last: int, judge_name: str, *, make_split,
               check_split) -> list[dict[str, Any]]:
    """Iterations 1..``last``, each stage skipped when its output is complete; ``make_split(i, previous)``
    writes iteration i's split when it has none, ``check_split(meta, path, previous, i)`` vets one."""
    start = starting_checkpoint(config, workdir)
    rows = [result_row(0, start, _baseline_evaluation(config, workdir, start), None)]
    previous = start
    for iteration in range(1, last + 1):
        run_dir = iteration_dir(workdir, iteration)
        split_path = os.path.join(run_dir, "generated")
        if not os.path.exists(os.path.join(split_path, "meta.json")):
            make_split(iteration, previous)
        split_meta = json.load(open(os.path.join(split_path, "meta.json")))
        check_split(split_meta, split_path, previous, iteration)
        cfg = iteration_config(config, workdir, iteration, previous, start)
        if not stages.training_finished(cfg, run_dir, workdir):
            logging.info("iteration %d: training %d steps from %s", iteration, cfg.train.steps, previous)
            loop.run(cfg, run_dir)
        previous = latest_checkpoint(run_dir)
        rows.append(result_row(iteration, previous, evaluation(cfg, run_dir), split_meta))
        _write_results(workdir, rows, judge_name)  # after every iteration: progress is readable while it runs
    print(format_results(rows))
    return rows


def run_from_deployment(config: config_dict.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """One iteration whose split is a deployment folder's rated feedback on the newest model; the
    iterations before it are only reported (their evaluations computed when missing)."""
    feedback = deployment_feedback.read(config.iterate.deployment, config_lib.feedback_policy(config),
                                        skip_malformed=config.data.skip_malformed)
    if not (feedback.counts["rated_positive"] and feedback.counts["rated_negative"]):
        raise config_lib.ConfigError(
            deployment_feedback.KEY, f"{feedback.folder}: balancing needs both liked and disliked replies, got "
            f"{feedback.counts['rated_positive']} positive and {feedback.counts['rated_negative']} negative")
    target = deployment_iteration(config, workdir, feedback)
    judge = judges.make_judge(config, workdir)  # what rates the evaluations' generations, if anything

    def check_split(meta, path, previous, i):
        if i == target:
            check_split_matches(meta, path, config, workdir, previous, deployment_feedback.LABELS)

    return iterations(
        config, workdir, max(target, trained_iterations(workdir)), "none" if judge is None else judge.name,
        make_split=lambda i, previous: deployment_split(config, workdir, i, previous, feedback),
        check_split=check_split)


def trained_iterations(workdir: str) -> int:
    """How many iterations (1, 2, ... in order) finished training."""
    count = 0
    while os.path.exists(os.path.join(iteration_dir(workdir, count + 1), "summary.json")):
        count += 1
    return count


def _split_meta(workdir: str, iteration: int) -> dict[str, Any] | None:
    path = os.path.join(iteration_dir(workdir, iteration), "generated", "meta.json")
    return json.load(open(path)) if os.path.exists(path) else None


def deployment_iteration(config: config_dict.ConfigDict, workdir: str, feedback: deployment_feedback.Feedback) -> int:
    """The iteration ``feedback`` trains: the one that recorded its fingerprint when that one is not
    evaluated yet (an interrupted run resumes), else the one after the trained ones. A folder an evaluated
    iteration already trained on is refused: a new iteration needs feedback on the newest model."""
    trained = trained_iterations(workdir)
    for iteration in range(1, trained + 2):
        meta = _split_meta(workdir, iteration) or {}
        if meta.get("deployment_fingerprint") != feedback.fingerprint:
            continue
        if os.path.exists(evaluation_path(config, iteration_dir(workdir, iteration))):
            raise config_lib.ConfigError(
                deployment_feedback.KEY, f"{feedback.folder}: iteration {iteration} already trained on this "
                f"feedback (same content, fingerprint {feedback.fingerprint}, read from {meta['deployment']}); "
                f"give a folder of new feedback on iteration {trained}'s model")
        return iteration
    pending = _split_meta(workdir, trained + 1)
    if pending is not None:
        source = pending.get("deployment") or pending.get("judge")
        raise config_lib.ConfigError(
            deployment_feedback.KEY, f"{iteration_dir(workdir, trained + 1)} holds an unfinished iteration made "
            f"from {source}; finish it with the run that started it, or move it away, before training on "
            f"{feedback.folder}")
    return trained + 1


def deployment_split(config: config_dict.ConfigDict, workdir: str, iteration: int, checkpoint: str,
                     feedback: deployment_feedback.Feedback) -> dict[str, Any]:
    """Stages 1-3 from a deployment folder: its rated messages (the model at ``checkpoint`` is the one
    people rated), balanced as the judged generations are, written as the split."""
    examples = [{**example, "iteration": iteration} for example in feedback.examples]
    balanced, counts = generated.balance(examples, seed=config.seed + iteration)
    meta = {
        "iteration": iteration, "model": checkpoint, "model_in_workdir": os.path.relpath(checkpoint, workdir),
        "labels": deployment_feedback.LABELS, "deployment": feedback.folder,
        "deployment_fingerprint": feedback.fingerprint, "deployment_counts": feedback.counts,
        "policy": config_lib.feedback_policy(config).to_dict(), "balance": counts,
    }
    path = os.path.join(iteration_dir(workdir, iteration), "generated")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    written = generated.write_split(path, balanced, meta)
    print(f"iteration {iteration}: {len(examples)} rated replies from {feedback.folder}; kept "
          f"{counts['positive_kept']} positive + {counts['negative_kept']} negative -> {path}")
    return written


def _write_results(workdir: str, rows: list[dict[str, Any]], judge_name: str) -> None:
    folder = os.path.join(workdir, "iterations")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"judge": judge_name, "rows": rows}, f, indent=1)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(format_results(rows) + "\n")
