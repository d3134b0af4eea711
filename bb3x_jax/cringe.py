"""The training objective: CRINGE, and the baselines it is compared with.

Why CRINGE. Deployment feedback tells us, per bot turn, "good" (positive, 1),
"bad" (negative, 0) or nothing (unlabeled, -1). Good and unlabeled turns are
ordinary targets for maximum likelihood. A bad turn must be made *less* likely
without teaching the model anything else; pushing its tokens down with an
unbounded penalty (e.g. ``log p``) destroys the model. CRINGE (Adolphs et al.
2022, "The CRINGE Loss: Learning what language not to model") instead asks,
at every token of a bad turn, that *some token the model itself likes* beat
the bad token: a bounded, pairwise, two-way softmax.

The math, per target token t with logits x_t (a [V] vector) and gold token y_t:

* CE_t = logsumexp(x_t) - x_t[y_t] = -log softmax(x_t)[y_t], on positive and
  unlabeled examples (only unlabeled ones if ``train_ce_on_positive=False``).
* On negative examples, CT_t ("contrastive"):

  1. take the k+1 largest logits of x_t;
  2. remove y_t if it is among them, otherwise drop the (k+1)-th, leaving k
     candidates;
  3. sample one candidate j with probability softmax over the k candidates'
     logits (k = 1: deterministic, the best non-gold token);
  4. s+ = x_t[j] (the model's own alternative), s- = x_t[y_t] (the bad token);
     CT_t = -log(e^{s+} / (e^{s+} + e^{s-})) = softplus(s- - s+).

  ``detach_positives`` stops the gradient through s+ (only the bad token is
  pushed down). CT_t is shift invariant, so raw logits and log-probabilities
  give the same value.
* loss = sum_t (CE_t + alpha * CT_t) / N, where N counts the non-pad target
  tokens that received CE or CT ("counted" tokens). Negative tokens are in
  the denominator; tokens of examples that get neither term (positive examples
  when ``train_ce_on_positive=False``, or feedback values outside {1, 0, -1})
  are not. This is the reference's reduction: ParlAI
  ``projects/cringe/cringe_loss.py`` ``compute_loss`` sums every token's
  ``ce + ct_loss_weight * ct`` and divides by ``target_tokens.sum()``, the
  count of ``notnull & (ce_mask | ct_mask)`` tokens. A batch with no counted
  token has loss 0 (the reference would divide 0 by 0).

The reference's quirk and how we handle it. ParlAI computes CT with the same
``CrossEntropyLoss`` whose ``ignore_index`` is the padding id, over the pair
``[s-, s+]`` with target 1 for negative examples and 0 for everything else.
With padding id 0 (ParlAI's null token), the target 0 of a positive example
is the ignore index, so its option ``train_ct_on_positive_examples`` computes
exactly zero CT on positives. We never compute CT on positives, which gives
the same loss value and gradient. One trace of the option survives in the
reference: it adds positive tokens to ``ct_mask`` and therefore to the
denominator; that changes the loss only when ``train_ce_on_positive=False``
as well, a combination this module does not offer. (With a padding id of 1
the reference would instead ignore the negatives' CT; we always compute it.)

Metrics (all float32 scalars), defined as the reference's ``compute_loss``
records them, over counted tokens, with the reference's convention that "pos"
means positive *or unlabeled* (``|feedback| == 1``):

* ``loss``; ``ce_loss`` = mean CE over CE tokens; ``ct_loss`` = mean CT (no
  alpha) over CT tokens;
* ``token_acc``, ``token_acc_pos``, ``token_acc_neg``: argmax == target over
  counted tokens of all / pos / negative examples;
* ``ppl_ce`` = exp(ce_loss); ``ppl_pos`` = exp(sum of CE over pos examples /
  their counted tokens); ``ppl_ct`` = exp(mean CT over negative examples'
  counted tokens);
* counts: ``tokens`` (counted), ``ce_tokens``, ``ct_tokens``, ``pos_tokens``,
  ``neg_tokens`` (counted tokens of pos / negative examples).

An empty set gives mean 0, accuracy 0 and perplexity exp(0) = 1 (where the
reference would drop the metric); the counts say whether a value means
anything, and weighted by them the metrics aggregate exactly over batches.
Nothing here is ever NaN, and gradients stay finite when a batch has no
negatives, no positives or only padding.

Baselines, same reduction and metric keys, selected by ``objective_loss``:
``mle`` (CE on every example), ``mle_positive_only`` (negatives dropped) and
``unlikelihood`` (Welleck et al. 2020 token-level unlikelihood on negatives,
UL_t = -log(1 - p(y_t)), reported under the ``ct_*`` keys: the term on
negative examples). Everything is plain ``jnp``: jit-able, differentiable
w.r.t. the logits, shape-static, and fine with sharded inputs. Log-softmax
and the losses are computed in float32 whatever the logits' dtype.

The anchor (``anchor_kl``, weighted by ``train.kl_anchor`` in the train step):
an optional KL(anchor || model) (``forward``) or KL(model || anchor)
(``reverse``) per non-pad target token towards the model a run started from,
the bad token of negative examples left out of both sides.

Shapes: logits [B, T, V] already aligned with targets [B, T] (position t
predicts ``targets[:, t]``), ``pad_id`` marks padding, feedback [B].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bb3x_jax.data.schema import NEGATIVE, POSITIVE, UNLABELED

OBJECTIVES = ("cringe", "mle", "mle_positive_only", "unlikelihood")

METRIC_KEYS = (
    "loss",
    "ce_loss",
    "ct_loss",
    "token_acc",
    "token_acc_pos",
    "token_acc_neg",
    "ppl_ce",
    "ppl_pos",
    "ppl_ct",
    "tokens",
    "ce_tokens",
    "ct_tokens",
    "pos_tokens",
    "neg_tokens",
)

# Floor on 1 - p(y) in the unlikelihood term, as ParlAI's
# projects/dialogue_unlikelihood uses without fp16 (we compute in float32).
UNLIKELIHOOD_MIN_ONE_MINUS_P = 1e-20

Array = jax.Array


def _check_shapes(logits: Array, targets: Array, feedback: Array) -> None:
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or feedback.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [B, T, V], targets [B, T], feedback [B]; got "
            f"{logits.shape}, {targets.shape}, {feedback.shape}"
        )


def _token_ce(logits: Array, targets: Array) -> tuple[Array, Array]:
    """Per-token CE in float32, and the float32 logit of the target token."""
    x = logits.astype(jnp.float32)
    gold = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(x, axis=-1) - gold, gold


def cringe_candidates(logits: Array, targets: Array, rng: Array | None = None, *, k: int = 1) -> Array:
    """Token ids [B, T] of the sampled CRINGE candidate ("s+") at every position.

    Among the top-(k+1) logits, the gold token is removed (or, if absent, the
    (k+1)-th); one of the remaining k is drawn with softmax over their logits.
    k = 1 needs no ``rng``: the candidate is the best non-gold token.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k + 1 > logits.shape[-1]:
        raise ValueError(f"k + 1 = {k + 1} exceeds the vocabulary size {logits.shape[-1]}")
    values, indices = lax.top_k(lax.stop_gradient(logits), k + 1)  # [B, T, k+1], sorted
    is_gold = indices == targets[..., None]
    gold_in_top = jnp.any(is_gold, axis=-1, keepdims=True)
    is_last = jnp.arange(k + 1) == k
    dropped = is_gold | (is_last & ~gold_in_top)  # exactly one slot per position
    if k == 1:
        slot = jnp.argmin(dropped, axis=-1)  # the slot that is not dropped
    else:
        if rng is None:
            raise ValueError("cringe with k > 1 samples its candidate: pass rng")
        cand_logits = jnp.where(dropped, -jnp.inf, values.astype(jnp.float32))
        slot = jax.random.categorical(rng, cand_logits, axis=-1)
    return jnp.take_along_axis(indices, slot[..., None], axis=-1)[..., 0]


def _reduce(
    logits: Array,
    targets: Array,
    feedback: Array,
    *,
    ce: Array,
    ce_examples: Array,
    neg: Array,
    neg_examples: Array,
    alpha: float,
    pad_id: int,
) -> tuple[Array, dict[str, Array]]:
    """sum(CE + alpha * NEG) / counted tokens, and the metrics (see module docstring)."""
    f32 = jnp.float32
    nonpad = targets != pad_id
    ce_mask = nonpad & ce_examples[:, None]
    neg_mask = nonpad & neg_examples[:, None]
    counted = ce_mask | neg_mask
    pos_mask = counted & ((feedback == POSITIVE) | (feedback == UNLABELED))[:, None]
    negfb_mask = counted & (feedback == NEGATIVE)[:, None]

    def total(values: Array, mask: Array) -> Array:
        # where, not multiply: a masked-out inf must not become NaN.
        return jnp.sum(jnp.where(mask, values, 0.0), dtype=f32)

    def count(mask: Array) -> Array:
        return jnp.sum(mask, dtype=f32)

    def mean(values: Array, mask: Array) -> Array:
        return total(values, mask) / jnp.maximum(count(mask), 1.0)

    ce_sum, neg_sum = total(ce, ce_mask), total(neg, neg_mask)
    loss = (ce_sum + alpha * neg_sum) / jnp.maximum(count(counted), 1.0)

    correct = (jnp.argmax(logits, axis=-1) == targets).astype(f32)
    ce_loss, ct_loss = mean(ce, ce_mask), mean(neg, neg_mask)
    metrics = {
        "loss": loss,
        "ce_loss": ce_loss,
        "ct_loss": ct_loss,
        "token_acc": mean(correct, counted),
        "token_acc_pos": mean(correct, pos_mask),
        "token_acc_neg": mean(correct, negfb_mask),
        "ppl_ce": jnp.exp(ce_loss),
        "ppl_pos": jnp.exp(total(ce, ce_mask & pos_mask) / jnp.maximum(count(pos_mask), 1.0)),
        "ppl_ct": jnp.exp(total(neg, neg_mask & negfb_mask) / jnp.maximum(count(negfb_mask), 1.0)),
        "tokens": count(counted),
        "ce_tokens": count(ce_mask),
        "ct_tokens": count(neg_mask),
        "pos_tokens": count(pos_mask),
        "neg_tokens": count(negfb_mask),
    }
    return loss, {key: jnp.asarray(value, f32) for key, value in metrics.items()}


def _ce_examples(feedback: Array, train_ce_on_positive: bool) -> Array:
    if train_ce_on_positive:
        return (feedback == POSITIVE) | (feedback == UNLABELED)
    return feedback == UNLABELED


def cringe_loss(
    logits: Array,
    targets: Array,
    feedback: Array,
    rng: Array | None = None,
    *,
    alpha: float = 1.0,
    k: int = 1,
    pad_id: int = 0,
    detach_positives: bool = False,
    train_ce_on_positive: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """CRINGE: CE on positive/unlabeled tokens + alpha * CT on negative tokens, per counted token.

    ``rng`` is only needed for k > 1. Returns (loss, metrics); see the module docstring.
    """
    _check_shapes(logits, targets, feedback)
    ce, gold = _token_ce(logits, targets)
    candidate = cringe_candidates(logits, targets, rng, k=k)
    s_pos = jnp.take_along_axis(logits.astype(jnp.float32), candidate[..., None], axis=-1)[..., 0]
    if detach_positives:
        s_pos = lax.stop_gradient(s_pos)
    ct = jax.nn.softplus(gold - s_pos)
    return _reduce(
        logits, targets, feedback,
        ce=ce, ce_examples=_ce_examples(feedback, train_ce_on_positive),
        neg=ct, neg_examples=feedback == NEGATIVE,
        alpha=alpha, pad_id=pad_id,
    )  # fmt: skip


def mle_loss(logits: Array, targets: Array, feedback: Array, *, pad_id: int = 0) -> tuple[Array, dict[str, Array]]:
    """Maximum likelihood on every example, feedback ignored: mean CE over non-pad tokens."""
    _check_shapes(logits, targets, feedback)
    ce, _ = _token_ce(logits, targets)
    everyone, nobody = jnp.ones(feedback.shape, bool), jnp.zeros(feedback.shape, bool)
    return _reduce(
        logits, targets, feedback,
        ce=ce, ce_examples=everyone, neg=jnp.zeros_like(ce), neg_examples=nobody,
        alpha=0.0, pad_id=pad_id,
    )  # fmt: skip


def mle_positive_only_loss(
    logits: Array, targets: Array, feedback: Array, *, pad_id: int = 0, train_ce_on_positive: bool = True
) -> tuple[Array, dict[str, Array]]:
    """Maximum likelihood on positive and unlabeled examples; negative examples are dropped entirely."""
    _check_shapes(logits, targets, feedback)
    ce, _ = _token_ce(logits, targets)
    return _reduce(
        logits, targets, feedback,
        ce=ce, ce_examples=_ce_examples(feedback, train_ce_on_positive),
        neg=jnp.zeros_like(ce), neg_examples=jnp.zeros(feedback.shape, bool),
        alpha=0.0, pad_id=pad_id,
    )  # fmt: skip


def unlikelihood_loss(
    logits: Array,
    targets: Array,
    feedback: Array,
    *,
    alpha: float = 1.0,
    pad_id: int = 0,
    train_ce_on_positive: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """CE on positive/unlabeled tokens + alpha * (-log(1 - p(y_t))) on negative tokens, per counted token."""
    _check_shapes(logits, targets, feedback)
    ce, _ = _token_ce(logits, targets)
    one_minus_p = -jnp.expm1(-ce)  # 1 - p(y), accurate when p is small
    ul = -jnp.log(jnp.maximum(one_minus_p, UNLIKELIHOOD_MIN_ONE_MINUS_P))
    return _reduce(
        logits, targets, feedback,
        ce=ce, ce_examples=_ce_examples(feedback, train_ce_on_positive),
        neg=ul, neg_examples=feedback == NEGATIVE,
        alpha=alpha, pad_id=pad_id,
    )  # fmt: skip


# Where anchor_kl removes the bad token: a finite stand-in for -inf, so that no NaN can arise.
_REMOVED_LOGIT = -1e30


ANCHOR_DIRECTIONS = ("forward", "reverse")


def anchor_kl(
    logits: Array, anchor_logits: Array, targets: Array, feedback: Array, *, pad_id: int = 0,
    direction: str = "forward",
) -> tuple[Array, Array]:
    """Per-token KL [B, T] between the model and an anchor, and the tokens it covers (every non-pad
    target token): ``forward`` KL(anchor || model), ``reverse`` KL(model || anchor).

    Why: the negative terms (CRINGE's CT, unlikelihood) push the bad token down,
    and softmax spreads its probability over the whole vocabulary, tail
    included; sampling then draws words that a beam never would. This term keeps
    each next-token distribution near the ``anchor`` model's (the model the run
    started from, e.g. the previous iteration). On negative examples the bad
    target token is removed from both distributions (each renormalised over the
    rest), so the anchor never holds up what the negative term pushes down; it
    only decides where the freed probability goes. No gradient reaches the
    anchor's logits. ``reverse`` charges the model for every token it makes
    likelier than the anchor did, by the log of the ratio: probability moved
    to tokens the anchor all but ruled out costs far more than under
    ``forward``, which only sees what leaves the anchor's likely tokens.
    """
    if direction not in ANCHOR_DIRECTIONS:
        raise ValueError(f"unknown anchor direction {direction!r}; valid: {', '.join(ANCHOR_DIRECTIONS)}")
    _check_shapes(logits, targets, feedback)
    if anchor_logits.shape != logits.shape:
        raise ValueError(f"anchor logits {anchor_logits.shape} differ from the logits {logits.shape}")
    covered = targets != pad_id
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    removed = ((feedback == NEGATIVE)[:, None] & covered)[..., None] & (vocab == targets[..., None].astype(jnp.int32))
    x = jnp.where(removed, _REMOVED_LOGIT, logits.astype(jnp.float32))
    r = jnp.where(removed, _REMOVED_LOGIT, lax.stop_gradient(anchor_logits).astype(jnp.float32))
    log_q, log_r = jax.nn.log_softmax(x, axis=-1), jax.nn.log_softmax(r, axis=-1)
    if direction == "reverse":
        log_r, log_q = log_q, log_r
    kl = jnp.sum(jnp.where(removed, 0.0, jnp.exp(log_r) * (log_r - log_q)), axis=-1)
    return jnp.where(covered, kl, 0.0), covered


# Keyword options each objective takes; objective_loss accepts their union and
# passes each objective only its own (so one config can switch objectives).
OBJECTIVE_OPTIONS: dict[str, tuple[str, ...]] = {
    "cringe": ("alpha", "k", "pad_id", "detach_positives", "train_ce_on_positive"),
    "mle": ("pad_id",),
    "mle_positive_only": ("pad_id", "train_ce_on_positive"),
    "unlikelihood": ("alpha", "pad_id", "train_ce_on_positive"),
}
KNOWN_OPTIONS = frozenset(o for options in OBJECTIVE_OPTIONS.values() for o in options)


def objective_loss(
    name: str, logits: Array, targets: Array, feedback: Array, rng: Array | None = None, **kw: Any
) -> tuple[Array, dict[str, Array]]:
    """The objective ``name`` (one of OBJECTIVES): (loss, metrics) with the keys METRIC_KEYS.

    Options an objective does not use (e.g. ``k`` for ``mle``) are ignored;
    unknown option names raise TypeError.
    """
    if name not in OBJECTIVE_OPTIONS:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    unknown = sorted(set(kw) - KNOWN_OPTIONS)
    if unknown:
        raise TypeError(f"unknown objective option(s) {unknown}; known: {sorted(KNOWN_OPTIONS)}")
    options = {key: value for key, value in kw.items() if key in OBJECTIVE_OPTIONS[name]}
    if name == "cringe":
        return cringe_loss(logits, targets, feedback, rng, **options)
    if name == "mle":
        return mle_loss(logits, targets, feedback, **options)
    if name == "mle_positive_only":
        return mle_positive_only_loss(logits, targets, feedback, **options)
    return unlikelihood_loss(logits, targets, feedback, **options)
