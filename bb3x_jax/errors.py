"""The exceptions the entry points turn into exit statuses; a leaf that imports nothing of the project.

``main.py`` prints a ``UserError`` (a mistake the user fixes: ``ConfigError``
names the config key, ``WorkdirError`` the workdir; the library's own errors for
bad releases, tokenizer files, judges, pickles and checkpoints derive from it
too) as one line with exit status 2, a ``TrainingDiverged`` run as one line with
exit status 1, and a ``Stopped`` run (SIGTERM / SIGINT after a saved checkpoint)
with the signal's conventional status, 128 + its number. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A mistake the user fixes (a missing file, a bad value): reported as one line, never a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work, named by its key (``config.<key>: why``)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config.{key}: {message}")


class Stopped(Exception):
    """Raised after a signal-requested stop has saved a checkpoint."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} (checkpoint saved)")


class WorkdirError(UserError):
    """A workdir whose checkpoints a run cannot continue from (``--workdir=<path>: why``)."""

    def __init__(self, workdir: str, message: str):
        self.workdir = workdir
        super().__init__(f"--workdir={workdir}: {message}")


class TrainingDiverged(Exception):
    """A non-finite loss or gradient norm (or validation NLL): training stopped before saving that step."""

    def __init__(self, step: int, position: dict | None, values: dict[str, float], last_saved: int | None = None):
        self.step, self.position, self.values, self.last_saved = step, position, values, last_saved
        where = "" if not position else \
            f" (batch: epoch {position.get('epoch')}, step {position.get('step_in_epoch')} in epoch)"
        found = ", ".join(f"{k}={v}" for k, v in values.items())
        kept = "no checkpoint was saved" if last_saved is None else f"the newest checkpoint is step {last_saved}"
        super().__init__(f"training diverged at step {step}{where}: {found}; nothing of this step was saved, {kept}; "
                         "lower train.learning_rate (or raise train.warmup_steps) and train in a new --workdir")
