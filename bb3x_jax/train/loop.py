"""``--mode=train``: the training loop (work in progress: no checkpoints or resume yet).

Prepares data and tokenizer (cached), builds the model sharded on the mesh,
runs the jitted train step with a live progress bar, logs metrics as JSON
lines, then evaluates on the valid split: perplexity of positive, negative and
unlabeled labels, and the positive-minus-negative likelihood gap that CRINGE
is meant to widen.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict
from tqdm import tqdm

from bb3x_jax import config as config_lib
from bb3x_jax import sharding
from bb3x_jax.data import dataset, pipeline, schema
from bb3x_jax.model import build
from bb3x_jax.train import step as step_lib


def make_eval_step(graphdef, pad_id: int):
    """Per-example summed label NLL and token counts (deterministic forward)."""
    from flax import nnx

    @jax.jit
    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        logits = model.label_logits(batch["context_ids"], batch["label_ids"], deterministic=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["label_ids"][..., None], axis=-1)[..., 0]
        mask = (batch["label_ids"] != pad_id) & batch["valid"][:, None]
        return (nll * mask).sum(1), mask.sum(1)

    return eval_step


def evaluate(eval_step, state, iterator, mesh, max_batches: int) -> dict[str, Any]:
    """Perplexity per feedback class and the mean per-token NLL gap (negative - positive)."""
    sums = {name: 0.0 for name in schema.FEEDBACK_NAMES.values()}
    tokens = {name: 0 for name in schema.FEEDBACK_NAMES.values()}
    for i, local in enumerate(iterator):
        if i >= max_batches:
            break
        batch = pipeline.global_batch_to_device(local, mesh)
        nll, count = jax.device_get(eval_step(state.params, state.rest, batch))
        for cls, name in schema.FEEDBACK_NAMES.items():
            rows = (local["feedback"] == cls) & local["valid"]
            sums[name] += float(nll[rows].sum())
            tokens[name] += int(count[rows].sum())
    out: dict[str, Any] = {}
    for name in sums:
        mean = sums[name] / tokens[name] if tokens[name] else float("nan")
        out[f"nll_{name}"] = mean
        out[f"ppl_{name}"] = float(np.exp(mean)) if tokens[name] else float("nan")
        out[f"tokens_{name}"] = tokens[name]
    out["nll_gap_negative_minus_positive"] = out["nll_negative"] - out["nll_positive"]
    return out


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    os.makedirs(workdir, exist_ok=True)
    built = dataset.prepare(config, workdir)
    tok = dataset.load_tokenizer(config, built)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    cfg = config_lib.model_config(config, tok)
    model = build.build(cfg, seed=config.seed, mesh=mesh)
    train = config.train
    tx = step_lib.make_optimizer(
        learning_rate=train.learning_rate, warmup_steps=train.warmup_steps, total_steps=train.steps,
        weight_decay=train.weight_decay, clip_norm=train.clip_norm, grad_accum=train.grad_accum,
    )
    graphdef, state = step_lib.init_state(model, tx, config.seed)
    train_step = step_lib.make_train_step(
        graphdef, tx, objective=train.objective, alpha=train.alpha, k=train.k,
        detach_positives=train.detach_positives, train_ce_on_positive=train.train_ce_on_positive, pad_id=tok.pad_id,
    )
    iterator = pipeline.BatchIterator(
        dataset.batch_source(config, built, tok, "train"), tok, dataset.pipeline_config(config, train=True)
    )
    log_path = os.path.join(workdir, "metrics.jsonl")
    start = time.perf_counter()
    tokens_seen = 0
    with open(log_path, "w") as log, tqdm(total=train.steps, desc=f"train {train.objective}", unit="step") as bar:
        try:
            for step in range(1, train.steps + 1):
                local = next(iterator)
                tokens_seen += int((local["context_ids"] != tok.pad_id).sum() + (local["label_ids"] != tok.pad_id).sum())
                state, metrics = train_step(state, pipeline.global_batch_to_device(local, mesh))
                if step % train.log_every == 0 or step == train.steps:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - start
                    record = {"step": step, **values, "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{values['loss']:.3f}", ce=f"{values['ce_loss']:.3f}",
                                    ct=f"{values['ct_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
        finally:
            iterator.close()
    eval_source = dataset.batch_source(config, built, tok, "valid")
    eval_iterator = pipeline.BatchIterator(eval_source, tok, dataset.pipeline_config(config, train=False))
    try:
        result = evaluate(make_eval_step(graphdef, tok.pad_id), state, eval_iterator, mesh, train.eval_batches)
    finally:
        eval_iterator.close()
    summary = {
        "objective": train.objective, "steps": train.steps, "model": config.model.preset,
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
        "train_s": round(time.perf_counter() - start, 1), "valid": result,
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n{'valid':<10} {'ppl':>10} {'tokens':>8}")
    for name in ("positive", "negative", "unlabeled"):
        print(f"{name:<10} {result['ppl_' + name]:>10.3f} {result['tokens_' + name]:>8}")
    print(f"negative - positive NLL gap: {result['nll_gap_negative_minus_positive']:.4f} nats/token")
    print(json.dumps(summary))
    return summary
