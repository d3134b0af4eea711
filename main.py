"""bb3x-jax entry point: ``python main.py --config configs/cringe.py [--workdir DIR] [--mode MODE]``.

Modes:
  train  (default) train with config.train.objective (CRINGE by default), resuming
         from the newest checkpoint in the workdir; validate, checkpoint, log, plot.
  eval   likelihood metrics per feedback class of the workdir's best (or latest)
         checkpoint on a split, and F1 / the judge's verdicts of its generations.
  chat   talk to the workdir's model in the terminal (or pipe a conversation in).
  iterate  iterative CRINGE from the workdir's model: generate on training contexts,
         judge, balance, add as a split, train on, evaluate; config.iterate.
  train_judge  train a feedback classifier (good / bad response) on the release's
         labelled messages and report its held-out accuracy.
  bench  time the real train step on synthetic batches; prints one JSON line.
  plan   compile the train step ahead of time from abstract shapes (no weights
         allocated) and print per-device memory and FLOPs per step.
  data   prepare the release (synthetic when config.data.manual_dir is empty),
         train the tokenizer, and run real batches through a sharded jitted step.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from bb3x_jax import config as config_lib
from bb3x_jax import errors
from bb3x_jax.modes import bench, chat, data, iterate, plan, train, train_judge
from bb3x_jax.modes import eval as eval_mode

MODES = {
    "train": train.run,
    "eval": eval_mode.run,
    "chat": chat.run,
    "iterate": iterate.run,
    "train_judge": train_judge.run,
    "bench": bench.run,
    "plan": plan.run,
    "data": data.run,
}

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cringe.py", "Configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/cringe", "Where everything this run writes goes.")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to run.")


class _QuietLibraries:
    """Drops INFO chatter of orbax (several lines per checkpoint); its warnings still show."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").addFilter(_QuietLibraries())
    try:
        config = config_lib.validate(_CONFIG.value)
        config_lib.initialize_distributed(config)
        MODES[_MODE.value](config, _WORKDIR.value)
    except errors.ConfigError as error:  # a user's mistake: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except errors.Stopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(128 + stopped.signum)  # the conventional status of a signalled job


if __name__ == "__main__":
    app.run(main)
