"""``--mode=eval``: held-out likelihood metrics of a trained run's checkpoint.

Reads only the parameters of the workdir's best, latest or a given checkpoint
(``eval.checkpoint``) and evaluates ``eval.split``; writes
``<workdir>/eval_<split>.json`` and prints the table. Generation-based
metrics (F1, the judge's good-response rate) belong to the decoding work.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from ml_collections import config_dict

from bb3x_jax.train import checkpoint as checkpoint_lib
from bb3x_jax.train import evaluate as eval_lib
from bb3x_jax.train import metrics_log
from bb3x_jax.train import setup as setup_lib


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


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    setup = setup_lib.Setup(config, workdir, with_optimizer=False)
    checkpoints = setup_lib.checkpointer(config, workdir)
    step = choose_step(checkpoints, config.eval.checkpoint)
    checkpoints.close()
    params, meta = checkpoint_lib.read_params(checkpoints.directory, checkpoint_lib.abstract(setup.params), step)
    result = setup.validate(params, setup.rest, split=config.eval.split, max_batches=config.eval.batches)
    report = {"checkpoint": os.path.join(checkpoints.directory, str(step)), "step": step,
              "split": config.eval.split, **metrics_log.json_safe(result)}
    path = os.path.join(workdir, f"eval_{config.eval.split}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    if jax.process_index() == 0:
        print(f"{config.eval.split} split, checkpoint {report['checkpoint']}")
        print(eval_lib.format_table(result))
        print(json.dumps(report))
    return report
