"""Parameters born sharded by the rules table on 8 simulated devices, with unchanged values and logits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests import LOW_CODEGEN_EFFORT_ENV, REPO

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from bb3x_jax import sharding
    from bb3x_jax.model import build, config

    assert jax.device_count() == 8
    # one compiled forward per model (at the tests' low codegen effort, from the environment)
    forward = lambda m, x, y: jax.jit(lambda m, x, y: m(x, y))(m, x, y)
    scanned = {"scan_layers": True, "remat": "dots"}  # stacked layers: a replicated leading "layers" axis
    for preset, overrides, shapes in (("tiny", {}, ((2, 2, 2), (1, 8, 1), (1, 2, 4), (8, 1, 1))),
                                      ("tiny_opt", {}, ((2, 2, 2),)), ("tiny", scanned, ((2, 2, 2),))):
        cfg = config.preset(preset, **overrides)
        plain = build.build(cfg, seed=3)
        ids = jnp.array([[5, 6, 7, 9, 0, 0, 0, 0]] * 8)
        dec = jnp.array([[1, 4, 5, 3]] * 8) if cfg.arch == "encoder_decoder" else ids
        enc = ids if cfg.arch == "encoder_decoder" else None
        b = forward(plain, enc, dec)
        for shape in shapes:
            mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
            sharded = build.build(cfg, mesh=mesh, seed=3)
            checked = 0
            for (path, var), (_, ref) in zip(nnx.iter_graph(sharded), nnx.iter_graph(plain)):
                if not isinstance(var, nnx.Param):
                    continue
                names = var.get_metadata()["out_sharding"]
                expected = sharding.logical_to_spec(names, mesh)
                assert var[...].sharding.spec == expected, (path, var[...].sharding.spec, expected)
                np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(ref[...]), err_msg=str(path))
                checked += 1
            assert checked > 10
            a = forward(sharded, enc, dec)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # A big preset's layout is checked abstractly: one tensor-sharded ffn kernel.
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    abstract = nnx.eval_shape(lambda: build.construct(config.preset("bb3_3b"), 0))
    _, state = nnx.split(abstract)
    shardings = build.parameter_shardings(state, mesh)
    kernel = shardings["decoder"]["layers"][0]["ffn"]["lin1"]["kernel"]
    assert kernel.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), kernel.spec
    assert kernel.shard_shape((2048, 8192)) == (1024, 2048)
    print("OK")
    """
)


def test_parameters_land_where_the_rules_table_says():
    """On meshes (2,2,2), (1,8,1), (1,2,4), (8,1,1) each parameter has its rule's sharding, the same values and logits
    (scanned layers too, on (2,2,2))."""
    # The tests' codegen effort for every program of the script, the models' initialisers included.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               **LOW_CODEGEN_EFFORT_ENV)
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
