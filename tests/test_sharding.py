"""The mesh and the logical-axis rules table."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from bb3x_jax import errors, sharding


def test_mesh_fills_the_free_axis():
    """-1 takes whatever devices the other axes leave."""
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)


def test_mesh_that_does_not_fit_is_refused():
    """A mesh whose size differs from the device count fails with both numbers, naming config.mesh
    (a ConfigError: main.py prints it as one line)."""
    with pytest.raises(errors.ConfigError, match=r"config\.mesh: .*needs 4 devices, this run has 8"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def test_rules_drop_trivial_axes_on_a_one_device_mesh():
    """On one device every spec collapses to replicated; without a mesh the full rule shows."""
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    assert sharding.logical_to_spec(("batch", "length"), mesh) == P(None, None)
    assert sharding.logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")


def test_unknown_logical_axis_is_an_error():
    """A typo in a logical axis name is caught, not silently replicated."""
    with pytest.raises(KeyError, match="'embd'"):
        sharding.logical_to_spec(("embd",))


def test_put_batch_places_rows_by_the_batch_rule_or_a_given_sharding():
    """put_batch shards rows as the logical axis ``batch`` (int64 becomes int32 without x64), or uses the
    sharding it is given; the values are unchanged."""
    import numpy as np
    from jax.sharding import NamedSharding

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    batch = {"ids": np.arange(12, dtype=np.int32).reshape(4, 3), "index": np.arange(4, dtype=np.int64)}
    placed = sharding.put_batch(batch, mesh)
    assert placed["ids"].sharding == sharding.logical_sharding(mesh, ("batch",))
    assert placed["index"].dtype == (np.int64 if jax.config.jax_enable_x64 else np.int32)
    for key, value in batch.items():
        np.testing.assert_array_equal(np.asarray(placed[key]), value)
    replicated = NamedSharding(mesh, P())
    assert sharding.put_batch(batch, replicated)["ids"].sharding == replicated
