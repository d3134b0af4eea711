"""When a multi-stage job (``--mode=iterate``, the BB3x experiment) may reuse a finished stage.

Why: those jobs skip stages whose output exists, so that an interrupted run
continues; without a record of the settings that made an output, a rerun with
other settings would print its new labels over an old result. A finished
training run is compared with the config recorded in its checkpoint; an
evaluation carries the settings it was made with (``SETTINGS_KEY``) and is
made again when they differ. Training is refused rather than redone (it is
the expensive part, and everything after it was made from it), naming the
setting and both values.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ml_collections import config_dict

from bb3x_jax import config as config_lib
from bb3x_jax.errors import ConfigError
from bb3x_jax.train import checkpoint as checkpoint_lib

SETTINGS_KEY = "stage_settings"

# What decides an evaluation's numbers besides the evaluated checkpoint: everything under these
# prefixes, except how the work is spread (workers, prefetch) and where the prepared data is kept.
_EVALUATION_PREFIXES = ("seed", "eval.", "generation.", "data.", "model.", "judge.")
_NOT_RESULTS = ("data.dir", "data.pipeline_workers", "data.prefetch", "data.num_workers", "judge.path",
                "eval.checkpoint")


def _flat(config: config_dict.ConfigDict) -> dict[str, Any]:
    return config_lib._flatten(json.loads(config.to_json_best_effort()))


def _relative(path: str, workdir: str) -> str:
    """A path inside the workdir as relative to it, so that a moved workdir still matches."""
    return os.path.relpath(path, workdir) if path and os.path.isabs(path) else path


def _same_place(old: str, new: str, workdir: str) -> bool:
    """``new`` lies in the workdir and ``old`` at the same place under another folder (a moved or
    copied workdir): the same path for this comparison."""
    if not (old and new and os.path.isabs(new)):
        return False
    inside = os.path.relpath(new, workdir)
    return not inside.startswith("..") and (old == new or old.endswith(os.sep + inside))


def _align_paths(saved: dict[str, Any], now: dict[str, Any], workdir: str) -> dict[str, Any]:
    """``saved`` with the starting weights and generated splits that moved with the workdir as ``now``
    has them, so that only a real difference is reported."""
    saved = json.loads(json.dumps(saved))
    train, data = saved.get("train", {}), saved.get("data", {})
    for key in ("init_from", "kl_anchor_from"):
        if _same_place(train.get(key) or "", now["train"].get(key) or "", workdir):
            train[key] = now["train"][key]
    old_splits, new_splits = list(data.get("extra_train") or ()), list(now["data"].get("extra_train") or ())
    if len(old_splits) == len(new_splits) and all(_same_place(a, b, workdir) for a, b in zip(old_splits, new_splits)):
        data["extra_train"] = now["data"].get("extra_train")  # none, or the same splits: as now writes them
    return saved


def _latest_step(run_dir: str) -> int | None:
    directory = os.path.join(run_dir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(directory) else []
    return steps[-1] if steps else None


def training_finished(config: config_dict.ConfigDict, run_dir: str, workdir: str) -> bool:
    """True when ``run_dir`` holds a finished training run made with ``config``'s settings, False when
    it has not finished (running it resumes). A finished run made otherwise is refused: every key that
    changes what it trained (``config.check_resumable``), its step count and its starting weights."""
    step = _latest_step(run_dir)
    if not os.path.exists(os.path.join(run_dir, "summary.json")) or step is None:
        return False
    checkpoint = os.path.join(run_dir, "checkpoints", str(step))
    saved = checkpoint_lib.read_meta(os.path.join(run_dir, "checkpoints"), step).get("config", {})
    now = json.loads(config.to_json_best_effort())
    saved = _align_paths(saved, now, workdir)
    config_lib.check_resumable(saved, config, checkpoint)
    before, now_flat = config_lib._flatten(saved), config_lib._flatten(now)
    for key in ("train.steps", "train.init_from"):
        old, now = before.get(key), now_flat.get(key)
        if old != now:
            raise ConfigError(key, f"{run_dir} finished training with {key}={old!r}, this run asks for {now!r}; "
                                   "what was made from it would not match: move it away (and the stages after "
                                   "it) to train it again, or use another --workdir")
    return True


def evaluation_settings(config: config_dict.ConfigDict, checkpoint: str, workdir: str) -> dict[str, Any]:
    """What an evaluation's numbers depend on: the checkpoint and the result-bearing settings."""
    flat = _flat(config)
    settings = {k: v for k, v in sorted(flat.items())
                if k.startswith(_EVALUATION_PREFIXES) and not k.startswith(_NOT_RESULTS)}
    settings["checkpoint"] = _relative(checkpoint, workdir)
    return settings


def changed_settings(recorded: dict[str, Any] | None, expected: dict[str, Any]) -> list[str]:
    """The keys whose values differ (all of them when nothing was recorded)."""
    if recorded is None:
        return sorted(expected)
    return sorted(k for k in set(recorded) | set(expected) if recorded.get(k) != expected.get(k))
