"""The device mesh and the one table that maps logical axis names to mesh axes.

Every array the project shards names its dimensions logically (``batch``,
``embed``, ``mlp``...); ``LOGICAL_RULES`` alone decides where each goes on the
mesh ``('data', 'fsdp', 'tensor')``. The same code then runs on 1 CPU, 8
simulated devices, one GPU or a pod: only the mesh shape changes.
``put_batch`` places input batches by the same table.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bb3x_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None for replicated). Batch rows are
# split over both data-parallel axes; weights are split over fsdp on their
# model dimension and over tensor on their wide dimension (heads, mlp, vocab).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "layers": None,
    # Activations between layers: [batch, length, embed]. Rows follow the batch;
    # the model dimension stays whole on every device (weights, not activations,
    # are split over fsdp and tensor).
    "activation_batch": ("data", "fsdp"),
    "activation_length": None,
    "activation_embed": None,
}

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves -1 (at most one axis) so that the product equals the device count."""
    shape = [int(sizes[a]) for a in MESH_AXES]
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ConfigError("mesh", f"{dict(zip(MESH_AXES, shape))}: {num_devices} devices are not divisible by "
                                      f"{known}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ConfigError("mesh", f"{dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, this run has "
                                  f"{num_devices}; set config.mesh.* so that the sizes multiply to the device count "
                                  "(one of them may be -1)")
    return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names.

    Mesh axes of size 1 (or absent from ``mesh``) are dropped, so specs stay
    minimal on small meshes; an unknown logical name is an error.
    """
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule; known: {', '.join(LOGICAL_RULES)}")
        target = LOGICAL_RULES[name]
        if target is None:
            spec.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        if not axes:
            spec.append(None)
        else:  # a rule written as one axis stays a name, a rule over several stays a tuple
            spec.append(axes[0] if isinstance(target, str) else axes)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh))


def put_batch(batch: dict[str, np.ndarray], mesh_or_sharding: Mesh | NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a batch as global ``jax.Array``s on the mesh.

    The batch dimension is sharded as the logical axis ``batch`` (the
    data-parallel mesh axes), the other dimensions are replicated; or every
    array takes the given sharding. Processes hand in their own contiguous
    rows, in process order. int64 becomes int32 unless x64 is enabled (indices fit).
    """
    if isinstance(mesh_or_sharding, Mesh):
        mesh_or_sharding = logical_sharding(mesh_or_sharding, ("batch",))
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype == np.int64 and not jax.config.jax_enable_x64:
            value = value.astype(np.int32)
        out[key] = jax.make_array_from_process_local_data(mesh_or_sharding, value)
    return out


def batch_size_multiple(mesh: Mesh) -> int:
    """Global batches must be a multiple of this (rows per batch-sharded device group)."""
    target = LOGICAL_RULES["batch"]
    return int(np.prod([mesh.shape[a] for a in target if a in mesh.shape]))


def constrain(x: jax.Array, logical_axes: Sequence[str | None] = ACTIVATION) -> jax.Array:
    """Pins an activation's sharding by logical names under the ambient mesh
    (``jax.set_mesh``); without one (single-device code, tests) it is the identity."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh))


class MeshBound:
    """A jitted function traced and run under ``jax.set_mesh(mesh)``, so the
    activation constraints inside it (``constrain``) resolve against ``mesh``.

    The mesh is entered only around the step, not globally: building modules
    under an ambient mesh would make Flax read logical axis names as mesh axes.
    """

    def __init__(self, fn, mesh: Mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args, **kwargs)
