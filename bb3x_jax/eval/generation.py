"""What a model *says*: F1 of its generations against the labels, and a judge's verdicts.

Likelihood metrics show what a model prefers among given responses; the
paper's claim is about the responses it produces. So the evaluation
generates for held-out contexts with the configured decoding settings
(``config.generation``: BB3's beam search by default) and reports

- ``f1``: unigram F1 against the label text after ParlAI's normalisation
  (lower case, no punctuation, no articles), averaged over examples;
- ``good_rate`` and ``reasons``: the share of generations a judge calls good,
  and the share of each bad reason, from a batched judge
  ``(contexts, responses) -> verdicts``, each ``"good"`` or a reason (the
  synthetic world's ground truth, ``bb3x_jax.data.synthetic.judge``, or the
  feedback classifier of ``--mode=train_judge``).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from bb3x_jax import decoding
from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data.framing import Framing
from bb3x_jax.data.tokenizers.base import as_text

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """ParlAI's normalisation for F1: lower case, no punctuation, no articles, single spaces."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def f1_score(guess: str, answer: str) -> float:
    """Unigram F1 of two texts after ``normalize_answer`` (0 when either is empty)."""
    guess_tokens, answer_tokens = normalize_answer(guess).split(), normalize_answer(answer).split()
    common = collections.Counter(guess_tokens) & collections.Counter(answer_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(guess_tokens), overlap / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def response_text(tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ids: up to the end token, without padding."""
    ids = [int(t) for t in ids]
    if tokenizer.end_id in ids:
        ids = ids[: ids.index(tokenizer.end_id)]
    return tokenizer.decode([t for t in ids if t != tokenizer.pad_id]).strip()


def generate_texts(network, tokenizer, contexts: Sequence[str], settings: decoding.Settings, *,
                   framing: Framing, batch_size: int, seed: int = 0) -> list[str]:
    """Responses to ``contexts`` (texts in the release's format), framed as training framed
    them, in batches of a fixed shape so that the search compiles once."""
    graphdef, state = nnx.split(network)
    search = decoding.compiled_search(graphdef, settings)
    width = framing.text_truncate  # every framing fits its contexts in text_truncate tokens
    out: list[str] = []
    for start in range(0, len(contexts), batch_size):
        chunk = list(contexts[start : start + batch_size])
        ids = framing_lib.context_ids(chunk, tokenizer, framing)
        rows = decoding.pad_batch(ids, rows=batch_size, width=width, pad_id=tokenizer.pad_id,
                                  filler_id=tokenizer.end_id)
        key = jax.random.fold_in(jax.random.key(seed), start)
        tokens, _ = search(state, rows, key)
        out.extend(response_text(tokenizer, row) for row in np.asarray(tokens)[: len(chunk)])
    return out


def judge_summary(verdicts: Sequence[str], reasons: Sequence[str] = ()) -> dict[str, Any]:
    """Good rate and the share of each bad reason (every listed reason present, 0 if unseen)."""
    n = len(verdicts)
    counts = collections.Counter(verdicts)
    shares = {reason: counts.get(reason, 0) / max(n, 1) for reason in reasons}
    shares.update({v: c / n for v, c in counts.items() if v != "good" and v not in shares})
    return {"judged": n, "good_rate": counts.get("good", 0) / max(n, 1), "reasons": shares}


def evaluate_generations(network, tokenizer, examples: Sequence[dict], settings: decoding.Settings, *,
                         framing: Framing, batch_size: int,
                         judge: Callable[[list[str], list[str]], list[str]] | None, reasons: Sequence[str] = (),
                         seed: int = 0, samples: int = 5) -> dict[str, Any]:
    """F1 and (with a judge) the judge's summary of generations for ``examples``
    (dicts with ``context`` and ``label`` texts); a few samples to read."""
    contexts = [as_text(e["context"]) for e in examples]
    labels = [as_text(e["label"]) for e in examples]
    responses = generate_texts(network, tokenizer, contexts, settings, framing=framing, batch_size=batch_size,
                               seed=seed)
    result: dict[str, Any] = {
        "examples": len(examples),
        "f1": float(np.mean([f1_score(r, l) for r, l in zip(responses, labels)])) if examples else 0.0,
        "mean_words": float(np.mean([len(r.split()) for r in responses])) if examples else 0.0,
        "settings": dataclasses.asdict(settings),
    }
    verdicts = list(judge(contexts, responses)) if judge else None
    if verdicts is not None:
        result.update(judge_summary(verdicts, reasons))
    result["samples"] = [
        {"context": c.split("\n")[-1], "label": l, "response": r, **({"verdict": verdicts[i]} if verdicts else {})}
        for i, (c, l, r) in enumerate(zip(contexts[:samples], labels[:samples], responses[:samples]))
    ]
    result["responses"] = responses
    result["verdicts"] = verdicts
    return result


def format_table(result: dict[str, Any]) -> str:
    """A readable block: F1, good rate, and the bad reasons."""
    lines = [f"generations: {result['examples']}  F1 {result['f1']:.4f}  mean words {result['mean_words']:.1f}"]
    if "good_rate" in result:
        lines.append(f"judge: good {100 * result['good_rate']:.1f}%")
        for reason, share in sorted(result["reasons"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason:<20s} {100 * share:5.1f}%")
    return "\n".join(lines)
