"""Held-out likelihood metrics of a model on a prepared split.

What CRINGE should change, measured per feedback class: perplexity and token
accuracy of positive, negative and unlabeled labels, and the gap between the
mean per-token NLL of negative and positive labels (a model that learned from
the feedback puts less mass on responses users disliked). Each example is
seen exactly once (the eval pipeline pads its last batch with invalid rows).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from bb3x_jax.data import schema

_LOG_MAX_FLOAT = math.log(sys.float_info.max)


def perplexity(nll: float, tokens: int) -> float:
    """exp(NLL per token); nan without tokens, inf where a diverged model's NLL is past what a float holds."""
    mean = nll / tokens if tokens else float("nan")
    return float("inf") if mean >= _LOG_MAX_FLOAT else math.exp(mean)


def make_eval_step(graphdef, pad_id: int, mesh):
    """Jitted ``(params, rest, batch) -> per-example (summed NLL, label tokens, correct tokens,
    feedback, valid)`` over the global batch, replicated so every process can read all rows."""
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        logits = model.label_logits(batch["context_ids"], batch["label_ids"], deterministic=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        labels = batch["label_ids"]
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        mask = (labels != pad_id) & batch["valid"][:, None]
        correct = (jnp.argmax(logits, axis=-1) == labels) & mask
        return {"nll": (nll * mask).sum(1), "tokens": mask.sum(1), "correct": correct.sum(1),
                "feedback": batch["feedback"], "valid": batch["valid"]}

    return eval_step


def evaluate(eval_step, params, rest, iterator, max_batches: int = 0) -> dict[str, Any]:
    """Metrics per feedback class over ``max_batches`` global batches (0: the whole split) of an
    iterator that yields batches placed on the mesh."""
    names = list(schema.FEEDBACK_NAMES.items())
    sums = {name: np.zeros(3) for _, name in names}  # nll, tokens, correct
    examples = {name: 0 for _, name in names}
    for i, batch in enumerate(iterator):
        if max_batches and i >= max_batches:
            break
        out = jax.device_get(eval_step(params, rest, batch))
        for cls, name in names:
            rows = (out["feedback"] == cls) & out["valid"]
            sums[name] += [float(out["nll"][rows].sum()), float(out["tokens"][rows].sum()),
                           float(out["correct"][rows].sum())]
            examples[name] += int(rows.sum())
    result: dict[str, Any] = {}
    for _, name in names:
        nll, tokens, correct = sums[name]
        result[f"nll_{name}"] = nll / tokens if tokens else float("nan")
        result[f"ppl_{name}"] = perplexity(nll, tokens)
        result[f"token_acc_{name}"] = correct / tokens if tokens else float("nan")
        result[f"tokens_{name}"] = int(tokens)
        result[f"examples_{name}"] = examples[name]
    result["nll_gap_negative_minus_positive"] = result["nll_negative"] - result["nll_positive"]
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'class':<10} {'ppl':>10} {'token acc':>10} {'tokens':>8} {'examples':>9}"]
    for name in schema.FEEDBACK_NAMES.values():
        lines.append(f"{name:<10} {result['ppl_' + name]:>10.3f} {result['token_acc_' + name]:>10.4f} "
                     f"{result['tokens_' + name]:>8} {result['examples_' + name]:>9}")
    lines.append(f"negative - positive NLL gap: {result['nll_gap_negative_minus_positive']:.4f} nats/token")
    return "\n".join(lines)
