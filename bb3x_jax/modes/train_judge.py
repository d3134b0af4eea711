"""``--mode=train_judge``: train a feedback classifier (good / bad bot response) as a judge.

Iterative CRINGE labels a model's own generations with a judge
(``bb3x_jax.eval.judges``). On the synthetic release that can be the world's
rule; on real data it is this classifier, trained on the release's labelled bot messages (the
feedback policy's positive / negative; unlabeled messages are skipped and
counted).

``run`` prepares the data and tokenizer as every mode does
(``dataset.prepare_with_tokenizer``), trains ``config.judge.steps`` AdamW steps
of the class-weighted loss (``model/classifier.py``) with a plain ``jax.jit``
step on the split NNX state, deterministic from ``config.seed`` (numpy-seeded
shuffling, dropout keys folded from the seed and the step), and evaluates on
``config.eval.split``: accuracy, balanced accuracy, per-class precision and
recall and the majority-class baseline on the labelled messages; on a
synthetic release (``data.manual_dir`` empty, or a folder holding the
synthesizer's ``ground_truth.jsonl``) also the agreement with
``synthetic.judge`` (good vs not good) over ALL the split's bot responses,
labelled or not.

It writes ``<workdir>/judge/`` (or ``judge.path``) with
``judges.write_judge``; ``judges.load_judge`` reads it back.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

from bb3x_jax.data import schema, synthetic, token_cache
from bb3x_jax.data.tokenizers import base as tokenizer_lib
from bb3x_jax.eval import judges
from bb3x_jax.eval.judges import BAD, FORMAT, GOOD, PREDICT_BATCH, TOKENIZER_BUNDLE, FeedbackJudge, encode, write_judge
from bb3x_jax.model import classifier as classifier_lib
from bb3x_jax.train import inputs as dataset
from bb3x_jax.train import step as step_lib


# --- data ---------------------------------------------------------------------------------
def read_split(source, *, keep_unlabeled: bool, block: int = 4096) -> dict[str, Any]:
    """The split's (context, response, feedback) as text, and its class counts.

    Unlabeled records are counted but, unless ``keep_unlabeled``, not kept
    (on the real release they are ~95% of 2.7M long contexts).
    """
    contexts, responses, feedback = [], [], []
    counts = {"examples": 0, "positive": 0, "negative": 0, "unlabeled": 0}
    names = {schema.POSITIVE: "positive", schema.NEGATIVE: "negative", schema.UNLABELED: "unlabeled"}
    for start in range(0, len(source), block):
        for record in source.__getitems__(range(start, min(start + block, len(source)))):
            f = int(record["feedback"])
            counts["examples"] += 1
            counts[names[f]] += 1
            if f == schema.UNLABELED and not keep_unlabeled:
                continue
            contexts.append(tokenizer_lib.as_text(record["context"]))
            responses.append(tokenizer_lib.as_text(record["label"]))
            feedback.append(f)
    return {"contexts": contexts, "responses": responses, "feedback": np.asarray(feedback, np.int32),
            "counts": counts}




# --- training ---------------------------------------------------------------------------------
def make_train_step(graphdef, rest, tx: optax.GradientTransformation, weights: tuple[float, float]):
    """Jitted ``(params, opt_state, ids, labels, key) -> (params, opt_state, loss)``; state donated."""

    def step(params, opt_state, ids, labels, key):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(ids, deterministic=False, key=key)
            return classifier_lib.weighted_bce(logits, labels, weights)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch_size] example indices: seeded permutations, one per epoch, read in sequence."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    return order.reshape(steps, batch_size)


def train_classifier(cfg: classifier_lib.ClassifierConfig, ids: np.ndarray, labels: np.ndarray, *, steps: int,
                     batch_size: int, learning_rate: float, weight_decay: float = 0.01, seed: int = 0,
                     log=None) -> tuple[Any, Any, Any, list[dict]]:
    """(graphdef, params, rest, history) after ``steps`` AdamW steps of the class-weighted loss.

    ``ids`` [N, max_len] rows of ``encode_pairs``; ``labels`` 1 good / 0 bad.
    Linear warmup (10% of the steps) then linear decay, gradient clipping at 1.
    A pure function of its arguments: same inputs and seed, same parameters.
    """
    labels = np.asarray(labels, np.int32)
    weights = classifier_lib.class_weights(labels)
    graphdef, params, rest = nnx.split(classifier_lib.build(cfg, seed), nnx.Param, ...)
    tx = step_lib.make_optimizer(learning_rate=learning_rate, warmup_steps=max(1, steps // 10), total_steps=steps,
                                 weight_decay=weight_decay, clip_norm=1.0)
    opt_state = tx.init(params)
    train_step = make_train_step(graphdef, rest, tx, weights)
    order = batch_order(len(labels), batch_size, steps, seed)
    base_key = jax.random.key(seed)
    history, window = [], []
    every = max(1, steps // 10)
    for i in range(steps):
        rows = order[i]
        params, opt_state, loss = train_step(params, opt_state, jnp.asarray(ids[rows]), jnp.asarray(labels[rows]),
                                             jax.random.fold_in(base_key, i))
        window.append(loss)
        if (i + 1) % every == 0 or i + 1 == steps:
            mean = float(np.mean(jax.device_get(window)))
            history.append({"step": i + 1, "loss": mean})
            window = []
            if log is not None:
                log(f"step {i + 1:>6d}/{steps}  loss {mean:.4f}")
    return graphdef, params, rest, history


# --- prediction and metrics ----------------------------------------------------------------
def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def binary_metrics(predicted_good: np.ndarray, true_good: np.ndarray, majority_good: bool) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision / recall, counts, and the baseline that always
    says the majority class (``majority_good``: the training set's majority). Undefined ratios are None."""
    p, t = np.asarray(predicted_good, bool), np.asarray(true_good, bool)
    tp, fn = int((p & t).sum()), int((~p & t).sum())
    tn, fp = int((~p & ~t).sum()), int((p & ~t).sum())
    n, good, bad = len(t), tp + fn, tn + fp
    recall_good, recall_bad = _ratio(tp, good), _ratio(tn, bad)
    return {
        "count": n, "good": good, "bad": bad, "predicted_good": tp + fp, "predicted_bad": tn + fn,
        "confusion": {"good_as_good": tp, "good_as_bad": fn, "bad_as_bad": tn, "bad_as_good": fp},
        "accuracy": _ratio(tp + tn, n),
        "balanced_accuracy": None if recall_good is None or recall_bad is None else (recall_good + recall_bad) / 2,
        "precision_good": _ratio(tp, tp + fp), "recall_good": recall_good,
        "precision_bad": _ratio(tn, tn + fn), "recall_bad": recall_bad,
        "majority_class": GOOD if majority_good else BAD,
        "majority_baseline_accuracy": _ratio(good if majority_good else bad, n),
    }


def ground_truth_agreement(contexts: Sequence[str], responses: Sequence[str], predicted_good: np.ndarray,
                           feedback: np.ndarray, majority_good: bool) -> dict[str, Any]:
    """The classifier against ``synthetic.judge`` (good vs any bad reason) on every response given,
    also split into the labelled and unlabeled ones (``feedback``), and how often the release's own
    labels agree with the judge (the noise of the training signal)."""
    truth = [synthetic.judge(c, r) for c, r in zip(contexts, responses)]
    true_good = np.asarray([v == synthetic.GOOD for v in truth], bool)
    predicted_good = np.asarray(predicted_good, bool)
    feedback = np.asarray(feedback)
    labelled = feedback != schema.UNLABELED
    result = binary_metrics(predicted_good, true_good, majority_good)
    result["labelled"] = binary_metrics(predicted_good[labelled], true_good[labelled], majority_good)
    result["unlabeled"] = binary_metrics(predicted_good[~labelled], true_good[~labelled], majority_good)
    by_reason = {}
    for reason in (synthetic.GOOD,) + tuple(synthetic.BAD_REASONS):
        rows = np.asarray([v == reason for v in truth], bool)
        if rows.any():  # share of this true class the classifier calls bad
            by_reason[reason] = {"count": int(rows.sum()), "called_bad": float((~predicted_good[rows]).mean())}
    result["called_bad_by_true_reason"] = by_reason
    release_good = feedback[labelled] == schema.POSITIVE
    result["release_labels_accuracy"] = float((release_good == true_good[labelled]).mean()) if labelled.any() else None
    return result


# --- the mode ------------------------------------------------------------------------------------
def classifier_config(config: config_dict.ConfigDict, tokenizer) -> classifier_lib.ClassifierConfig:
    j = config.judge
    return classifier_lib.ClassifierConfig(
        vocab_size=tokenizer.vocab_size, d_model=j.d_model, n_heads=j.n_heads, ffn_dim=j.ffn_dim,
        n_layers=j.n_layers, max_len=j.max_len, dropout=j.dropout, pad_id=tokenizer.pad_id, sep_id=tokenizer.end_id,
    )


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:5.1f}%"


def format_report(report: dict) -> str:
    t, e = report["train"], report["eval"]
    lines = [
        f"train: {t['labelled']} labelled ({t['positive']} good / {t['negative']} bad), "
        f"{t['unlabeled_skipped']} unlabeled skipped; {t['steps']} steps in {t['seconds']:.1f} s "
        f"(+{t['data_seconds']:.1f} s reading and tokenizing), "
        f"final loss {t['final_loss']:.4f}",
        f"{e['split']} split, labelled messages ({e['labelled']['count']}: {e['labelled']['good']} good / "
        f"{e['labelled']['bad']} bad; {e['unlabeled']} unlabeled):",
    ]

    def table(m: dict, indent: str = "  ") -> list[str]:
        return [
            f"{indent}accuracy {_pct(m['accuracy'])}   balanced {_pct(m['balanced_accuracy'])}   "
            f"majority ({m['majority_class']}) baseline {_pct(m['majority_baseline_accuracy'])}",
            f"{indent}class  precision  recall   count  predicted",
            f"{indent}good     {_pct(m['precision_good'])}  {_pct(m['recall_good'])}  {m['good']:>6d}  "
            f"{m['predicted_good']:>9d}",
            f"{indent}bad      {_pct(m['precision_bad'])}  {_pct(m['recall_bad'])}  {m['bad']:>6d}  "
            f"{m['predicted_bad']:>9d}",
        ]

    lines += table(e["labelled"])
    g = report.get("ground_truth")
    if g:
        lines.append(f"agreement with synthetic.judge on all {g['count']} {e['split']} bot responses "
                     f"({g['good']} good / {g['bad']} bad):")
        lines += table(g)
        lines.append("  labelled: agreement " + _pct(g["labelled"]["accuracy"]) + "; unlabeled: agreement "
                     + _pct(g["unlabeled"]["accuracy"]) + f" (balanced {_pct(g['unlabeled']['balanced_accuracy'])})")
        lines.append("  called bad, by true reason: " + ", ".join(
            f"{k} {_pct(v['called_bad']).strip()} of {v['count']}" for k, v in g["called_bad_by_true_reason"].items()))
        lines.append(f"  (the release's own labels agree with it on {_pct(g['release_labels_accuracy']).strip()} "
                     "of the labelled messages)")
    return "\n".join(lines)


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    j = config.judge
    built, tokenizer = dataset.prepare_with_tokenizer(config, workdir)
    spec = dataset.tokenizer_spec(config, built)
    cfg = classifier_config(config, tokenizer)

    started = time.perf_counter()
    train = read_split(dataset.source(built, "train"), keep_unlabeled=False)
    labels = (train["feedback"] == schema.POSITIVE).astype(np.int32)
    counts = train["counts"]
    print(f"train split: {counts['examples']} bot messages, {counts['positive']} good + {counts['negative']} bad "
          f"labelled; {counts['unlabeled']} unlabeled skipped")
    ids = encode(train["contexts"], train["responses"], tokenizer, cfg.max_len)
    del train
    print(f"classifier: {cfg.n_layers} layers, d_model {cfg.d_model}, max_len {cfg.max_len}; "
          f"{j.steps} steps of batch {j.batch_size}")
    data_seconds, started = time.perf_counter() - started, time.perf_counter()
    _, params, _, history = train_classifier(
        cfg, ids, labels, steps=j.steps, batch_size=j.batch_size, learning_rate=j.learning_rate,
        weight_decay=j.weight_decay, seed=config.seed, log=print)
    train_seconds = time.perf_counter() - started
    majority_good = int(labels.sum()) * 2 >= len(labels)

    split = config.eval.split
    synthetic_release = dataset.is_synthetic_release(config.data)
    synthetic_release = synthetic_release and config.data.stream.endswith("bot")  # the world judges bot messages
    held = read_split(dataset.source(built, split), keep_unlabeled=synthetic_release)
    labelled = held["feedback"] != schema.UNLABELED
    # Judged exactly as a loaded judge judges (same encoding, batching and threshold).
    judge = FeedbackJudge(cfg, params, tokenizer)
    predicted_good = judge.probabilities(held["contexts"], held["responses"], batch_size=PREDICT_BATCH) > 0.5
    true_good = held["feedback"] == schema.POSITIVE
    report: dict[str, Any] = {
        "train": {"examples": counts["examples"], "labelled": counts["positive"] + counts["negative"],
                  "positive": counts["positive"], "negative": counts["negative"],
                  "unlabeled_skipped": counts["unlabeled"], "steps": j.steps, "seconds": train_seconds,
                  "data_seconds": data_seconds,
                  "final_loss": history[-1]["loss"], "loss_history": history},
        "eval": {"split": split, "examples": held["counts"]["examples"], "unlabeled": held["counts"]["unlabeled"],
                 "labelled": binary_metrics(predicted_good[labelled], true_good[labelled], majority_good)},
    }
    if synthetic_release:
        report["ground_truth"] = ground_truth_agreement(held["contexts"], held["responses"], predicted_good,
                                                        held["feedback"], majority_good)
    meta = {
        "format": FORMAT,
        "classifier": cfg.to_dict(),
        "tokenizer": {"source": spec.source, "kind": spec.kind,
                      "fingerprint": token_cache.tokenizer_fingerprint(tokenizer), "bundle": TOKENIZER_BUNDLE},
        "max_len": cfg.max_len, "steps": j.steps, "seed": config.seed, "batch_size": j.batch_size,
        "learning_rate": j.learning_rate, "weight_decay": j.weight_decay, "threshold": 0.5,
        "stream": config.data.stream, "dataset": built.builder_config.name, "data_dir": str(built.data_dir),
        "policy": config.data.policy.to_dict(),
    }
    directory = os.path.abspath(judges.judge_path(config, workdir))  # judge.path, else <workdir>/judge
    write_judge(directory, params, meta, report, spec)
    print(f"\nfeedback classifier -> {directory}")
    print(format_report(report))
    print(json.dumps({"judge": directory, **report}))
    return report
