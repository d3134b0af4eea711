"""Judges: what labels a response to a context "good" or bad, behind one interface.

Two kinds exist. The synthetic world's ground truth (``synthetic.judge``) knows
why a response is bad (its reasons are the release's dislike reasons); the
learned feedback classifier (``--mode=train_judge``, ``model/classifier.py``)
is trained on a release's own likes and dislikes and says "good" or "bad".
Evaluation grades generations with a judge and iterative CRINGE labels its new
training data with one; both take a ``Judge`` from ``make_judge``.

A learned judge lives in a folder written atomically (a temporary folder
renamed into place, so a half-written judge is never loaded): ``params.npz``
(parameters by path), ``meta.json`` (classifier config, tokenizer source and
fingerprint, training settings), ``report.json`` (its metrics) and
``tokenizer/`` (a copy of the tokenizer's files,
``bb3x_jax.data.tokenizers.files``; older judges kept a sentencepiece
``tokenizer.model``, still read).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from bb3x_jax.data import synthetic, token_cache
from bb3x_jax.data.tokenizers import base as tokenizer_lib
from bb3x_jax.data.tokenizers import files as tokenizer_files
from bb3x_jax.errors import UserError
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


class Judge(Protocol):
    """Labels (context, response) pairs: "good" or one of ``bad_reasons`` each."""

    name: str  # what the judge is, as recorded beside what it labelled
    bad_reasons: tuple[str, ...]

    def verdicts(self, contexts: Sequence[str], responses: Sequence[str]) -> list[str]: ...


class GroundTruthJudge:
    """The synthetic world's rule: a response's true quality, with the release's bad reasons."""

    name = "synthetic world ground truth"
    bad_reasons = synthetic.BAD_REASONS

    def verdicts(self, contexts: Sequence[str], responses: Sequence[str]) -> list[str]:
        return [synthetic.judge(c, r) for c, r in zip(contexts, responses)]


def judge_path(config: config_dict.ConfigDict, workdir: str) -> str:
    """Where the feedback classifier lives: ``judge.path``, else ``<workdir>/judge``."""
    return os.path.expanduser(config.judge.path) if config.judge.path else os.path.join(workdir, JUDGE_DIR)


def make_judge(config: config_dict.ConfigDict, workdir: str, which: str | None = None) -> Judge | None:
    """The judge ``which`` (default ``eval.judge``) names, or None for ``none``.

    ``synthetic`` is the synthetic world's ground truth, ``classifier`` the
    feedback classifier of ``--mode=train_judge`` (verdicts "good" / "bad"),
    ``auto`` the first on the synthetic release and otherwise the classifier
    when one was trained, ``none`` no judge.
    """
    which = config.eval.judge if which is None else which
    if which == "auto":
        if synthetic.is_release(config.data.manual_dir):
            which = "synthetic"
        else:
            which = "classifier" if os.path.exists(os.path.join(judge_path(config, workdir), META_FILE)) else "none"
    if which == "none":
        return None
    if which == "synthetic":
        return GroundTruthJudge()
    path = judge_path(config, workdir)
    judge = load_judge(path)
    # The path as configured and the weights' digest, recorded with what it labelled: a split
    # labelled by a judge since retrained is refused instead of reused.
    judge.name = f"feedback classifier {path} (weights {judge.digest[:12]})"
    return judge


def encode(contexts: Sequence[str], responses: Sequence[str], tokenizer, max_len: int,
           chunk: int = 8192) -> np.ndarray:
    """``classifier.encode_pairs`` (the encoder arch's rows) in chunks (bounded memory on large splits)."""
    parts = [classifier_lib.encode_pairs(contexts[i : i + chunk], responses[i : i + chunk], tokenizer, max_len)
             for i in range(0, len(contexts), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, max_len), np.int32)


def encode_rows(cfg: classifier_lib.ClassifierConfig, contexts: Sequence[str], responses: Sequence[str], tokenizer,
                chunk: int = 8192) -> np.ndarray:
    """``classifier.encode_rows`` (either arch) in chunks."""
    parts = [classifier_lib.encode_rows(cfg, contexts[i : i + chunk], responses[i : i + chunk], tokenizer)
             for i in range(0, len(contexts), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, cfg.max_len), np.int32)


def batched_probabilities(logits_fn, cfg: classifier_lib.ClassifierConfig, ids: np.ndarray,
                          batch_size: int) -> np.ndarray:
    """P(good) for every row, through ``logits_fn`` on [batch_size, max_len] batches only."""
    out = np.zeros(len(ids), np.float32)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, classifier_lib.padding_rows(cfg, batch_size - len(chunk))])
        logits = np.asarray(logits_fn(jnp.asarray(chunk)))
        n = min(batch_size, len(ids) - start)
        out[start : start + n] = 1.0 / (1.0 + np.exp(-logits[:n].astype(np.float64)))
    return out


class JudgeLoadError(UserError, ValueError):
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
                 directory: str = "", digest: str = ""):
        self.cfg = cfg
        self.digest = digest  # sha256 of the weights file it was loaded from
        self.tokenizer = tokenizer
        self.meta = meta or {}
        self.directory = directory
        self.name = f"feedback classifier {directory}"
        model = nnx.eval_shape(lambda: classifier_lib.construct(cfg, 0))
        self._graphdef, _, _ = nnx.split(model, nnx.Param, ...)
        self._rest = classifier_lib.inference_rest(cfg)  # the dialogue network's RNG streams (unused: no dropout)
        self._params = params
        self._logits = jax.jit(functools.partial(classifier_lib.logits_fn, self._graphdef))

    def probabilities(self, contexts: Sequence[str | bytes], responses: Sequence[str | bytes],
                      batch_size: int = 64) -> np.ndarray:
        """P(good) per pair; batches of exactly ``batch_size`` rows (one compilation per batch size)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        ids = encode_rows(self.cfg, list(contexts), list(responses), self.tokenizer)
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
        with open(params_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        with np.load(params_path) as arrays:
            flat = {k: arrays[k] for k in arrays.files}
        params = classifier_lib.unflat_params(classifier_lib.abstract_params(cfg), flat, where=params_path)
    except FileNotFoundError:
        raise JudgeLoadError(f"{directory} is not a complete feedback classifier: {PARAMS_FILE} is missing") from None
    except (OSError, ValueError, EOFError) as error:
        raise JudgeLoadError(f"{params_path} is unreadable: {error}") from None
    return FeedbackJudge(cfg, params, tokenizer, meta, directory, digest)
