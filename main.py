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
  serve  a web chat with the workdir's model that records conversations and thumbs up/down
         in the release's format in <workdir>/deployment; config.serve.
  data   prepare the release (synthetic when config.data.manual_dir is empty),
         train the tokenizer, and run real batches through a sharded jitted step.

A user's mistake (an unknown config key, a bad value, a missing or unreadable
input) is one line on stderr, ``error: ...``, and exit status 2; ``--debug``
(or ``BB3X_DEBUG=1``) shows the traceback as well.
"""

import importlib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from bb3x_jax import errors

# Each mode's module is imported only when it runs: ``--help``, a bad flag and the spawned
# data-preparation workers (which run this file's top level again) then skip JAX, TFDS and the rest.
MODES = {name: f"bb3x_jax.modes.{name}" for name in
         ("train", "eval", "chat", "iterate", "train_judge", "bench", "plan", "data", "serve")}
# What the user fixes: reported as one line, exit status 2 (anything else is a bug and traces back).
# The library's own such errors all derive from errors.UserError.
USER_ERRORS = (errors.UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cringe.py", "Configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/cringe", "Where everything this run writes goes.")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to run.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a user error too (or set BB3X_DEBUG=1).")


class _QuietLibraries:
    """Drops INFO chatter of orbax (several lines per checkpoint); its warnings still show."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "orbax" not in record.pathname


def _one_line(error: BaseException) -> str:
    text = str(error).replace("\\n", " ").replace("\\'", "'")
    if text[:1] == text[-1:] == "'":  # a KeyError's repr inside an AttributeError
        text = text[1:-1]
    return " ".join(text.split()) or type(error).__name__


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad ``--config.*`` override (an unknown key, a value of the wrong
    type) reported as one line instead of ml_collections' traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(f"{_one_line(error)} (see --helpshort)")
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        if os.environ.get("BB3X_DEBUG"):
            raise
        _fail(f"a --config override failed: {_one_line(error)}; check the key and the value's type "
              "against the config file")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").addFilter(_QuietLibraries())
    workdir = _WORKDIR.value
    try:
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise errors.UserError(f"--workdir {workdir} is a file; give a folder (it is created if missing)")
        from bb3x_jax import config as config_lib

        config = config_lib.validate(_CONFIG.value)
        config_lib.initialize_distributed(config)
        importlib.import_module(MODES[_MODE.value]).run(config, workdir)
    except errors.TrainingDiverged as diverged:  # the step, its batch and the newest checkpoint kept
        print(f"error: {diverged}", file=sys.stderr)
        sys.exit(1)
    except errors.Stopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(128 + stopped.signum)  # the conventional status of a signalled job
    except USER_ERRORS as error:
        if _DEBUG.value or os.environ.get("BB3X_DEBUG"):
            raise
        _fail(_one_line(error))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
