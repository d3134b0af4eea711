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
from bb3x_jax.data.tokenizers.base import as_text
from bb3x_jax.eval import generation as generation_eval
from bb3x_jax.eval import judges
from bb3x_jax.eval import likelihood as eval_lib
from bb3x_jax.train import inputs as dataset
from bb3x_jax.train import metrics_log, runtime


def spread_examples(records, count: int) -> list[dict]:
    """``count`` records at evenly spaced indices (deterministic, all conversations' stages)."""
    n = len(records)
    indices = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(int))
    return records.__getitems__([int(i) for i in indices])


def generation_metrics(config: config_dict.ConfigDict, trained: runtime.TrainedNetwork,
                       split: str) -> dict[str, Any]:
    """F1 and the judge's verdicts of the model's generations on ``split``."""
    setup = trained.setup
    examples = spread_examples(dataset.source(setup.built, split), config.eval.generate_examples)
    judge = judges.make_judge(config, setup.workdir)
    result = generation_eval.evaluate_generations(
        trained.network, setup.tokenizer, examples, config_lib.generation_settings(config),
        framing=setup.framing, batch_size=config.eval.generate_batch,
        judge=None if judge is None else judge.verdicts, reasons=() if judge is None else judge.bad_reasons,
        seed=config.seed,
    )
    if judge is not None:
        result["judge"] = judge.name  # what graded them
    return result, examples


def run(config: config_dict.ConfigDict, workdir: str, *, checkpoints_dir: str | None = None) -> dict[str, Any]:
    """Evaluates ``<workdir>/checkpoints`` (or ``checkpoints_dir``) and writes the results into the workdir."""
    trained = runtime.trained_network(config, workdir, checkpoints_dir=checkpoints_dir)
    setup = trained.setup
    result = setup.validate(trained.params, setup.rest, split=config.eval.split, max_batches=config.eval.batches)
    report = {"checkpoint": trained.checkpoint, "step": trained.step,
              "split": config.eval.split, **metrics_log.json_safe(result)}
    generated = None
    if config.eval.generate_examples:
        generated, examples = generation_metrics(config, trained, config.eval.split)
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
            f.write(json.dumps({"context": as_text(example["context"]), "label": as_text(example["label"]),
                                "feedback": int(example["feedback"]), "response": response,
                                "verdict": verdict}) + "\n")
