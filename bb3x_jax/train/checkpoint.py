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
previous checkpoints intact; a checkpoint that is damaged after the fact fails
to restore, and ``restore_latest`` falls back to the one before with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from bb3x_jax.model.formats.orbax import FORMAT, ITEMS, read_params  # noqa: F401  (the layout is the model format's)


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any  # the TrainState
    meta: dict


def abstract(tree):
    """Shapes, dtypes and shardings of a concrete tree: what orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


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
        with open(os.path.join(self.directory, str(step), "meta", "metadata")) as f:
            return json.load(f)

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
        """The newest checkpoint that restores; damaged ones are skipped with a warning. None if none."""
        for step in reversed(self.steps()):
            try:
                return self.restore(step, template_state)
            except Exception as error:  # a damaged checkpoint can fail in many layers (tensorstore, json, shapes)
                logging.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                                self.directory, step, type(error).__name__, str(error).splitlines()[0][:300])
        return None
