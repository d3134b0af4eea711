"""``--mode=bench``: how fast the real train step runs, as one JSON line.

Synthetic batches of fixed shape (``config.bench``: batch, context and label
lengths, full rows without padding, a fraction of them negative) go through
the same jitted CRINGE step as training, on the configured mesh. After
``warmup`` steps (the first compiles) ``steps`` steps are timed one by one
(each waits for its result), and the median is reported with:

- ``tokens_per_s``: (context + label) tokens per second, ``label_tokens_per_s``;
- ``model_flops_per_step``: matmul FLOPs of forward + backward from the
  architecture (6 per parameter per token for projections, 12·n·m·d per layer
  for attention scores, the output projection over label positions), the
  usual definition behind MFU; ``xla_flops_per_step`` is XLA's own count;
- ``mfu``: model FLOPs per second over the device's peak for the compute
  dtype, where the peak is known (``PEAK_FLOPS``), else null (CPUs);
- ``peak_memory_bytes`` where the backend reports it;
- ``decode_tokens_per_s``: new tokens per second of the jitted decoder
  (``bench.decode_len`` tokens for each of ``bench.batch`` contexts, greedy or
  ``bench.decode_beam`` beams; the end token is banned so every row decodes the
  full length), median of ``bench.steps`` runs after one compiling run.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import config_dict

from bb3x_jax import decoding, sharding
from bb3x_jax.model.config import ModelConfig
from bb3x_jax.train import runtime as setup_lib

# Dense peak FLOP/s per chip by device kind and compute dtype (vendor datasheets).
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("NVIDIA H100 80GB HBM3", "bfloat16"): 989e12,
    ("NVIDIA H100 80GB HBM3", "float32"): 67e12,
    ("NVIDIA H200", "bfloat16"): 989e12,
    ("NVIDIA H200", "float32"): 67e12,
    ("NVIDIA A100-SXM4-80GB", "bfloat16"): 312e12,
    ("NVIDIA A100-SXM4-40GB", "bfloat16"): 312e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5", "bfloat16"): 459e12,
    ("TPU v6 lite", "bfloat16"): 918e12,
}


def model_flops_per_step(cfg: ModelConfig, batch: int, context: int, label: int) -> float:
    """Forward + backward matmul FLOPs of one step on full-length rows (no padding)."""
    d, f, v = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    projections = 4 * d * d + 2 * d * f  # q, k, v, out + the two FFN matrices, per token
    if cfg.arch == "decoder_only":
        n = context + label
        per_layer = 6 * n * projections + 12 * n * n * d
        return batch * (cfg.n_decoder_layers * per_layer + 6 * label * d * v)
    encoder = cfg.n_encoder_layers * (6 * context * projections + 12 * context * context * d)
    cross = 6 * label * 2 * d * d + 6 * context * 2 * d * d + 12 * label * context * d  # q/out, k/v, scores
    decoder = cfg.n_decoder_layers * (6 * label * projections + 12 * label * label * d + cross)
    return batch * (encoder + decoder + 6 * label * d * v)


def synthetic_batch(cfg: ModelConfig, batch: int, context: int, label: int, negative_fraction: float,
                    seed: int) -> dict[str, np.ndarray]:
    """Full rows of random non-special ids; labels end with the end token; the first rows negative."""
    rng = np.random.default_rng(seed)
    low = max(cfg.pad_id, cfg.start_id, cfg.end_id) + 2
    negatives = int(round(batch * negative_fraction))
    labels = rng.integers(low, cfg.vocab_size, size=(batch, label), dtype=np.int32)
    labels[:, -1] = cfg.end_id
    return {
        "context_ids": rng.integers(low, cfg.vocab_size, size=(batch, context), dtype=np.int32),
        "label_ids": labels,
        "feedback": np.array([0] * negatives + [1] * (batch - negatives), np.int32),
        "valid": np.ones(batch, bool),
        "index": np.arange(batch, dtype=np.int32),
    }


def _peak_memory() -> int | None:
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
    return max(peaks) if peaks else None


def decode_speed(network, context_ids: np.ndarray, decode_len: int, beams: int, runs: int) -> dict[str, Any]:
    """Median wall time of generating ``decode_len`` tokens per row (all rows run to the end)."""
    settings = decoding.Settings(method="beam" if beams > 1 else "greedy", beam_size=beams, max_len=decode_len,
                                 min_len=decode_len)
    graphdef, state = nnx.split(network)
    search = decoding.compiled_search(graphdef, settings)
    key = jax.random.key(0)
    start = time.perf_counter()
    jax.block_until_ready(search(state, context_ids, key))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(search(state, context_ids, key))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"decode_len": decode_len, "decode_beam": beams, "decode_s_median": median,
            "decode_tokens_per_s": len(context_ids) * decode_len / median, "decode_compile_s": compile_s}


def compiled_step(config: config_dict.ConfigDict, workdir: str):
    """(setup, host batch, device batch, compiled train step, compile seconds) for ``config.bench``'s shapes."""
    b = config.bench
    setup = setup_lib.Setup(config, workdir, with_data=False)
    local = synthetic_batch(setup.model_cfg, b.batch, b.context, b.label, b.negative_fraction, config.seed)
    batch = sharding.put_batch(local, setup.mesh)
    start = time.perf_counter()
    compiled = setup.train_step.lower(setup.state, batch, setup.anchor).compile()
    return setup, local, batch, compiled, time.perf_counter() - start


def timed_steps(compiled, state, batch, anchor, warmup: int, steps: int):
    """(state, last metrics, seconds of each of ``steps`` steps after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        state, metrics = compiled(state, batch, anchor)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, anchor)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return state, metrics, times


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    b = config.bench
    setup, local, batch, compiled, compile_s = compiled_step(config, workdir)
    cfg = setup.model_cfg
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, metrics, times = timed_steps(compiled, setup.state, batch, setup.anchor, b.warmup, b.steps)
    median = statistics.median(times)
    flops = model_flops_per_step(cfg, b.batch, b.context, b.label)
    device = jax.devices()[0]
    peak = PEAK_FLOPS.get((device.device_kind, cfg.dtype))
    result = {
        "model": config.model.preset, "objective": config.train.objective, "dtype": cfg.dtype,
        "batch": b.batch, "context": b.context, "label": b.label, "params": setup.parameter_count,
        "step_s_median": median, "step_s_mean": statistics.fmean(times), "step_s_min": min(times),
        "tokens_per_s": b.batch * (b.context + b.label) / median, "label_tokens_per_s": b.batch * b.label / median,
        "model_flops_per_step": flops, "xla_flops_per_step": (cost or {}).get("flops"),
        "model_tflops_per_s": flops / median / 1e12,
        "mfu": None if peak is None else flops / median / (peak * jax.device_count()),
        "peak_memory_bytes": _peak_memory(), "compile_s": compile_s, "loss": float(metrics["loss"]),
        "devices": jax.device_count(), "device_kind": device.device_kind, "backend": jax.default_backend(),
        "mesh": dict(setup.mesh.shape), "jax_version": jax.__version__, "steps_timed": b.steps,
    }
    if b.decode_len:
        network = nnx.merge(setup.graphdef, state.params, state.rest)
        result.update(decode_speed(network, jax.numpy.asarray(local["context_ids"]), b.decode_len, b.decode_beam,
                                   b.steps))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    if jax.process_index() == 0:
        print(json.dumps(result))
    return result
