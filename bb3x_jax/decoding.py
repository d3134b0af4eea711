"""Decoding: greedy, beam search and top-k / nucleus sampling over the KV cache.

Pure functions of (graphdef, state, context ids, settings): the whole search
is one jitted program, a ``lax.while_loop`` whose carry holds the cache, the
hypotheses and their scores, so a batch decodes without returning to Python
between tokens. The same code serves the encoder-decoder models (the context is
encoded once; the decoder starts from ``decoder_start``) and the decoder-only
ones (the context is the prompt, padded on the left).

Semantics follow transformers' ``generate`` (tested token for token on the
same weights): greedy takes the argmax; beam search keeps ``2 * beam_size``
candidates per step, moves those ending in the end token (or reaching
``max_len``) to a list of finished hypotheses scored ``sum log p / len **
length_penalty``, continues the best ``beam_size`` others, and stops when no
running beam can beat the finished ones (transformers' default heuristic,
``early_stopping=False``). BB3's own settings add a minimum length (the end
token is banned before it) and n-gram blocking of the hypothesis and of the
context (ParlAI's ``beam_block_ngram`` / ``beam_context_block_ngram``: a token
that would complete an n-gram already present is banned). ParlAI scores
finished beams with its own length penalty; ours is transformers' exponent.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

METHODS = ("greedy", "beam", "sample")
_NEG = -1.0e9  # "impossible" score offset of transformers' beam search (finite: keeps arithmetic exact)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to generate; hashable, so each distinct setting compiles once."""

    method: str = "greedy"
    max_len: int = 32
    min_len: int = 0
    beam_size: int = 1
    block_ngram: int = 0
    context_block_ngram: int = 0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    length_penalty: float = 1.0

    def __post_init__(self):
        checks = {
            "method": (self.method in METHODS, f"one of {METHODS}"),
            "max_len": (self.max_len >= 1, "at least 1"),
            "min_len": (0 <= self.min_len <= self.max_len, "between 0 and max_len"),
            "beam_size": (self.beam_size >= 1 and (self.method == "beam" or self.beam_size == 1),
                          "at least 1, and 1 unless method='beam'"),
            "block_ngram": (self.block_ngram >= 0, "0 (off) or an n-gram size"),
            "context_block_ngram": (self.context_block_ngram >= 0, "0 (off) or an n-gram size"),
            "top_k": (self.top_k >= 0, "0 (off) or positive"),
            "top_p": (0.0 < self.top_p <= 1.0, "in (0, 1]"),
            "temperature": (self.temperature > 0.0, "positive"),
        }
        bad = [f"{name} must be {rule} (got {getattr(self, name)!r})" for name, (ok, rule) in checks.items() if not ok]
        if bad:
            raise ValueError("invalid generation settings: " + "; ".join(bad))


# BB3's generation settings (ParlAI zoo bb3 opts: beam 10, min length 20,
# 3-gram blocking of the hypothesis and of the context).
BB3_BEAM = dict(method="beam", beam_size=10, min_len=20, block_ngram=3, context_block_ngram=3)


def check_ids(ids, vocab_size: int, where: str = "context_ids") -> None:
    """Raises ValueError naming ``where`` and the first id outside ``[0, vocab_size)``.

    An id the embedding table does not hold would otherwise be clamped inside
    the jitted search and decode to a response as if it were valid. ``ids``:
    an array or (nested) lists of integers.
    """
    array = np.asarray(ids) if isinstance(ids, np.ndarray) else None
    if array is not None and np.issubdtype(array.dtype, np.integer):
        bad = (array < 0) | (array >= vocab_size)
        if bad.any():
            raise ValueError(f"{where}: id {int(array[bad][0])} is outside the vocabulary [0, {vocab_size})")
        return
    for value in (array.ravel().tolist() if array is not None else _flat(ids)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{where}: id {value!r} is not an integer")
        if not 0 <= value < vocab_size:
            raise ValueError(f"{where}: id {int(value)} is outside the vocabulary [0, {vocab_size})")


def _flat(ids):
    for value in ids:
        if isinstance(value, (list, tuple, np.ndarray)):
            yield from _flat(value)
        else:
            yield value


def pad_batch(contexts, *, rows: int, width: int, pad_id: int, filler_id: int | None = None) -> np.ndarray:
    """Context ids (a list of id lists, or a padded 2-D array) as a [rows, width] int32 batch.

    Inference compiles once per shape, so callers keep ``rows`` and ``width``
    fixed and fill the batch; rows beyond ``contexts`` hold ``filler_id`` at
    position 0 when given (a search over an all-pad row is ill-defined).
    """
    batch = np.full((rows, width), pad_id, np.int32)
    for i, ids in enumerate(contexts):
        batch[i, : len(ids)] = ids
    if filler_id is not None:
        batch[len(contexts):, 0] = filler_id
    return batch


def generate(network, context_ids, settings: Settings, seed: int = 0) -> np.ndarray:
    """Generated ids [batch, <= max_len] (no context, no start token), padded after the end token.

    ``context_ids`` [batch, S] are right-padded with the pad id, as everywhere in
    this project.
    """
    graphdef, state = nnx.split(network)
    tokens, _ = compiled_search(graphdef, settings)(state, jnp.asarray(context_ids, jnp.int32), jax.random.key(seed))
    tokens = np.asarray(tokens)
    used = np.flatnonzero((tokens != network.cfg.pad_id).any(axis=0))
    return tokens[:, : (used[-1] + 1 if used.size else 1)]


@functools.lru_cache(maxsize=32)
def compiled_search(graphdef, settings: Settings):
    """``search`` jitted for one model structure and setting: (state, context_ids, key) -> (tokens, scores)."""
    return jax.jit(functools.partial(search, graphdef, settings=settings))


def search(graphdef, state, context_ids, key, *, settings: Settings):
    """(tokens [B, max_len] padded after the end token, scores [B]) for one setting (traceable).

    Scores are the sum of the chosen tokens' log-probabilities (after the
    constraints); for beam search, divided by ``length ** length_penalty``.
    """
    network = nnx.merge(graphdef, state)
    if settings.method == "beam":
        return _beam_search(network, context_ids, settings)
    return _greedy_or_sample(network, context_ids, settings, key)


# ---------------------------------------------------------------- the prompt


def _prefill(network, context_ids, max_len: int, copies: int = 1):
    """Logits [N, V] for the first generated token, the cache (its encoder keys/values
    apart, see ``_loop_cache``), those keys/values, and the context as the decoder saw
    it (for context blocking); every row repeated ``copies`` times.

    The prompt is computed once per context and then copied: the beams of one
    example share it, so encoding every beam's copy would repeat the largest
    part of a short search's work ``copies`` times.
    """
    logits, cache, context = _prompt(network, context_ids, max_len)
    if copies > 1:
        logits, context = jnp.repeat(logits, copies, axis=0), jnp.repeat(context, copies, axis=0)
        cache = _repeat_cache(cache, copies, network.cfg.scan_layers)
    cache, cross = _loop_cache(cache, network.cfg.scan_layers)
    return logits, cache, cross, context


def _prompt(network, context_ids, max_len: int):
    """``_prefill`` for one copy of each row, with the cache as the model holds it."""
    cfg = network.cfg
    n = context_ids.shape[0]
    if cfg.arch == "encoder_decoder":
        memory, memory_mask = network.encode(context_ids)
        prompt = jnp.broadcast_to(jnp.asarray(cfg.decoder_start, jnp.int32), (n, len(cfg.decoder_start)))
        cache = network.init_cache(n, prompt.shape[1] + max_len, memory, memory_mask)
        context = context_ids
    else:
        need = context_ids.shape[1] + max_len
        if need > cfg.n_positions:
            raise ValueError(f"context of {context_ids.shape[1]} tokens + max_len {max_len} exceeds the model's "
                             f"{cfg.n_positions} positions; truncate the context")
        order = jnp.argsort(context_ids != cfg.pad_id, axis=1, stable=True)  # padding to the left
        prompt = context = jnp.take_along_axis(context_ids, order, axis=1)
        cache = network.init_cache(n, need)
        logits, cache = network.decode_cached(prompt, cache, valid=prompt != cfg.pad_id)
        return logits[:, -1], cache, context
    logits, cache = network.decode_cached(prompt, cache)
    return logits[:, -1], cache, context


def _repeat_cache(cache: dict, copies: int, stacked: bool) -> dict:
    """Every row of a cache (``Transformer.init_cache``'s layout) repeated ``copies`` times, in place."""
    layer_axis = 1 if stacked else 0  # stacked entries lead with the layer axis

    def rows(x, axis=0):
        return None if x is None else jnp.repeat(x, copies, axis=axis)

    return {**cache, "layers": jax.tree.map(lambda x: rows(x, layer_axis), cache["layers"]),
            "valid": rows(cache["valid"]), "count": rows(cache["count"]), "memory_mask": rows(cache["memory_mask"])}


_CROSS = ("xk", "xv")


def _dot_order(x: jax.Array) -> jax.Array:
    """Keys or values [..., S, heads, head_dim] as [..., heads, head_dim, S]."""
    return jnp.moveaxis(x, -3, -1)


def _model_order(x: jax.Array) -> jax.Array:
    """The inverse of ``_dot_order``."""
    return jnp.moveaxis(x, -1, -3)


def _loop_cache(cache: dict, stacked: bool):
    """(the cache the loop carries, the encoder's keys/values in the attention dots' order, or None).

    XLA:CPU's attention dots read keys and values as [B, heads, head_dim, S]
    and the model caches them as [B, S, heads, head_dim], so every step would
    copy every layer's encoder keys and values, which never change, into the
    dots' order. They are transposed once here instead, behind an
    optimisation barrier (without it XLA moves the transpose back into the
    loop), and ``_model_cache`` turns them back inside the step, where XLA
    cancels the two transposes. The decoder's own keys and values gain nothing
    from this: each step writes them before reading. Per-layer caches only: a
    stacked cache is sliced by the layers' scan in between.
    """
    layers = cache["layers"]
    if stacked or not any(name in entry for entry in layers for name in _CROSS):
        return cache, None
    cross = [{name: _dot_order(entry[name]) for name in _CROSS} for entry in layers]
    return _without_cross(cache), jax.lax.optimization_barrier(cross)


def _without_cross(cache: dict) -> dict:
    return {**cache, "layers": [{k: v for k, v in entry.items() if k not in _CROSS} for entry in cache["layers"]]}


def _model_cache(cache: dict, cross) -> dict:
    """The model's cache from ``_loop_cache``'s parts."""
    if cross is None:
        return cache
    layers = [{**entry, **{name: _model_order(x) for name, x in c.items()}} for entry, c in zip(cache["layers"], cross)]
    return {**cache, "layers": layers}


def _decode_step(network, ids, cache: dict, cross):
    """Logits [N, V] after ``ids`` [N, 1], and the updated loop cache."""
    logits, cache = network.decode_cached(ids, _model_cache(cache, cross))
    return logits[:, -1], cache if cross is None else _without_cross(cache)


# ---------------------------------------------------------------- constraints


def _ngram_bans(source, source_valid, hypothesis, length, n: int, vocab: int):
    """bool [N, V]: tokens that would complete an n-gram of ``source`` whose first
    n-1 tokens are the hypothesis's last n-1 (``length`` tokens generated so far)."""
    rows, s = source.shape
    if s < n:
        return jnp.zeros((rows, vocab), bool)
    windows = jnp.stack([source[:, o : s - n + 1 + o] for o in range(n)], axis=-1)  # [N, W, n]
    valid = jnp.stack([source_valid[:, o : s - n + 1 + o] for o in range(n)], axis=-1).all(-1)
    if n > 1:
        start = jnp.maximum(length - (n - 1), 0)
        suffix = jax.lax.dynamic_slice_in_dim(hypothesis, start, n - 1, axis=1)  # [N, n-1]
        valid &= (windows[..., : n - 1] == suffix[:, None, :]).all(-1) & (length >= n - 1)
    row_ids = jnp.broadcast_to(jnp.arange(rows)[:, None], valid.shape)
    return jnp.zeros((rows, vocab), bool).at[row_ids, windows[..., n - 1]].max(valid)


def _constrain(log_probs, hypothesis, length, context, cfg, settings: Settings):
    """Bans (score -inf) the end token before ``min_len`` and blocked n-grams."""
    vocab = log_probs.shape[-1]
    banned = jnp.zeros(log_probs.shape, bool)
    if settings.min_len:
        banned = banned.at[:, cfg.end_id].set(length < settings.min_len)
    if settings.block_ngram:
        generated = jnp.arange(hypothesis.shape[1])[None, :] < length
        generated = jnp.broadcast_to(generated, hypothesis.shape)
        banned |= _ngram_bans(hypothesis, generated, hypothesis, length, settings.block_ngram, vocab)
    if settings.context_block_ngram:
        banned |= _ngram_bans(context, context != cfg.pad_id, hypothesis, length, settings.context_block_ngram, vocab)
    return jnp.where(banned, -jnp.inf, log_probs)


def _filter_top_k_top_p(logits, top_k: int, top_p: float):
    """Keeps the ``top_k`` best tokens and the smallest set with probability >= ``top_p``."""
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better tokens
        keep = mass_before < top_p  # the best token is always kept
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


# ---------------------------------------------------------------- greedy / sampling


def _greedy_or_sample(network, context_ids, settings: Settings, key):
    cfg = network.cfg
    n, m = context_ids.shape[0], settings.max_len
    logits, cache, cross, context = _prefill(network, context_ids, m)
    tokens = jnp.full((n, m), cfg.pad_id, jnp.int32)
    state = (jnp.zeros((), jnp.int32), tokens, jnp.zeros((n,), bool), jnp.zeros((n,), jnp.float32), logits, cache)

    def running(state):
        step, _, finished, *_ = state
        return (step < m) & ~finished.all()

    def body(state):
        step, tokens, finished, score, logits, cache = state
        log_probs = _constrain(jax.nn.log_softmax(logits), tokens, step, context, cfg, settings)
        if settings.method == "greedy":
            token = jnp.argmax(log_probs, axis=-1)
        else:
            scaled = _filter_top_k_top_p(log_probs / settings.temperature, settings.top_k, settings.top_p)
            token = jax.random.categorical(jax.random.fold_in(key, step), scaled, axis=-1)
        token_logp = jnp.take_along_axis(log_probs, token[:, None], axis=1)[:, 0]
        token = jnp.where(finished, cfg.pad_id, token).astype(jnp.int32)
        score = score + jnp.where(finished, 0.0, token_logp)
        tokens = tokens.at[:, step].set(token)
        finished = finished | (token == cfg.end_id)
        logits, cache = _decode_step(network, token[:, None], cache, cross)
        return step + 1, tokens, finished, score, logits, cache

    _, tokens, _, score, _, _ = jax.lax.while_loop(running, body, state)
    return tokens, score


# ---------------------------------------------------------------- beam search


def _beam_search(network, context_ids, settings: Settings):
    """transformers' vectorised beam search (``early_stopping=False``) on our cache."""
    cfg = network.cfg
    b, k, m = context_ids.shape[0], settings.beam_size, settings.max_len
    keep = 2 * k  # candidates per step: enough to continue k beams if k of them end
    lp = settings.length_penalty
    logits, cache, cross, context = _prefill(network, context_ids, m, copies=k)
    vocab = logits.shape[-1]
    top_beams = jnp.arange(keep) < k  # only the best k candidates may finish

    def gather(x, index):  # x [B, C, ...], index [B, C'] -> [B, C', ...]
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    state = dict(
        step=jnp.zeros((), jnp.int32),
        running=jnp.full((b, k, m), cfg.pad_id, jnp.int32),
        running_score=jnp.where(jnp.arange(k) == 0, 0.0, _NEG)[None].repeat(b, 0).astype(jnp.float32),
        finished=jnp.full((b, k, m), cfg.pad_id, jnp.int32),
        finished_score=jnp.full((b, k), _NEG, jnp.float32),
        is_finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b,), bool),
        all_stopped=jnp.zeros((), bool),
        logits=logits,
        cache=cache,
    )

    def running(s):
        return s["improvable"].any() & ~s["all_stopped"]

    def body(s):
        step = s["step"]
        flat_running = s["running"].reshape(b * k, m)
        log_probs = _constrain(jax.nn.log_softmax(s["logits"]), flat_running, step, context, cfg, settings)
        total = (log_probs.reshape(b, k, vocab) + s["running_score"][:, :, None]).reshape(b, k * vocab)
        cand_score, cand_index = jax.lax.top_k(total, keep)
        cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
        cand_seq = gather(s["running"], cand_beam).at[:, :, step].set(cand_token)
        stops = (cand_token == cfg.end_id) | (step + 1 >= m)

        # the best k candidates that go on
        go_on_score = cand_score + stops * _NEG
        chosen = jax.lax.top_k(go_on_score, k)[1]
        new_running = gather(cand_seq, chosen)
        new_running_score = gather(go_on_score, chosen)
        source_rows = (gather(cand_beam, chosen) + jnp.arange(b)[:, None] * k).reshape(-1)

        # candidates that end join the finished list if they beat its worst
        just_finished = stops & top_beams[None, :]
        final_score = cand_score / ((step + 1).astype(jnp.float32) ** lp)
        final_score += (~s["improvable"][:, None]) * _NEG + (~just_finished) * _NEG
        merged_score = jnp.concatenate([s["finished_score"], final_score], axis=1)
        best = jax.lax.top_k(merged_score, k)[1]
        finished = gather(jnp.concatenate([s["finished"], cand_seq], axis=1), best)
        finished_score = gather(merged_score, best)
        is_finished = gather(jnp.concatenate([s["is_finished"], just_finished], axis=1), best)

        # can a running beam still beat a finished one? (transformers' heuristic)
        best_possible = new_running_score[:, :1] / ((step + 1).astype(jnp.float32) ** lp)
        worst = jnp.where(is_finished, finished_score.min(axis=1, keepdims=True), _NEG)
        improvable = s["improvable"] & (best_possible > worst).any(axis=1)

        cache = network.reorder_cache(s["cache"], source_rows)
        next_tokens = new_running.reshape(b * k, m)[:, step]
        logits, cache = _decode_step(network, next_tokens[:, None], cache, cross)
        return dict(step=step + 1, running=new_running, running_score=new_running_score, finished=finished,
                    finished_score=finished_score, is_finished=is_finished, improvable=improvable,
                    all_stopped=stops.all(), logits=logits, cache=cache)

    s = jax.lax.while_loop(running, body, state)
    return s["finished"][:, 0], s["finished_score"][:, 0]
