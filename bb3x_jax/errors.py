"""The exceptions the entry points turn into exit statuses; a leaf that imports nothing of the project.

``main.py`` prints a ``ConfigError`` (a user's mistake) as one line with exit
status 2, and a ``Stopped`` run (SIGTERM / SIGINT after a saved checkpoint)
with the signal's conventional status, 128 + its number.
"""

from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A configuration value that cannot work, named by its key (``config.<key>: why``)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config.{key}: {message}")


class Stopped(Exception):
    """Raised after a signal-requested stop has saved a checkpoint."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} (checkpoint saved)")
