"""Building a model whose parameters are born sharded by the rules table.

The constructor runs under ``jax.jit`` with output shardings computed from
each parameter's logical axis names (``bb3x_jax.sharding.LOGICAL_RULES``), so
no device ever holds the whole model, and the same call works on 1 CPU, 8
simulated devices, a GPU or a pod slice.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from bb3x_jax import sharding
from bb3x_jax.model.config import ModelConfig
from bb3x_jax.model.transformer import Transformer


def construct(cfg: ModelConfig, seed: int) -> Transformer:
    """The network with its own (unsharded) initial weights; callers trace it abstractly or place it."""
    with nnx.use_eager_sharding(False):  # placement is decided by the rules table below
        return Transformer(cfg, rngs=nnx.Rngs(seed))


def parameter_shardings(abstract_state, mesh: Mesh):
    """NamedSharding of every variable from its logical axis names."""

    def one(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        return NamedSharding(mesh, sharding.logical_to_spec(names, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@functools.lru_cache(maxsize=16)
def _initializer(cfg: ModelConfig, seed: int, mesh: Mesh | None):
    """(graphdef, jitted initialiser) per (config, seed, mesh): kept, so that building the same model
    again in a process (an experiment's stages, a test's runs) reuses the compiled initialiser."""
    abstract = nnx.eval_shape(lambda: construct(cfg, seed))
    graphdef, abstract_state = nnx.split(abstract)
    out_shardings = None if mesh is None else parameter_shardings(abstract_state, mesh)
    return graphdef, jax.jit(lambda: nnx.state(construct(cfg, seed)), out_shardings=out_shardings)


def build(cfg: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None) -> Transformer:
    """A randomly initialised model; with ``mesh``, parameters are created sharded.

    Initialisation always runs jitted, so the values do not depend on the mesh
    (random bits are sharding-invariant with threefry partitionable keys).
    """
    graphdef, init = _initializer(cfg, seed, mesh)
    return nnx.merge(graphdef, init())


def with_params(cfg: ModelConfig, params, *, seed: int = 0, mesh: Mesh | None = None) -> Transformer:
    """A model of ``cfg`` holding the given parameters (e.g. converted BB3 weights), placed by the rules table.

    Only the non-parameter variables (dropout RNG streams) are created; XLA
    drops the unused random initialisation of the weights from the jitted
    constructor, so no second copy of the model is ever materialised.
    ``cfg`` may differ from the weights' own config in what does not change
    shapes (dropout rates, compute dtype).
    """
    abstract = nnx.eval_shape(lambda: construct(cfg, seed))
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    mismatched = [
        f"{jax.tree_util.keystr(path)}: {a.shape} vs {b.shape}"
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(params))
        if a.shape != b.shape
    ]
    if jax.tree.structure(abstract_params) != jax.tree.structure(params) or mismatched:
        raise ValueError(f"parameters do not fit the model config: {mismatched[:10] or 'different structure'}")
    dtype = jax.numpy.dtype(cfg.param_dtype)
    params = jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), params)
    if mesh is not None:
        params = jax.device_put(params, parameter_shardings(abstract_params, mesh))
        rest_shardings = parameter_shardings(abstract_rest, mesh)
    else:
        rest_shardings = None
    rest = jax.jit(lambda: nnx.split(construct(cfg, seed), nnx.Param, ...)[2], out_shardings=rest_shardings)()
    return nnx.merge(graphdef, params, rest)
