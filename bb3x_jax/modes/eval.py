"""``--mode=eval``: held-out likelihood metrics of a trained run's checkpoint.

Reads only the parameters of the workdir's best, latest or a given checkpoint
(``eval.checkpoint``) and evaluates ``eval.split``; writes
``<workdir>/eval_<split>.json`` and prints the table. With
``eval.generate_examples`` > 0 the model also generates (``config.generation``)
for that many contexts spread evenly over the split: F1 against the labels, and
the judge's good-response rate by bad reason (``generation_eval``); every
response and verdict goes to ``<workdir>/generations_<split>.jsonl``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from bb3x_jax import config as config_lib
from bb3x_jax.data.tokenizers.base import _as_text
from bb3x_jax.eval import generation as generation_eval
from bb3x_jax.eval import likelihood as eval_lib
from bb3x_jax.train import checkpoint as checkpoint_lib
from bb3x_jax.train import inputs as dataset
from bb3x_jax.train import metrics_log
from bb3x_jax.train import runtime as setup_lib


def choose_step(checkpoints: checkpoint_lib.Checkpointer, which: str) -> int:
    steps = checkpoints.steps()
    if not steps:
        raise FileNotFoundError(f"{checkpoints.directory}: no checkpoint to evaluate (train first)")
    if which == "latest":
        return steps[-1]
    if which == "best":
        best = checkpoints.best_step()
        return steps[-1] if best is None else best
    if int(which) not in steps:
        raise FileNotFoundError(f"{checkpoints.directory}: no checkpoint at step {which} (have {steps})")
    return int(which)


def judge_path(config: config_dict.ConfigDict, workdir: str) -> str:
    """Where the feedback classifier lives: ``judge.path``, else ``<workdir>/judge``."""
    return os.path.expanduser(config.judge.path) if config.judge.path else os.path.join(workdir, "judge")


def make_judge(config: config_dict.ConfigDict, workdir: str, which: str | None = None):
    """(batched judge ``(contexts, responses) -> verdicts`` or None, its bad reasons, a name).

    ``which`` (default ``eval.judge``): ``synthetic`` is the synthetic world's
    ground truth, ``classifier`` the feedback classifier of ``--mode=train_judge``
    (verdicts "good" / "bad"), ``auto`` the first on the synthetic release and
    otherwise the classifier when one was trained, ``none`` no judge.
    """
    which = config.eval.judge if which is None else which
    if which == "auto":
        if dataset.is_synthetic_release(config.data):
            which = "synthetic"
        else:
            which = "classifier" if os.path.exists(os.path.join(judge_path(config, workdir), "meta.json")) else "none"
    if which == "none":
        return None, (), "none"
    if which == "synthetic":
        from bb3x_jax.data import synthetic

        def ground_truth(contexts, responses):
            return [synthetic.judge(c, r) for c, r in zip(contexts, responses)]

        return ground_truth, synthetic.BAD_REASONS, "synthetic world ground truth"
    from bb3x_jax.modes import train_judge as judge_train

    path = judge_path(config, workdir)
    return judge_train.load_judge(path).verdicts, ("bad",), f"feedback classifier {path}"


def spread_examples(records, count: int) -> list[dict]:
    """``count`` records at evenly spaced indices (deterministic, all conversations' stages)."""
    n = len(records)
    indices = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(int))
    return records.__getitems__([int(i) for i in indices])


def generation_metrics(config: config_dict.ConfigDict, setup, params, split: str) -> dict[str, Any]:
    """F1 and the judge's verdicts of the model's generations on ``split``."""
    from flax import nnx

    examples = spread_examples(dataset.source(setup.built, split), config.eval.generate_examples)
    judge, reasons, _ = make_judge(config, setup.workdir)
    network = nnx.merge(setup.graphdef, params, setup.rest)
    return generation_eval.evaluate_generations(
        network, setup.tokenizer, examples, config_lib.generation_settings(config),
        framing=setup.framing, batch_size=config.eval.generate_batch, judge=judge, reasons=reasons,
        seed=config.seed,
    ), examples


def run(config: config_dict.ConfigDict, workdir: str, *, checkpoints_dir: str | None = None) -> dict[str, Any]:
    """Evaluates ``<workdir>/checkpoints`` (or ``checkpoints_dir``) and writes the results into the workdir."""
    setup = setup_lib.Setup(config, workdir, with_optimizer=False)
    checkpoints = setup_lib.checkpointer(config, workdir) if checkpoints_dir is None else \
        checkpoint_lib.Checkpointer(checkpoints_dir, best_metric=config.checkpoint.best_metric,
                                    best_mode=config.checkpoint.best_mode, async_save=False)
    step = choose_step(checkpoints, config.eval.checkpoint)
    checkpoints.close()
    params, meta = checkpoint_lib.read_params(checkpoints.directory, checkpoint_lib.abstract(setup.params), step)
    result = setup.validate(params, setup.rest, split=config.eval.split, max_batches=config.eval.batches)
    report = {"checkpoint": os.path.join(checkpoints.directory, str(step)), "step": step,
              "split": config.eval.split, **metrics_log.json_safe(result)}
    generated = None
    if config.eval.generate_examples:
        generated, examples = generation_metrics(config, setup, params, config.eval.split)
        if jax.process_index() == 0:
            write_generations(os.path.join(workdir, f"generations_{config.eval.split}.jsonl"), examples, generated)
        report["generation"] = {k: v for k, v in generated.items() if k not in ("responses", "verdicts")}
    path = os.path.join(workdir, f"eval_{config.eval.split}.json")
    if jax.process_index() == 0:  # one writer of the (shared) workdir
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"{config.eval.split} split, checkpoint {report['checkpoint']}")
        print(eval_lib.format_table(result))
        if generated is not None:
            print(generation_eval.format_table(generated))
        print(json.dumps(report))
    return report


def write_generations(path: str, examples: list[dict], generated: dict[str, Any]) -> None:
    """One JSON line per generation: context, label, response, verdict (null without a judge)."""
    verdicts = generated["verdicts"] or [None] * len(examples)
    with open(path, "w") as f:
        for example, response, verdict in zip(examples, generated["responses"], verdicts):
            f.write(json.dumps({"context": _as_text(example["context"]), "label": _as_text(example["label"]),
                                "feedback": int(example["feedback"]), "response": response,
                                "verdict": verdict}) + "\n")
