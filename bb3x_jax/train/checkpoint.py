"""Checkpoints of a training run (orbax), and restoring the newest one that is whole.

A checkpoint is one step directory with three items, so readers take only what
they need (``bb3x_jax.load`` reads ``params`` and ``meta`` and never touches
the optimizer state):

- ``params``: the model parameters (an ``nnx.State``), saved sharded;
- ``train_state``: everything else a resumed run needs: the model's other
  variables, the optimizer state, the step counter and the RNG key;
- ``meta`` (JSON): step, data-iterator position, the run's config, the
  network's ``ModelConfig`` and the validation metrics if any.

Which checkpoints stay: the newest ``keep``, plus the best one by a validation
metric (orbax preservation policies). Saves are asynchronous: training
continues while the previous step is written. Writes are atomic (orbax writes
to a temporary directory and renames it), so a run killed mid-save leaves the
previous checkpoints intact. ``restore_latest`` readies the directory for a run
that continues: it removes the temporary folders of killed saves, falls back
past a checkpoint that fails to restore (damaged after the fact) with a warning
and moves that one aside to ``<step>.damaged``, so the run can save its step
again; when step folders exist but none restores it raises ``WorkdirError``
and changes nothing. ``newest_meta`` reads the newest recorded ``meta`` (JSON,
no arrays), so a run can check its config against it before writing anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from bb3x_jax.errors import WorkdirError
from bb3x_jax.model.formats.orbax import FORMAT, ITEMS, read_params  # noqa: F401  (the layout is the model format's)

# Orbax's temporary step folders (``<step>.orbax-checkpoint-tmp-<timestamp>``) and the suffix given to
# a checkpoint moved aside because it fails to restore.
TMP_MARKER = ".orbax-checkpoint-tmp"
DAMAGED_SUFFIX = ".damaged"


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any  # the TrainState
    meta: dict


def abstract(tree):
    """Shapes, dtypes and shardings of a concrete tree: what orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def step_folders(directory: str) -> list[int]:
    """Steps of the step folders (named by a number) in ``directory``, oldest first; none if it does not exist."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def read_meta(directory: str, step: int) -> dict:
    """The ``meta`` item (JSON) of checkpoint ``step``: no arrays are read."""
    with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
        return json.load(f)


def newest_meta(directory: str) -> tuple[int, dict] | None:
    """(step, meta) of the newest checkpoint whose ``meta`` reads; one that does not is named in a
    warning and skipped. None when no step folder has a readable ``meta``."""
    for step in reversed(step_folders(directory)):
        try:
            meta = read_meta(directory, step)
            if not isinstance(meta, dict):
                raise ValueError(f"not a JSON object: {type(meta).__name__}")
            return step, meta
        except (OSError, ValueError) as error:
            logging.warning("checkpoint %s/%d: its meta cannot be read (%s: %s)", directory, step,
                            type(error).__name__, _first_line(error))
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:300]


def _sync(name: str) -> None:
    """All processes reach this point before any goes on (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _split(state) -> tuple[Any, dict]:
    return state.params, {"rest": state.rest, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


class Checkpointer:
    """Save and restore ``TrainState`` plus JSON metadata under ``directory``.

    ``best_metric`` (a key of the validation metrics) and ``best_mode``
    (``min``/``max``) choose the checkpoint kept besides the newest ``keep``;
    checkpoints saved without metrics are kept only while among the newest.
    """

    def __init__(self, directory: str, *, keep: int = 2, best_metric: str = "", best_mode: str = "min",
                 async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        self.best_mode = best_mode
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if best_metric:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: float(metrics[best_metric]),
                reverse=best_mode == "min",  # BestN keeps the end of the ascending order
                n=1,
                keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    # --- saving ---------------------------------------------------------------------
    def save(self, step: int, state, meta: dict, metrics: dict[str, float] | None = None) -> None:
        """Starts writing checkpoint ``step`` (returns before it is on disk when async)."""
        params, rest = _split(state)
        meta = {"format": FORMAT, "step": int(step), **meta, "metrics": metrics}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train_state=ocp.args.StandardSave(rest),
            meta=ocp.args.JsonSave(meta),
        )
        clean = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        self._manager.save(int(step), args=args, metrics=clean, force=True)

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # --- reading --------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first (half-written ones are not listed)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The step whose validation metric is best among the checkpoints kept, or None."""
        if not self.best_metric:
            return None
        scored = []
        for step in self.steps():
            metrics = self.read_meta(step).get("metrics") or {}
            if self.best_metric in metrics:
                scored.append((metrics[self.best_metric], step))
        if not scored:
            return None
        return (min(scored) if self.best_mode == "min" else max(scored))[1]

    def read_meta(self, step: int) -> dict:
        return read_meta(self.directory, step)

    def restore(self, step: int, template_state) -> Restored:
        """Checkpoint ``step`` restored into the shapes and shardings of ``template_state``."""
        params, rest = _split(template_state)
        restored = self._manager.restore(int(step), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params)),
            train_state=ocp.args.StandardRestore(abstract(rest)),
            meta=ocp.args.JsonRestore(),
        ))
        meta = dict(restored["meta"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.directory}/{step}: unknown checkpoint format {meta.get('format')!r}")
        r = restored["train_state"]
        state = type(template_state)(restored["params"], r["rest"], r["opt_state"], r["step"], r["rng"])
        return Restored(int(step), state, meta)

    def restore_latest(self, template_state) -> Restored | None:
        """The newest checkpoint that restores, for a run that continues from it; None if there is none.

        First removes orbax's temporary folders of saves that never finished. A checkpoint
        that fails to restore is skipped with a warning; once an older one restores, the
        skipped ones are moved aside (``<step>.damaged``, ``.damaged.N`` if taken) so the run
        can save those steps again. If step folders exist and none restores, raises
        ``WorkdirError`` naming each and renames nothing. Only process 0 changes the directory.
        """
        self._remove_temporary()
        failed: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, template_state)
            except Exception as error:  # a damaged checkpoint can fail in many layers (tensorstore, json, shapes)
                reason = f"{type(error).__name__}: {_first_line(error)}"
                logging.warning("checkpoint %s/%d cannot be restored (%s); trying the previous one",
                                self.directory, step, reason)
                failed.append((step, reason))
                continue
            self._move_aside([s for s, _ in failed])
            return restored
        if failed:
            named = "; ".join(f"{self.directory}/{s}: {reason}" for s, reason in failed)
            raise WorkdirError(os.path.dirname(self.directory),
                               f"no checkpoint can be restored ({named}); nothing was changed. Train in a new "
                               f"--workdir, or move {self.directory} aside to start this one over")
        return None

    def _remove_temporary(self) -> None:
        _sync("bb3x_checkpoint_cleanup_start")
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            for name in sorted(os.listdir(self.directory)):
                path = os.path.join(self.directory, name)
                if TMP_MARKER in name and os.path.isdir(path):
                    logging.warning("removing %s: the temporary folder of a save that did not finish", path)
                    shutil.rmtree(path)
        _sync("bb3x_checkpoint_cleanup_done")

    def _move_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        _sync("bb3x_checkpoint_move_aside_start")  # every process is done reading them
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target, n = source + DAMAGED_SUFFIX, 0
                while os.path.exists(target):
                    n += 1
                    target = f"{source}{DAMAGED_SUFFIX}.{n}"
                os.rename(source, target)
                logging.warning("checkpoint %s cannot be restored: moved aside to %s", source, target)
        _sync("bb3x_checkpoint_move_aside_done")
        self._manager.reload()
