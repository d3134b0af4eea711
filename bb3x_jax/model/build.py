"""Building a model whose parameters are born sharded by the rules table.

The constructor runs under ``jax.jit`` with output shardings computed from
each parameter's logical axis names (``bb3x_jax.sharding.LOGICAL_RULES``), so
no device ever holds the whole model, and the same call works on 1 CPU, 8
simulated devices, a GPU or a pod slice.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from bb3x_jax import sharding
from bb3x_jax.model.config import ModelConfig
from bb3x_jax.model.transformer import Transformer


def _construct(cfg: ModelConfig, seed: int) -> Transformer:
    with nnx.use_eager_sharding(False):  # placement is decided by the rules table below
        return Transformer(cfg, rngs=nnx.Rngs(seed))


def parameter_shardings(abstract_state, mesh: Mesh):
    """NamedSharding of every variable from its logical axis names."""

    def one(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        return NamedSharding(mesh, sharding.logical_to_spec(names, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def build(cfg: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None) -> Transformer:
    """A randomly initialised model; with ``mesh``, parameters are created sharded.

    Initialisation always runs jitted, so the values do not depend on the mesh
    (random bits are sharding-invariant with threefry partitionable keys).
    """
    abstract = nnx.eval_shape(lambda: _construct(cfg, seed))
    graphdef, abstract_state = nnx.split(abstract)
    out_shardings = None if mesh is None else parameter_shardings(abstract_state, mesh)

    def init():
        return nnx.state(_construct(cfg, seed))

    state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)
