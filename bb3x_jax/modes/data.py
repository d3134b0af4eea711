"""``--mode=data``: prepare everything and push real batches through a sharded jitted step.

An end-to-end check of the data path without a model: release -> TFDS ->
tokenizer -> batches -> global arrays on the mesh -> a jitted reduction, with
throughput measured.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import config_dict

from bb3x_jax import sharding
from bb3x_jax.data import pipeline, schema
from bb3x_jax.train import inputs as dataset


def batch_statistics(batch: dict[str, jax.Array], pad_id: int) -> dict[str, jax.Array]:
    """Token and feedback counts of one batch (a pure function, jitted over the mesh)."""
    valid = batch["valid"]
    context_tokens = jnp.sum((batch["context_ids"] != pad_id) & valid[:, None])
    label_tokens = jnp.sum((batch["label_ids"] != pad_id) & valid[:, None])
    feedback = batch["feedback"]
    return {
        "examples": jnp.sum(valid),
        "context_tokens": context_tokens,
        "label_tokens": label_tokens,
        "context_slots": jnp.sum(valid) * batch["context_ids"].shape[1],
        "positive": jnp.sum(valid & (feedback == schema.POSITIVE)),
        "negative": jnp.sum(valid & (feedback == schema.NEGATIVE)),
        "unlabeled": jnp.sum(valid & (feedback == schema.UNLABELED)),
    }


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    mesh = sharding.make_mesh(config.mesh.to_dict())  # a mesh the devices cannot hold fails before any work
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    built = dataset.prepare(config, workdir)
    prepared_s = time.perf_counter() - start
    tok = dataset.load_tokenizer(config, built)
    multiple = sharding.batch_size_multiple(mesh)
    if config.data.batch_size % (multiple * jax.process_count()):
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} must be a multiple of the {multiple} batch shards "
            f"x {jax.process_count()} processes of mesh {dict(mesh.shape)}"
        )
    train_source = dataset.batch_source(config, built, tok, "train")
    iterator = pipeline.BatchIterator(train_source, tok, dataset.pipeline_config(config, train=True), mesh=mesh)
    row = sharding.logical_sharding(mesh, ("batch",))
    matrix = sharding.logical_sharding(mesh, ("batch", "length"))
    shardings = {"context_ids": matrix, "label_ids": matrix, "feedback": row, "valid": row, "index": row}
    step = jax.jit(batch_statistics, static_argnums=1, in_shardings=(shardings,))

    try:
        totals, shapes, elapsed, timed_examples = _drive(iterator, step, tok.pad_id, config.data_check.batches)
    finally:
        iterator.close()  # stop the prefetch thread before the interpreter tears down

    result = {
        "workdir": workdir,
        "release": dataset.resolve_release(config.data, workdir),
        "stream": config.data.stream,
        "prepared_dir": str(built.data_dir),
        "prepare_s": round(prepared_s, 2),
        "splits": dataset.summary(built),
        "tokenizer_vocab": tok.vocab_size,
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "batches": config.data_check.batches,
        "batch_shapes": sorted(str(s) for s in shapes),
        **totals,
        "context_padding_fraction": round(1 - totals["context_tokens"] / max(totals["context_slots"], 1), 4),
        "examples_per_s": round(timed_examples / elapsed, 1) if elapsed == elapsed and elapsed > 0 else None,
        "iterator_state": iterator.get_state(),
    }
    with open(os.path.join(workdir, "data_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    _print_summary(result)
    logging.info("data check written to %s", os.path.join(workdir, "data_check.json"))
    return result


def _drive(iterator, step, pad_id: int, num_batches: int):
    """Runs ``num_batches`` through the step; times all but the first (compilation)."""
    totals: dict[str, int] = {}
    shapes = set()
    timed_from = None
    for i in range(num_batches):
        if i == 1:
            timed_from = (time.perf_counter(), totals.get("examples", 0))
        batch = next(iterator)  # global arrays on the mesh
        shapes.add((batch["context_ids"].shape, batch["label_ids"].shape))
        for key, value in step(batch, pad_id).items():
            totals[key] = totals.get(key, 0) + int(value)
    if timed_from is None:
        return totals, shapes, float("nan"), 0
    return totals, shapes, time.perf_counter() - timed_from[0], totals["examples"] - timed_from[1]


def _print_summary(result: dict[str, Any]) -> None:
    print(f"\nbb3x-jax data check: stream {result['stream']} of {result['release']}")
    print(f"{'split':<6} {'examples':>9} {'positive':>9} {'negative':>9} {'unlabeled':>10} {'convs':>7} {'skipped':>8}")
    for split, r in result["splits"].items():
        print(
            f"{split:<6} {r.get('examples', 0):>9} {r.get('positive', 0):>9} {r.get('negative', 0):>9} "
            f"{r.get('unlabeled', 0):>10} {r.get('conversations', 0):>7} {r.get('skipped', 0):>8}"
        )
    print(
        f"{result['batches']} train batches on mesh {result['mesh']}: {result['examples']} examples, "
        f"{result['context_tokens']} context + {result['label_tokens']} label tokens, "
        f"context padding {result['context_padding_fraction']:.1%}, shapes {result['batch_shapes']}, "
        f"{result['examples_per_s']} examples/s (tokenize + place + step)"
    )
    print(json.dumps({k: v for k, v in result.items() if k not in ("splits", "iterator_state")}))
