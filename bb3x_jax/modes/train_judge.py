"""``--mode=train_judge``: train a feedback classifier (good / bad bot response) as a judge.

Iterative CRINGE labels a model's own generations with a judge
(``bb3x_jax.eval.judges``). On the synthetic release that can be the world's
rule; on real data it is this classifier, trained on the release's labelled bot messages (the
feedback policy's positive / negative; unlabeled messages are skipped and
counted). With ``judge.label_canned`` the canned system responses keep their
own feedback (the policy's ``canned`` rule leaves them unlabeled for CRINGE),
because a judge that never saw one calls most of them bad.

``judge.init_from`` names a dialogue model (the workdir's own with ``workdir``:
in the BB3x experiment the baseline trained by likelihood on every bot
message) that the classifier starts from (``model/classifier.py``'s dialogue
arch); '' trains the small encoder from random weights.

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
labelled or not, with the recall of each true bad reason.

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
import tensorflow_datasets as tfds
from flax import nnx
from ml_collections import config_dict
from tensorflow_datasets.proto import tf_example_pb2

from bb3x_jax import config as config_lib
from bb3x_jax.data import schema, synthetic, token_cache
from bb3x_jax.data.feedback import FeedbackPolicy
from bb3x_jax.eval import judges
from bb3x_jax.eval.judges import BAD, FORMAT, GOOD, PREDICT_BATCH, TOKENIZER_BUNDLE, FeedbackJudge, write_judge
from bb3x_jax.model import api as model_api
from bb3x_jax.model import classifier as classifier_lib
from bb3x_jax.train import inputs as dataset
from bb3x_jax.train import step as step_lib


# --- data ---------------------------------------------------------------------------------
def judge_policy(config: config_dict.ConfigDict) -> FeedbackPolicy | None:
    """The feedback policy the judge's labels follow when it differs from ``data.policy`` (None: the same).

    ``judge.label_canned`` drops the ``canned`` rule, so canned system responses keep their likes,
    dislikes and crowdworker votes.
    """
    policy = config_lib.feedback_policy(config)
    if not config.judge.label_canned or "canned" not in policy.order:
        return None
    return FeedbackPolicy.from_dict({**policy.to_dict(), "order": [r for r in policy.order if r != "canned"]})


def read_split(built, split: str, *, keep_unlabeled: bool, relabel: FeedbackPolicy | None = None,
               block: int = 4096) -> dict[str, Any]:
    """The split's (context, response, feedback) as text, and its class counts.

    ``relabel``: the records the run's policy decided by its ``canned`` rule are classified
    again by this policy from their stored label message (the only records a policy without
    that rule can label differently). Unlabeled records are counted but, unless
    ``keep_unlabeled``, not kept (on the real release they are ~95% of 2.7M long contexts).
    """
    dataset.check_not_empty(built, split)
    raw = tfds.builder_from_directory(str(built.data_dir)).as_data_source(split).data_source
    contexts, responses, feedback = [], [], []
    counts = {"examples": 0, "positive": 0, "negative": 0, "unlabeled": 0, "relabelled": 0}
    names = {schema.POSITIVE: "positive", schema.NEGATIVE: "negative", schema.UNLABELED: "unlabeled"}
    for start in range(0, len(raw), block):
        for blob in raw.__getitems__(list(range(start, min(start + block, len(raw))))):
            fields = tf_example_pb2.Example.FromString(blob).features.feature
            f = int(fields["feedback"].int64_list.value[0])
            if relabel is not None and fields["feedback_source"].bytes_list.value[0] == b"canned":
                f, _ = relabel.classify(json.loads(fields["label_info"].bytes_list.value[0]))
                counts["relabelled"] += f != schema.UNLABELED
            counts["examples"] += 1
            counts[names[f]] += 1
            if f == schema.UNLABELED and not keep_unlabeled:
                continue
            contexts.append(fields["context"].bytes_list.value[0].decode("utf-8"))
            responses.append(fields["label"].bytes_list.value[0].decode("utf-8"))
            feedback.append(f)
    return {"contexts": contexts, "responses": responses, "feedback": np.asarray(feedback, np.int32),
            "counts": counts}


# --- training ---------------------------------------------------------------------------------
def make_train_step(graphdef, tx: optax.GradientTransformation, weights: tuple[float, float]):
    """Jitted ``(params, rest, opt_state, ids, labels, key) -> (params, rest, opt_state, loss)``; state donated.

    ``rest`` carries the dialogue network's RNG streams, reseeded from ``key`` every step (as the
    dialogue model's own train step does); the encoder arch has none.
    """

    def step(params, rest, opt_state, ids, labels, key):
        network_key, head_key = jax.random.split(key)
        model = nnx.merge(graphdef, params, rest)
        nnx.reseed(model, default=network_key)

        def loss_fn(model):
            logits = model(ids, deterministic=False, key=head_key)
            return classifier_lib.weighted_bce(logits, labels, weights)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch_size] example indices: seeded permutations, one per epoch, read in sequence."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])[:need]
    return order.reshape(steps, batch_size)


def train_classifier(cfg: classifier_lib.ClassifierConfig, ids: np.ndarray, labels: np.ndarray, *, steps: int,
                     batch_size: int, learning_rate: float, weight_decay: float = 0.01, seed: int = 0,
                     network_params=None, log=None) -> tuple[Any, Any, Any, list[dict]]:
    """(graphdef, params, rest, history) after ``steps`` AdamW steps of the class-weighted loss.

    ``ids`` [N, max_len] rows of ``classifier.encode_rows``; ``labels`` 1 good / 0 bad;
    ``network_params``: the dialogue arch's pretrained network (else random weights).
    Linear warmup (10% of the steps) then linear decay, gradient clipping at 1.
    A pure function of its arguments: same inputs and seed, same parameters.
    """
    labels = np.asarray(labels, np.int32)
    weights = classifier_lib.class_weights(labels)
    graphdef, params, rest = nnx.split(classifier_lib.build(cfg, seed, network_params), nnx.Param, ...)
    tx = step_lib.make_optimizer(learning_rate=learning_rate, warmup_steps=max(1, steps // 10), total_steps=steps,
                                 weight_decay=weight_decay, clip_norm=1.0)
    opt_state = tx.init(params)
    train_step = make_train_step(graphdef, tx, weights)
    order = batch_order(len(labels), batch_size, steps, seed)
    base_key = jax.random.key(seed)
    history, window = [], []
    every = max(1, steps // 10)
    for i in range(steps):
        rows = order[i]
        params, rest, opt_state, loss = train_step(params, rest, opt_state, jnp.asarray(ids[rows]),
                                                   jnp.asarray(labels[rows]), jax.random.fold_in(base_key, i))
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
        if rows.any():  # share of this true class the classifier calls bad: a bad reason's recall
            by_reason[reason] = {"count": int(rows.sum()), "called_bad": float((~predicted_good[rows]).mean())}
    result["called_bad_by_true_reason"] = by_reason
    release_good = feedback[labelled] == schema.POSITIVE
    result["release_labels_accuracy"] = float((release_good == true_good[labelled]).mean()) if labelled.any() else None
    return result


# --- the mode ------------------------------------------------------------------------------------
def classifier_config(config: config_dict.ConfigDict, tokenizer) -> classifier_lib.ClassifierConfig:
    """The encoder arch's config from ``config.judge`` (the dialogue arch's comes from its model)."""
    j = config.judge
    return classifier_lib.ClassifierConfig(
        vocab_size=tokenizer.vocab_size, d_model=j.d_model, n_heads=j.n_heads, ffn_dim=j.ffn_dim,
        n_layers=j.n_layers, max_len=j.max_len, dropout=j.dropout, pad_id=tokenizer.pad_id, sep_id=tokenizer.end_id,
    )


def init_path(config: config_dict.ConfigDict, workdir: str) -> str:
    """``judge.init_from`` as a path: ``workdir`` is the run's workdir ('' when none is configured)."""
    init_from = config.judge.init_from
    return os.path.abspath(workdir) if init_from == "workdir" else os.path.expanduser(init_from)


def load_pretrained(config: config_dict.ConfigDict, workdir: str) -> model_api.BB3Model:
    """The dialogue model ``judge.init_from`` names (read before the data is prepared: fail fast)."""
    path = init_path(config, workdir)
    try:
        model = model_api.load(path, bpe_dir=config.data.tokenizer.bpe_dir, trust_pickle=config.train.trust_pickle)
    except (OSError, ValueError) as error:
        detail = "" if str(error) == path else f" ({error})"
        raise config_lib.ConfigError("judge.init_from", f"no dialogue model to start the judge from at {path}"
                                     f"{detail}; train one first (--mode=train) or set judge.init_from=''") from None
    if model.config.arch != "encoder_decoder":
        raise config_lib.ConfigError("judge.init_from", f"{path} is a {model.config.arch} model; the judge reads "
                                     "an encoder-decoder's encoder (context) and decoder (response)")
    return model


def pretrained_classifier(model: model_api.BB3Model, config: config_dict.ConfigDict, tokenizer):
    """(dialogue arch config, the model's parameters) of a ``load_pretrained`` model, framed as it was
    trained; it must use the run's tokenizer (same fingerprint), which the judge encodes with."""
    try:
        theirs = token_cache.tokenizer_fingerprint(model.tokenizer)
    except (OSError, ValueError) as error:
        raise config_lib.ConfigError("judge.init_from",
                                     f"{model.source}: its tokenizer does not load ({error})") from None
    ours = token_cache.tokenizer_fingerprint(tokenizer)
    if theirs != ours:
        raise config_lib.ConfigError("judge.init_from", f"{model.source}'s tokenizer ({theirs}) is not the run's "
                                     f"({ours})")
    cfg = classifier_lib.ClassifierConfig.for_dialogue(model.config, model.framing(), dropout=config.judge.dropout,
                                                       pad_id=tokenizer.pad_id, sep_id=tokenizer.end_id)
    return cfg, nnx.state(model.network, nnx.Param)


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:5.1f}%"


def format_report(report: dict) -> str:
    t, e = report["train"], report["eval"]
    start = f"from {t['init_from']}" if t.get("init_from") else "from random weights"
    lines = [
        f"train: {t['labelled']} labelled ({t['positive']} good / {t['negative']} bad; "
        f"{t.get('relabelled', 0)} canned ones by their own feedback), "
        f"{t['unlabeled_skipped']} unlabeled skipped; {t['steps']} steps {start} in {t['seconds']:.1f} s "
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
        lines.append("  true reason          count  called bad")
        reasons = g["called_bad_by_true_reason"]
        for reason in synthetic.BAD_REASONS:
            if reason in reasons:
                lines.append(f"  {reason:<19s}{reasons[reason]['count']:>7d}  {_pct(reasons[reason]['called_bad'])}"
                             "  (recall)")
        lines.append(f"  {'all bad':<19s}{g['bad']:>7d}  {_pct(g['recall_bad'])}  (recall; precision of \"bad\" "
                     f"{_pct(g['precision_bad']).strip()})")
        if synthetic.GOOD in reasons:
            lines.append(f"  {'good':<19s}{reasons[synthetic.GOOD]['count']:>7d}  "
                         f"{_pct(reasons[synthetic.GOOD]['called_bad'])}  (false alarms)")
        lines.append(f"  (the release's own labels agree with it on {_pct(g['release_labels_accuracy']).strip()} "
                     "of the labelled messages)")
    return "\n".join(lines)


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    j = config.judge
    pretrained = load_pretrained(config, workdir) if j.init_from else None
    built, tokenizer = dataset.prepare_with_tokenizer(config, workdir)
    spec = dataset.tokenizer_spec(config, built)
    network_params, init_from = None, ""
    if pretrained is not None:
        (cfg, network_params), init_from = pretrained_classifier(pretrained, config, tokenizer), pretrained.source
        del pretrained
    else:
        cfg = classifier_config(config, tokenizer)

    started = time.perf_counter()
    relabel = judge_policy(config)
    train = read_split(built, "train", keep_unlabeled=False, relabel=relabel)
    labels = (train["feedback"] == schema.POSITIVE).astype(np.int32)
    counts = train["counts"]
    print(f"train split: {counts['examples']} bot messages, {counts['positive']} good + {counts['negative']} bad "
          f"labelled ({counts['relabelled']} canned ones by their own feedback); {counts['unlabeled']} unlabeled "
          "skipped")
    ids = judges.encode_rows(cfg, train["contexts"], train["responses"], tokenizer)
    del train
    if cfg.arch == "dialogue":
        print(f"classifier: the dialogue model {init_from} (d_model {cfg.d_model}), rows of {cfg.max_len} ids; "
              f"{j.steps} steps of batch {j.batch_size}")
    else:
        print(f"classifier: {cfg.n_layers} layers, d_model {cfg.d_model}, max_len {cfg.max_len}; "
              f"{j.steps} steps of batch {j.batch_size}")
    data_seconds, started = time.perf_counter() - started, time.perf_counter()
    _, params, _, history = train_classifier(
        cfg, ids, labels, steps=j.steps, batch_size=j.batch_size, learning_rate=j.learning_rate,
        weight_decay=j.weight_decay, seed=config.seed, network_params=network_params, log=print)
    train_seconds = time.perf_counter() - started
    majority_good = int(labels.sum()) * 2 >= len(labels)

    split = config.eval.split
    synthetic_release = dataset.is_synthetic_release(config.data)
    synthetic_release = synthetic_release and config.data.stream.endswith("bot")  # the world judges bot messages
    held = read_split(built, split, keep_unlabeled=synthetic_release, relabel=relabel)
    labelled = held["feedback"] != schema.UNLABELED
    # Judged exactly as a loaded judge judges (same encoding, batching and threshold).
    judge = FeedbackJudge(cfg, params, tokenizer)
    predicted_good = judge.probabilities(held["contexts"], held["responses"], batch_size=PREDICT_BATCH) > 0.5
    true_good = held["feedback"] == schema.POSITIVE
    report: dict[str, Any] = {
        "train": {"examples": counts["examples"], "labelled": counts["positive"] + counts["negative"],
                  "positive": counts["positive"], "negative": counts["negative"], "relabelled": counts["relabelled"],
                  "unlabeled_skipped": counts["unlabeled"], "steps": j.steps, "init_from": init_from,
                  "seconds": train_seconds, "data_seconds": data_seconds,
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
        "learning_rate": j.learning_rate, "weight_decay": j.weight_decay, "init_from": init_from,
        "label_canned": j.label_canned, "threshold": 0.5,
        "stream": config.data.stream, "dataset": built.builder_config.name, "data_dir": str(built.data_dir),
        "policy": config.data.policy.to_dict(),
    }
    directory = os.path.abspath(judges.judge_path(config, workdir))  # judge.path, else <workdir>/judge
    write_judge(directory, params, meta, report, spec)
    print(f"\nfeedback classifier -> {directory}")
    print(format_report(report))
    print(json.dumps({"judge": directory, **report}))
    return report
