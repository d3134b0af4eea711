"""A run's parts built from the config: mesh, data, tokenizer, model, optimizer, step.

Shared by the modes that need a model so that each builds them the same way:
``Setup`` for training (and the plan and bench modes, ``with_data=False``: the
preset's vocabulary), ``trained_network`` for everything that uses a
workdir's trained model (eval, chat, iterate).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from ml_collections import config_dict

from bb3x_jax import config as config_lib
from bb3x_jax import sharding
from bb3x_jax.data import pipeline
from bb3x_jax.eval import likelihood as eval_lib
from bb3x_jax.model import api, build
from bb3x_jax.model import config as model_config
from bb3x_jax.model.formats import tables
from bb3x_jax.train import checkpoint as checkpoint_lib
from bb3x_jax.train import inputs as dataset
from bb3x_jax.train import step as step_lib


class Setup:
    """Everything a run needs, built from the config (shared by train, eval and bench)."""

    def __init__(self, config: config_dict.ConfigDict, workdir: str, *, with_data: bool = True,
                 with_optimizer: bool = True):
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh(config.mesh.to_dict())
        self.built, self.tokenizer = dataset.prepare_with_tokenizer(config, workdir) if with_data else (None, None)
        self.tokenizer_spec = dataset.tokenizer_spec(config, self.built) if with_data else None
        # How every batch, generation and chat frames text: resolved once (it reads the checkpoint's files).
        self.framing = config_lib.framing(config, self.tokenizer_spec) if with_data else None
        train = config.train
        if with_optimizer and train.kl_anchor and not (train.init_from or train.kl_anchor_from):
            raise config_lib.ConfigError("train.kl_anchor", "the anchor is the model the run starts from: "
                                                            "set train.init_from (or kl_anchor_from), or kl_anchor=0")
        self.model_cfg, model = init_model(config, self.tokenizer, self.mesh)
        self.pad_id = self.model_cfg.pad_id
        if not with_optimizer:  # inference only: parameters, no optimizer state
            self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
            self.state = None
            return
        self.tx = optimizer(config)
        self.graphdef, self.state = step_lib.init_state(model, self.tx, config.seed, self.mesh)
        self.params, self.rest = self.state.params, self.state.rest
        self.anchor = self._anchor(config) if train.kl_anchor else None
        # Called as train_step(state, batch, anchor).
        self.train_step = train_step(config, self.graphdef, self.tx, self.pad_id, self.mesh)

    def _anchor(self, config: config_dict.ConfigDict):
        """The KL anchor's parameters, also when the run resumes: ``train.kl_anchor_from``'s, or a copy of
        the start's (``train.init_from``; a copy, since the step donates the state's buffers)."""
        path = config.train.kl_anchor_from
        if not path:
            return jax.tree.map(jnp.copy, self.state.params)
        _, model = init_model(config, self.tokenizer, self.mesh, path=path, key="train.kl_anchor_from")
        anchor = nnx.state(model, nnx.Param)
        if _signature(anchor) != _signature(self.state.params):
            raise config_lib.ConfigError("train.kl_anchor_from", f"{path} does not hold the trained model's "
                                                                 "parameters (names, shapes or dtypes differ)")
        return anchor

    @property
    def parameter_count(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))

    def iterator(self, split: str, *, train: bool) -> pipeline.BatchIterator:
        source = dataset.batch_source(self.config, self.built, self.tokenizer, split, self.framing)
        config, sync = dataset.pipeline_config(self.config, train=train, framing=self.framing), None
        if jax.process_count() > 1 and (len(config.context_buckets) > 1 or len(config.label_buckets) > 1):
            # All processes must pick the same bucket: a collective per batch, made in
            # this thread (pipeline.jax_length_sync), so no prefetching.
            config, sync = dataclasses.replace(config, prefetch=0, workers=0), pipeline.jax_length_sync
        return pipeline.BatchIterator(source, self.tokenizer, config, length_sync=sync, mesh=self.mesh)

    def validate(self, params, rest, split: str = "valid", max_batches: int | None = None) -> dict[str, Any]:
        if not hasattr(self, "_eval_step"):
            self._eval_step = sharding.MeshBound(eval_lib.make_eval_step(self.graphdef, self.pad_id, self.mesh),
                                                 self.mesh)
        batches = self.config.train.eval_batches if max_batches is None else max_batches
        with self.iterator(split, train=False) as iterator:
            return eval_lib.evaluate(self._eval_step, params, rest, iterator, batches)


def optimizer(config: config_dict.ConfigDict):
    """The run's optimizer (``config.train``); the plan mode compiles with the same one."""
    train = config.train
    return step_lib.make_optimizer(
        learning_rate=train.learning_rate, warmup_steps=train.warmup_steps, total_steps=train.steps,
        weight_decay=train.weight_decay, clip_norm=train.clip_norm, grad_accum=train.grad_accum,
    )


def train_step(config: config_dict.ConfigDict, graphdef, tx, pad_id: int, mesh) -> sharding.MeshBound:
    """The run's jitted train step on ``mesh``; the plan mode lowers this same step from abstract shapes."""
    train = config.train
    return sharding.MeshBound(step_lib.make_train_step(
        graphdef, tx, objective=train.objective, kl_anchor=train.kl_anchor,
        kl_anchor_direction=train.kl_anchor_direction, alpha=train.alpha, k=train.k,
        detach_positives=train.detach_positives, train_ce_on_positive=train.train_ce_on_positive, pad_id=pad_id,
    ), mesh)


def _signature(params) -> list:
    """(path, shape, dtype) of every parameter: what an anchor must share with the trained model."""
    return [(path, x.shape, x.dtype) for path, x in jax.tree_util.tree_leaves_with_path(params)]


def init_model(config: config_dict.ConfigDict, tokenizer, mesh, *, path: str | None = None,
               key: str = "train.init_from"):
    """(ModelConfig, model): random from the preset, or the weights of ``train.init_from`` (or of
    ``path``, which errors name as ``key``)."""
    path = config.train.init_from if path is None else path
    if not path:
        if tokenizer is None:  # synthetic batches: the preset's own vocabulary
            cfg = model_config.preset(config.model.preset, **config_lib.model_overrides(config))
        else:
            cfg = config_lib.model_config(config, tokenizer)
        return cfg, build.build(cfg, seed=config.seed, mesh=mesh)
    try:
        loaded = api.load(path, bpe_dir=config.data.tokenizer.bpe_dir, trust_pickle=config.train.trust_pickle)
    except (OSError, ValueError) as error:  # a missing or unreadable checkpoint file is the user's to fix
        raise config_lib.ConfigError(key, str(error)) from None
    cfg = loaded.config.replace(**config_lib.model_overrides(config))
    config_lib.check_positions(config, cfg, key, path)
    if tokenizer is not None:
        ids = {"pad_id": tokenizer.pad_id, "end_id": tokenizer.end_id}
        wrong = {k: (getattr(cfg, k), v) for k, v in ids.items() if getattr(cfg, k) != v}
        if wrong or tokenizer.vocab_size > cfg.vocab_size:
            raise config_lib.ConfigError(
                key,
                f"{path} does not fit the tokenizer: ids (model, tokenizer) {wrong}, "
                f"vocab {cfg.vocab_size} vs {tokenizer.vocab_size}; configure data.tokenizer to the checkpoint's",
            )
    network = loaded.network
    if cfg.scan_layers != loaded.config.scan_layers:  # stacked <-> per-layer parameters
        network = tables.relayout(network, cfg)
    params = nnx.state(network, nnx.Param)
    logging.info("Initialised from %s (%s)", path, loaded.source)
    return cfg, build.with_params(cfg, params, seed=config.seed, mesh=mesh)


@dataclasses.dataclass
class TrainedNetwork:
    """A workdir's trained parameters, with the run's parts (tokenizer, framing, mesh) around them."""

    setup: Setup
    params: Any
    step: int
    checkpoint: str  # the step folder read

    @property
    def network(self):
        return nnx.merge(self.setup.graphdef, self.params, self.setup.rest)


def choose_step(checkpoints: checkpoint_lib.Checkpointer, which: str) -> int:
    """The step ``which`` names: ``latest``, ``best`` (the newest when no metric chose one) or a number."""
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


def trained_network(config: config_dict.ConfigDict, workdir: str, *,
                    checkpoints_dir: str | None = None) -> TrainedNetwork:
    """The parameters of ``eval.checkpoint`` (best by default) in ``<workdir>/checkpoints`` or
    ``checkpoints_dir``; only the parameters are read, never the optimizer state."""
    setup = Setup(config, workdir, with_optimizer=False)
    checkpoints = checkpointer(config, workdir) if checkpoints_dir is None else \
        checkpoint_lib.Checkpointer(checkpoints_dir, best_metric=config.checkpoint.best_metric,
                                    best_mode=config.checkpoint.best_mode, async_save=False)
    try:
        step = choose_step(checkpoints, config.eval.checkpoint)
    finally:
        checkpoints.close()
    params, _ = checkpoint_lib.read_params(checkpoints.directory, checkpoint_lib.abstract(setup.params), step)
    return TrainedNetwork(setup, params, step, os.path.join(checkpoints.directory, str(step)))


def checkpointer(config: config_dict.ConfigDict, workdir: str) -> checkpoint_lib.Checkpointer:
    c = config.checkpoint
    return checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.keep,
                                       best_metric=c.best_metric, best_mode=c.best_mode, async_save=c.async_save)
