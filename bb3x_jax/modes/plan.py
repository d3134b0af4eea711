"""``--mode=plan``: per-device memory and FLOPs of the real train step, without the hardware.

The run's own jitted step (``step.make_train_step`` under ``sharding.MeshBound``)
is lowered and compiled ahead of time for simulated CPU devices, from abstract
shapes only: the model is built under ``nnx.eval_shape`` and every leaf of the
state becomes a ``jax.ShapeDtypeStruct`` carrying the sharding the run gives
it (parameters by the rules table, as ``model.build`` places them; optimizer
moments like their parameters; step, RNG key and counters replicated; batch
rows like ``sharding.put_batch``). No weight is ever allocated,
so a 175B model plans on a laptop.

Shapes come from ``config.bench`` (global batch, context and label lengths)
and the preset's own vocabulary, like bench mode. Layers are always scanned
(``model.scan_layers`` forced on) so that one layer body is compiled,
whatever the depth. The device count is ``plan.devices`` (a mesh axis of -1
takes what the others leave), or with 0 the product of the explicit mesh
sizes (a -1 axis gets 1).

XLA:CPU's ``memory_analysis`` of the partitioned program is per device: a
proxy for a GPU/TPU (other fusion, layouts and collective scheduling, no
runtime workspaces), good for what dominates: arguments (params + optimizer
state) and the activations kept for the backward pass. Its ``cost_analysis``
counts a loop body once, so FLOPs also come from the traced step's matmuls
(every scanned layer, remat recomputation included) and bench's formula.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.extend import core
from ml_collections import config_dict

from bb3x_jax import config as config_lib
from bb3x_jax import sharding
from bb3x_jax.model import build
from bb3x_jax.model import config as model_config
from bb3x_jax.modes import bench as bench_lib
from bb3x_jax.train import runtime
from bb3x_jax.train import step as step_lib

GB = 1e9  # plan.device_memory_gb and the table count in 10^9 bytes


def device_count(config: config_dict.ConfigDict) -> int:
    """Devices the plan simulates: ``plan.devices``, else the product of the explicit mesh sizes."""
    explicit = math.prod(config.mesh[a] for a in sharding.MESH_AXES if config.mesh[a] != -1)
    n = config.plan.devices or explicit
    if n % explicit:
        raise config_lib.ConfigError("plan.devices", f"{n} devices do not divide into the mesh {config.mesh.to_dict()}")
    if -1 not in [config.mesh[a] for a in sharding.MESH_AXES] and n != explicit:
        raise config_lib.ConfigError("plan.devices", f"{n} devices, but the mesh {config.mesh.to_dict()} "
                                                     f"has {explicit}; set one mesh axis to -1 or plan.devices=0")
    return n


def simulated_devices(n: int) -> list:
    """``n`` CPU devices; configures JAX for them when its backend has not started yet.

    Sets ``jax_platforms=cpu`` too, so planning never touches (or reserves) an accelerator.
    """
    try:
        jax.config.update("jax_num_cpu_devices", n)
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # the backend already runs: use its CPU devices if there are enough
        pass
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise RuntimeError(
            f"the plan needs {n} simulated devices but JAX already started with {len(devices)} CPU devices; "
            f"run the plan in a fresh process, or set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            "before JAX starts")
    return devices[:n]


def _with_shardings(tree, shardings):
    """The tree with every leaf a ShapeDtypeStruct carrying the matching sharding (a leaf list)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shardings)])


def _with_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def opt_state_shardings(opt_state, params, mesh) -> list:
    """Shardings of the optimizer state's leaves: a leaf whose path ends with a parameter's
    path and has its shape (Adam's mu and nu, accumulated gradients) is placed like that
    parameter; anything else (counts) is replicated. This is the layout the step's outputs
    have, kept from its second call on: the one that sizes a run.
    """
    by_path = dict(_with_paths(params))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def one(path, x):
        for start in range(len(path)):
            param = by_path.get(tuple(path[start:]))
            if param is not None and param.shape == x.shape:
                return param.sharding
        return replicated

    return [one(path, x) for path, x in _with_paths(opt_state)]


def abstract_state(cfg, tx, seed: int, mesh):
    """(graphdef, TrainState of ShapeDtypeStructs with the run's shardings); nothing is allocated."""
    model = nnx.eval_shape(lambda: build.build(cfg, seed=seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # The placement model.build gives the run's parameters (and its RNG streams).
    params = _with_shardings(params, jax.tree.leaves(build.parameter_shardings(params, mesh)))
    rest = _with_shardings(rest, jax.tree.leaves(build.parameter_shardings(rest, mesh)))
    opt_state = jax.eval_shape(tx.init, params)
    opt_state = _with_shardings(opt_state, opt_state_shardings(opt_state, params, mesh))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key(seed))
    state = step_lib.TrainState(
        params, rest, opt_state, jax.ShapeDtypeStruct((), np.int32, sharding=replicated),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
    )
    return graphdef, state


def abstract_batch(cfg, bench: config_dict.ConfigDict, mesh) -> dict:
    """The bench section's batch as the pipeline shards it (rows over the batch mesh axes)."""
    rows = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch",), mesh))
    example = bench_lib.synthetic_batch(cfg, bench.batch, bench.context, bench.label, bench.negative_fraction, 0)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows) for k, v in example.items()}


def bytes_per_device(tree) -> int:
    """Bytes of a tree of sharded ShapeDtypeStructs on one device (its shard of every leaf)."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def matmul_flops(jaxpr) -> float:
    """2·M·N·K of every dot_general the traced step runs, a scan's body times its length.

    XLA's cost analysis counts a loop body once, so with scanned layers it misses
    all layers but one; this count also sees what remat recomputes.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
            continue
        inner = [matmul_flops(j) for j in core.jaxprs_in_params(eqn.params)]
        if eqn.primitive.name == "cond":  # one branch runs
            total += max(inner, default=0.0)
        else:
            total += sum(inner) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


def planned_model(config: config_dict.ConfigDict):
    """The preset with the run's overrides and scanned layers, checked against the bench shapes."""
    if config.train.init_from:
        raise config_lib.ConfigError("train.init_from", "plan mode plans config.model.preset; leave init_from empty "
                                                        "and pick the preset of the same architecture")
    overrides = dict(config_lib.model_overrides(config), scan_layers=True)  # one compiled layer body
    cfg = model_config.preset(config.model.preset, **overrides)
    b = config.bench
    needed = b.context + b.label if cfg.arch == "decoder_only" else max(b.context, b.label)
    if needed > cfg.n_positions:
        raise config_lib.ConfigError("bench.context", f"{config.model.preset} has {cfg.n_positions} positions, "
                                                      f"bench.context={b.context} and bench.label={b.label} need {needed}")
    return cfg


def plan(config: config_dict.ConfigDict) -> dict[str, Any]:
    """Lowers and compiles the train step for ``config`` on simulated devices; the plan as a dict."""
    start = time.perf_counter()
    if config.distributed.enabled:
        raise config_lib.ConfigError("distributed.enabled", "plan simulates every device in one process; set it False")
    devices = simulated_devices(device_count(config))
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    b, train = config.bench, config.train
    multiple = sharding.batch_size_multiple(mesh)
    if b.batch % multiple:
        raise config_lib.ConfigError("bench.batch", f"the global batch {b.batch} must be a multiple of {multiple} "
                                                    f"(the batch-sharded mesh axes of {dict(mesh.shape)})")
    cfg = planned_model(config)
    tx = runtime.optimizer(config)
    graphdef, state = abstract_state(cfg, tx, config.seed, mesh)
    batch = abstract_batch(cfg, b, mesh)
    train_step = runtime.train_step(config, graphdef, tx, cfg.pad_id, mesh)
    lower_start = time.perf_counter()
    with jax.set_mesh(mesh):  # what sharding.MeshBound does around the run's calls
        traced = train_step.fn.trace(state, batch, state.params if train.kl_anchor else None)
        lowered = traced.lower()
    compile_start = time.perf_counter()
    # LLVM's optimisation level only changes the CPU machine code, which the plan never
    # runs: buffer assignment (memory) and XLA's cost analysis are the same, compiling 2-4x faster.
    compiled = lowered.compile({"xla_backend_optimization_level": 0})
    compile_s = time.perf_counter() - compile_start

    memory = compiled.memory_analysis()
    stats = {name[: -len("_size_in_bytes")] + "_bytes": int(getattr(memory, name))
             for name in dir(memory) if name.endswith("_size_in_bytes")} if memory is not None else {}
    # What one device holds at the step's peak: its inputs, the temporaries, and the
    # outputs that do not reuse a donated input (the metrics), plus the program.
    total = (stats.get("argument_bytes", 0) + stats.get("temp_bytes", 0) + stats.get("output_bytes", 0)
             - stats.get("alias_bytes", 0) + stats.get("generated_code_bytes", 0)) if stats else None
    # The layout planned is the step's fixed point when the state comes back placed as it went in
    # (inputs the step never reads, the replaced RNG streams, have no input sharding).
    shapes, state_out = dict(_with_paths(state)), dict(_with_paths(compiled.output_shardings[0]))
    kept = all(s.is_equivalent_to(state_out[path], len(shapes[path].shape))
               for path, s in _with_paths(compiled.input_shardings[0][0]))
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    xla_flops = cost.get("flops")
    n = len(devices)
    params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))
    return {
        "preset": config.model.preset, "arch": cfg.arch, "params": params, "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype, "remat": cfg.remat, "scan_layers": cfg.scan_layers,
        "objective": train.objective, "grad_accum": train.grad_accum, "devices": n, "mesh": dict(mesh.shape),
        "batch": b.batch, "batch_per_shard": b.batch // multiple, "context": b.context, "label": b.label,
        "negative_fraction": b.negative_fraction,
        "params_bytes_per_device": bytes_per_device(state.params),
        "opt_state_bytes_per_device": bytes_per_device(state.opt_state),
        **{f"{k}_per_device": v for k, v in stats.items()},
        "total_bytes_per_device": total, "state_layout_kept": kept,
        "device_memory_gb": config.plan.device_memory_gb,
        "fits": None if total is None else total <= config.plan.device_memory_gb * GB,
        "model_flops_per_step": bench_lib.model_flops_per_step(cfg, b.batch, b.context, b.label),
        "program_flops_per_step": matmul_flops(traced.jaxpr.jaxpr),
        "xla_flops_per_device": xla_flops,
        "lower_s": compile_start - lower_start, "compile_s": compile_s, "plan_s": time.perf_counter() - start,
        "backend": jax.default_backend(), "jax_version": jax.__version__,
    }


def table(result: dict[str, Any]) -> str:
    """The plan for people: one aligned line per figure, sizes in GB (10^9 bytes) per device."""

    def gb(key):
        value = result.get(key)
        return "n/a" if value is None else f"{value / GB:,.2f} GB"

    mesh = " x ".join(f"{axis}={size}" for axis, size in result["mesh"].items())
    fits = {True: "fits", False: "does not fit", None: "unknown"}[result["fits"]]
    rows = [
        ("model", f"{result['preset']} ({result['arch']}, {result['params'] / 1e9:,.2f}B parameters)"),
        ("dtype", f"compute {result['dtype']}, parameters {result['param_dtype']}"),
        ("remat", f"{result['remat']} (scanned layers)"),
        ("mesh", f"{mesh} = {result['devices']} devices"),
        ("batch", f"{result['batch']} rows ({result['batch_per_shard']} per batch shard), context {result['context']}, "
                  f"label {result['label']}, grad_accum {result['grad_accum']}"),
        ("params / device", gb("params_bytes_per_device")),
        ("opt state / device", gb("opt_state_bytes_per_device")),
        ("arguments / device", gb("argument_bytes_per_device")),
        ("temporaries / device", gb("temp_bytes_per_device")),
        ("outputs / device", f"{gb('output_bytes_per_device')} ({gb('alias_bytes_per_device')} aliased to inputs)"),
        ("code / device", gb("generated_code_bytes_per_device")),
        ("total / device", f"{gb('total_bytes_per_device')}: {fits} in {result['device_memory_gb']:g} GB"),
        ("model FLOPs / step", f"{result['model_flops_per_step'] / 1e12:,.2f} TFLOPs (architecture formula)"),
        ("program FLOPs / step", f"{result['program_flops_per_step'] / 1e12:,.2f} TFLOPs (matmuls of the traced step, "
                                 "remat recomputation included)"),
        ("XLA FLOPs / device", "n/a" if result["xla_flops_per_device"] is None
         else f"{result['xla_flops_per_device'] / 1e12:,.3f} TFLOPs (cost analysis; counts a scanned layer once)"),
        ("compile", f"{result['compile_s']:.1f} s (lowering {result['lower_s']:.1f} s, plan {result['plan_s']:.1f} s)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Prints the table, then one JSON line; writes ``plan.json`` into the workdir."""
    if not config.model.scan_layers:
        print("plan: layers are scanned (model.scan_layers=True) so one layer body compiles", file=sys.stderr)
    result = plan(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "plan.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(json.dumps(result), flush=True)
    return result
