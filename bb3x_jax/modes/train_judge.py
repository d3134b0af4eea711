"""``--mode=train_judge``: a feedback classifier (good / bad bot response) and its loader.

Iterative CRINGE labels a model's own generations with a judge. On the
synthetic release that is the world's rule (``synthetic.judge``); on real data
it is this classifier, trained on the release's labelled bot messages (the
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

It writes ``<workdir>/judge/`` (or ``judge.path``) atomically (a temporary folder renamed into
place, so a half-written judge is never loaded): ``params.npz`` (parameters by
path), ``meta.json`` (classifier config, tokenizer source and fingerprint,
training settings), ``report.json`` (the metrics) and ``tokenizer/`` (a copy of
the tokenizer's files, ``bb3x_jax.data.tokenizers.files``; judges written
before that kept a sentencepiece ``tokenizer.model``, still read).

``load_judge(directory)`` gives a ``FeedbackJudge``: ``verdicts(contexts,
responses)`` -> "good" / "bad" per pair (fixed batch shape, compiled once) and
``judge(context, response)``; its only bad reason is "bad".
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

from bb3x_jax.data import schema
from bb3x_jax.data.tokenizers import base as tokenizer_lib
from bb3x_jax.data.tokenizers import files as tokenizer_files
from bb3x_jax.model import classifier as classifier_lib

FORMAT = "bb3x_jax.judge/1"
JUDGE_DIR = "judge"
PARAMS_FILE = "params.npz"
META_FILE = "meta.json"
REPORT_FILE = "report.json"
TOKENIZER_BUNDLE = "tokenizer"
TOKENIZER_COPY = "tokenizer.model"  # what judges written before bundles kept
GOOD, BAD = "good", "bad"
BAD_REASONS = (BAD,)
PREDICT_BATCH = 256  # rows per compiled prediction call during evaluation


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
            contexts.append(tokenizer_lib._as_text(record["context"]))
            responses.append(tokenizer_lib._as_text(record["label"]))
            feedback.append(f)
    return {"contexts": contexts, "responses": responses, "feedback": np.asarray(feedback, np.int32),
            "counts": counts}


def encode(contexts: Sequence[str], responses: Sequence[str], tokenizer, max_len: int,
           chunk: int = 8192) -> np.ndarray:
    """``classifier.encode_pairs`` in chunks (bounded memory on large splits)."""
    parts = [classifier_lib.encode_pairs(contexts[i : i + chunk], responses[i : i + chunk], tokenizer, max_len)
             for i in range(0, len(contexts), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, max_len), np.int32)


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
    from bb3x_jax.train import step as step_lib

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
def _padding_rows(n: int, cfg: classifier_lib.ClassifierConfig) -> np.ndarray:
    """Filler rows of a fixed-shape batch: a lone separator (never an all-pad row)."""
    rows = np.full((n, cfg.max_len), cfg.pad_id, np.int32)
    rows[:, -1] = cfg.sep_id
    return rows


def batched_probabilities(logits_fn, cfg: classifier_lib.ClassifierConfig, ids: np.ndarray,
                          batch_size: int) -> np.ndarray:
    """P(good) for every row, through ``logits_fn`` on [batch_size, max_len] batches only."""
    out = np.zeros(len(ids), np.float32)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, _padding_rows(batch_size - len(chunk), cfg)])
        logits = np.asarray(logits_fn(jnp.asarray(chunk)))
        n = min(batch_size, len(ids) - start)
        out[start : start + n] = 1.0 / (1.0 + np.exp(-logits[:n].astype(np.float64)))
    return out


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
    from bb3x_jax.data import synthetic

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


# --- the judge on disk ---------------------------------------------------------------------------
class JudgeLoadError(ValueError):
    """A judge directory that exists but cannot be used (corrupt, incomplete, mismatched)."""


def write_judge(directory: str, params, meta: dict, report: dict, tokenizer_spec) -> None:
    """Writes the judge into a temporary sibling folder, then renames it to ``directory``.

    A reader sees the old judge, no judge (for the instant between the two
    renames when one existed), or the whole new one, never a partial one.
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        np.savez(os.path.join(tmp, PARAMS_FILE), **classifier_lib.flat_params(params))
        tokenizer_files.save_bundle(tokenizer_spec, os.path.join(tmp, TOKENIZER_BUNDLE))
        for name, content in ((META_FILE, meta), (REPORT_FILE, report)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=1)
        for folder, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if os.path.exists(directory):
            old = tmp + ".old"
            os.rename(directory, old)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class FeedbackJudge:
    """A trained feedback classifier as a judge: "good" or "bad" per (context, response)."""

    bad_reasons = BAD_REASONS

    def __init__(self, cfg: classifier_lib.ClassifierConfig, params, tokenizer, meta: dict | None = None,
                 directory: str = ""):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.meta = meta or {}
        self.directory = directory
        model = nnx.eval_shape(lambda: classifier_lib._construct(cfg, 0))
        self._graphdef, _, self._rest = nnx.split(model, nnx.Param, ...)
        self._params = params
        self._logits = jax.jit(functools.partial(classifier_lib.logits_fn, self._graphdef))

    def probabilities(self, contexts: Sequence[str | bytes], responses: Sequence[str | bytes],
                      batch_size: int = 64) -> np.ndarray:
        """P(good) per pair; batches of exactly ``batch_size`` rows (one compilation per batch size)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ids = encode(list(contexts), list(responses), self.tokenizer, self.cfg.max_len)
        return batched_probabilities(lambda x: self._logits(self._params, self._rest, x), self.cfg, ids, batch_size)

    def verdicts(self, contexts: Sequence[str | bytes], responses: Sequence[str | bytes],
                 batch_size: int = 64) -> list[str]:
        """"good" or "bad" per (context, response); context = previous turns joined with "\\n"."""
        return [GOOD if p > 0.5 else BAD for p in self.probabilities(contexts, responses, batch_size)]

    def __call__(self, context: str | bytes, response: str | bytes) -> str:
        return self.verdicts([context], [response])[0]


def load_judge(directory: str) -> FeedbackJudge:
    """The judge ``--mode=train_judge`` wrote to ``directory``; errors name the path and what is wrong."""
    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no feedback classifier at {directory}: train one with "
                                f"`python main.py --mode=train_judge` (it writes <workdir>/{JUDGE_DIR})")
    meta_path = os.path.join(directory, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise JudgeLoadError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        cfg = classifier_lib.ClassifierConfig.from_dict(meta["classifier"])
        fingerprint = meta["tokenizer"]["fingerprint"]
        recorded = meta["tokenizer"].get("path", "")
    except FileNotFoundError:
        raise JudgeLoadError(f"{directory} is not a complete feedback classifier: {META_FILE} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, JudgeLoadError):
            raise
        raise JudgeLoadError(f"{meta_path} is unreadable or incomplete: {error!r}") from None
    tokenizer = None
    from bb3x_jax.data import token_cache

    bundle = os.path.join(directory, TOKENIZER_BUNDLE)
    if os.path.isdir(bundle):
        try:
            tokenizer = tokenizer_files.load(tokenizer_files.read_bundle(bundle))
        except (OSError, RuntimeError, ValueError) as error:
            raise JudgeLoadError(f"{bundle}: the judge's tokenizer does not load ({error})") from None
        if token_cache.tokenizer_fingerprint(tokenizer) != fingerprint:
            raise JudgeLoadError(f"{bundle}: tokenizer fingerprint differs from {meta_path}'s {fingerprint}")
    for path in (recorded, os.path.join(directory, TOKENIZER_COPY)) if tokenizer is None else ():
        if not path or not os.path.isfile(path):  # judges written before bundles: a sentencepiece copy
            continue
        try:
            candidate = tokenizer_lib.SentencePieceTokenizer.load(path)
        except (OSError, RuntimeError, ValueError) as error:
            raise JudgeLoadError(f"{path}: not a usable sentencepiece model ({error})") from None
        if token_cache.tokenizer_fingerprint(candidate) == fingerprint:
            tokenizer = candidate
            break
    if tokenizer is None:
        raise JudgeLoadError(f"{directory}: no tokenizer with fingerprint {fingerprint} (looked at {bundle}, "
                             f"{recorded} and {os.path.join(directory, TOKENIZER_COPY)}); the judge was trained "
                             "with another one")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise JudgeLoadError(f"{directory}: tokenizer has {tokenizer.vocab_size} pieces, the classifier "
                             f"{cfg.vocab_size}")
    params_path = os.path.join(directory, PARAMS_FILE)
    try:
        with np.load(params_path) as arrays:
            flat = {k: arrays[k] for k in arrays.files}
        params = classifier_lib.unflat_params(classifier_lib.abstract_params(cfg), flat, where=params_path)
    except FileNotFoundError:
        raise JudgeLoadError(f"{directory} is not a complete feedback classifier: {PARAMS_FILE} is missing") from None
    except (OSError, ValueError, EOFError) as error:
        raise JudgeLoadError(f"{params_path} is unreadable: {error}") from None
    return FeedbackJudge(cfg, params, tokenizer, meta, directory)


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
    from bb3x_jax.data import token_cache
    from bb3x_jax.train import inputs as dataset

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
    from bb3x_jax.modes.eval import judge_path

    directory = os.path.abspath(judge_path(config, workdir))  # judge.path, else <workdir>/judge
    write_judge(directory, params, meta, report, spec)
    print(f"\nfeedback classifier -> {directory}")
    print(format_report(report))
    print(json.dumps({"judge": directory, **report}))
    return report
