"""The project's own checkpoints as model files: read a network out of a training
checkpoint, or write converted weights as one (``bb3x_jax.cli.convert --to orbax``).

The layout is defined here and shared with ``bb3x_jax.train.checkpoint``: a
step folder with a ``params`` item (sharded arrays) and a ``meta`` JSON item
holding the network's ``ModelConfig``; training checkpoints also have
``train_state``, which is never read here.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from bb3x_jax.model import build
from bb3x_jax.model.config import ModelConfig

FORMAT = "bb3x_jax.checkpoint/1"
ITEMS = ("params", "train_state", "meta")


def is_orbax_path(path: str) -> bool:
    """A step folder (has ``params`` and ``meta``) or a folder of step folders."""
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "meta")):
        return True
    return any(name.isdigit() and os.path.isdir(os.path.join(path, name, "params")) for name in os.listdir(path))


def _root_and_step(path: str) -> tuple[str, int | None]:
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "params")):
        root, name = os.path.split(path)
        if not name.isdigit():
            raise ValueError(f"{path}: a checkpoint step folder must be named by its step number")
        return root, int(name)
    return path, None  # the newest step under path


def model_config_from_dict(values: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model_config has unknown fields {unknown} (written by a newer version?)")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_orbax(path: str, *, step: int | None = None):
    """(network, ModelConfig, step) from a checkpoint folder; only the parameters are read."""
    root, found = _root_and_step(path)
    step = found if step is None else step
    manager = ocp.CheckpointManager(root, item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    if "model_config" not in meta:
        raise ValueError(f"{root}/{step}: checkpoint meta has no model_config")
    cfg = model_config_from_dict(meta["model_config"])
    abstract = nnx.eval_shape(lambda: build.construct(cfg, 0))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    params, _ = read_params(root, abstract_params, step)
    return build.with_params(cfg, params), cfg, step


def save_orbax(network, cfg: ModelConfig, path: str, *, step: int = 0, extra_meta: dict | None = None) -> str:
    """Writes ``path/<step>`` with the parameters and the config; returns the step folder."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, str(step))):
        raise FileExistsError(f"{path}/{step} exists; choose another destination")
    manager = ocp.CheckpointManager(path, item_names=("params", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    meta = {"format": FORMAT, "step": step, "model_config": dataclasses.asdict(cfg),
            **(extra_meta or {})}
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(nnx.state(network, nnx.Param)),
                                               meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()
    return os.path.join(path, str(step))


def read_params(directory: str, abstract_params, step: int | None = None):
    """Only the parameters (and meta) of a checkpoint: what inference and export need.

    Leaves of ``abstract_params`` without a sharding are read onto this process's
    first device, whatever mesh wrote them (orbax would otherwise want the writer's
    devices, e.g. a pod's, and fail with a topology mismatch).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.tree.map(
        lambda x: x if getattr(x, "sharding", None) is not None else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                           sharding=device),
        abstract_params)
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no complete checkpoint")
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
    if dict(restored["meta"]).get("format") != FORMAT:
        raise ValueError(f"{directory}/{step}: not a bb3x_jax checkpoint")
    manager.close()
    return restored["params"], dict(restored["meta"])
