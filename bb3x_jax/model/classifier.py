"""A small feedback classifier ("judge"): is a bot response good or bad after its context?

Why it exists: iterative CRINGE labels a model's OWN generations good/bad. On
the synthetic release the world's rule (``synthetic.judge``) does that; on real
data a classifier trained on the release's feedback labels stands in for it
(BB3x used crowdworkers and a learned classifier the same way).

The network: token embeddings plus learned positions plus a segment embedding
(context / response), a few pre-LN transformer encoder layers (the encoder
layer of ``transformer.py``), a final LayerNorm, masked mean pooling over the
separator and response tokens (``pool="response"``; the context enters through
attention: pooling over all tokens let context features, e.g. a rude human
turn, decide, and held-out agreement with the synthetic world's rule was
lower), and a linear layer to one logit (> 0: good).

The input row (``encode_pairs``): the tail of the context tokens (ParlAI
framing: turns joined by the delimiter, left-truncated), the separator (the
tokenizer's end id), then the response tokens. The response is kept whole
(only a response longer than ``max_len - 1`` tokens loses its end); the context
gets the room that is left. Rows are LEFT-padded, so the response always ends
in the last column and a position says how far a token is from the end of the
response: the last human turn sits just before the separator whatever the
lengths.

Loss (``weighted_bce``): binary cross-entropy where each class's examples are
weighted by ``class_weights`` (N / (2 N_c) on the training set), normalised by
the batch's total weight: on a batch with the training set's class shares the
loss is exactly ``(mean BCE of positives + mean BCE of negatives) / 2``, so the
rare class counts as much as the common one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bb3x_jax.data.tokenizers import base as tokenizer_lib
from bb3x_jax.data.tokenizers import bpe
from bb3x_jax.model import transformer
from bb3x_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    vocab_size: int
    d_model: int = 64
    n_heads: int = 4
    ffn_dim: int = 256
    n_layers: int = 2
    max_len: int = 128  # context tail + separator + response
    dropout: float = 0.1
    # Mean pooling over the "response" tokens (separator + response; the context
    # enters through attention) or over "all" non-pad tokens.
    pool: str = "response"
    pad_id: int = 0
    sep_id: int = 2  # the tokenizer's end id

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size > max(self.pad_id, self.sep_id),
            "d_model": self.d_model > 0 and self.n_heads > 0 and self.d_model % self.n_heads == 0,
            "ffn_dim": self.ffn_dim > 0,
            "n_layers": self.n_layers >= 1,
            "max_len": self.max_len >= 2,
            "dropout": 0.0 <= self.dropout < 1.0,
            "pool": self.pool in ("response", "all"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid classifier config ({', '.join(bad)}): {self}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown classifier config keys {unknown}")
        return cls(**d)

    def layer_config(self) -> ModelConfig:
        """The encoder layers' settings in the transformer's own config type."""
        return ModelConfig(
            arch="encoder_decoder", vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads,
            ffn_dim=self.ffn_dim, n_encoder_layers=self.n_layers, n_decoder_layers=1, n_positions=self.max_len,
            variant="prelayernorm", activation="gelu", dropout=self.dropout, attention_dropout=0.0,
            activation_dropout=0.0, pad_id=self.pad_id,
        )


class FeedbackClassifier(nnx.Module):
    """``(ids [B, max_len], left-padded rows of encode_pairs) -> logits [B]`` (> 0: good)."""

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        layer_cfg = cfg.layer_config()
        keys = transformer._Keys(rngs)
        d = cfg.d_model
        init = nnx.initializers.normal(1.0 / math.sqrt(d))
        self.token_embed = nnx.Param(init(keys(), (cfg.vocab_size, d), jnp.float32))
        self.position_embed = nnx.Param(init(keys(), (cfg.max_len, d), jnp.float32))
        self.segment_embed = nnx.Param(init(keys(), (2, d), jnp.float32))
        self.layers = nnx.List([transformer.EncoderLayer(layer_cfg, keys) for _ in range(cfg.n_layers)])
        self.final_norm = transformer.LayerNorm(layer_cfg, keys)
        self.head = nnx.Param(nnx.initializers.normal(0.02)(keys(), (d, 1), jnp.float32))
        self.head_bias = nnx.Param(jnp.zeros((1,), jnp.float32))
        self.embed_dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, ids: jax.Array, *, deterministic: bool = True, key: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        if not deterministic and key is None:
            raise ValueError("training mode (deterministic=False) needs a dropout key")
        mask = ids != cfg.pad_id
        # Segment 1 from the separator on: the tokenizer never emits the end id inside
        # a text, so a row of encode_pairs has exactly one.
        segment = (jnp.cumsum((ids == cfg.sep_id).astype(jnp.int32), -1) > 0).astype(jnp.int32)
        x = jnp.take(self.token_embed[...], ids, axis=0) * math.sqrt(cfg.d_model)
        x = x + self.position_embed[...][None, : ids.shape[1]] + jnp.take(self.segment_embed[...], segment, axis=0)
        keys = [None] * (len(self.layers) + 1) if deterministic else list(jax.random.split(key, len(self.layers) + 1))
        if not deterministic:
            x = self.embed_dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=keys[-1]))
        keep = mask[..., None].astype(x.dtype)
        x = x * keep
        attn_mask = mask[:, None, None, :]
        for layer, layer_key in zip(self.layers, keys):
            x = layer(x, attn_mask, deterministic=deterministic, key=layer_key) * keep
        x = self.final_norm(x).astype(jnp.float32)
        pool = keep if cfg.pool == "all" else (mask & (segment == 1))[..., None].astype(jnp.float32)
        pooled = (x * pool).sum(1) / jnp.maximum(pool.sum(1), 1.0)
        return (pooled @ self.head[...] + self.head_bias[...])[:, 0]


# --- inputs ----------------------------------------------------------------------
def encode_pairs(contexts: Sequence[str | bytes], responses: Sequence[str | bytes], tokenizer,
                 max_len: int) -> np.ndarray:
    """Left-padded int32 rows [n, max_len]: context tail, separator (end id), whole response."""
    if len(contexts) != len(responses):
        raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
    n = len(contexts)
    out = np.full((n, max_len), tokenizer.pad_id, np.int32)
    if n == 0:
        return out
    responses = [tokenizer_lib.as_text(r) for r in responses]
    encoded = tokenizer.encode_batch(responses)
    responses_ids = [ids[: max_len - 1] for ids in encoded]
    room = [max_len - 1 - len(r) for r in responses_ids]
    # Left-truncated contexts, as long as the longest room needs (exact per row after the cut).
    context_ids = bpe.encode_contexts_exact(list(contexts), tokenizer, max(max(room), 0))
    for i, (ctx, resp, k) in enumerate(zip(context_ids, responses_ids, room)):
        row = (ctx[max(0, len(ctx) - k) :] if k > 0 else []) + [tokenizer.end_id] + resp
        out[i, max_len - len(row) :] = row
    return out


# --- loss and prediction ------------------------------------------------------------
def class_weights(labels: np.ndarray) -> tuple[float, float]:
    """(positive weight, negative weight) = N / (2 N_c): both classes weigh N / 2 in total."""
    labels = np.asarray(labels)
    n, n_pos = len(labels), int((labels == 1).sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"both classes are needed to train the classifier (positive {n_pos}, negative {n_neg})")
    return n / (2.0 * n_pos), n / (2.0 * n_neg)


def weighted_bce(logits: jax.Array, labels: jax.Array, weights: tuple[float, float] | jax.Array,
                 valid: jax.Array | None = None) -> jax.Array:
    """Class-weighted binary cross-entropy: sum_i w_{y_i} bce_i / sum_i w_{y_i} over valid rows.

    ``labels`` 1 = good (positive), 0 = bad; ``weights`` (positive, negative);
    bce is computed from logits (``softplus(-z)`` for a positive,
    ``softplus(z)`` for a negative), stable for any logit.
    """
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    per_example = labels * jax.nn.softplus(-logits) + (1.0 - labels) * jax.nn.softplus(logits)
    w = labels * weights[0] + (1.0 - labels) * weights[1]
    if valid is not None:
        w = w * valid.astype(jnp.float32)
    return jnp.sum(w * per_example) / jnp.maximum(jnp.sum(w), 1e-12)


def logits_fn(graphdef, params, rest, ids: jax.Array) -> jax.Array:
    """Inference logits of the split model (pure; jit it with graphdef closed over)."""
    return nnx.merge(graphdef, params, rest)(ids, deterministic=True)


def predict(graphdef, params, rest, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(probability of good [B], good? [B] bool) of the split model; threshold 0.5 (logit 0)."""
    logits = logits_fn(graphdef, params, rest, ids)
    return jax.nn.sigmoid(logits), logits > 0


def construct(cfg: ClassifierConfig, seed: int) -> FeedbackClassifier:
    """The classifier with its initial weights (traced abstractly by callers that only need shapes)."""
    with nnx.use_eager_sharding(False):  # one device; the layers' axis names are only metadata here
        return FeedbackClassifier(cfg, rngs=nnx.Rngs(params=seed))


def abstract_params(cfg: ClassifierConfig):
    """The parameters' shapes and dtypes (nothing allocated): what a saved judge must match."""
    return nnx.state(nnx.eval_shape(lambda: construct(cfg, 0)), nnx.Param)


def build(cfg: ClassifierConfig, seed: int) -> FeedbackClassifier:
    """A randomly initialised classifier (initialisation jitted: one compiled program, not op by op)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: construct(cfg, seed)))
    state = jax.jit(lambda: nnx.state(construct(cfg, seed)))()
    return nnx.merge(graphdef, state)


# --- parameters as flat numpy arrays (the judge's npz file) -------------------------------
def flat_params(params) -> dict[str, np.ndarray]:
    """{path string: array} of an nnx.State of parameters."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def unflat_params(abstract_params, arrays: dict[str, np.ndarray], where: str = "parameters"):
    """``abstract_params``' tree with its leaves from ``arrays`` (keys and shapes must match exactly)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    if missing or extra:
        raise ValueError(f"{where}: parameters do not match the classifier (missing {missing[:5]}, "
                         f"unexpected {extra[:5]})")
    out = []
    for name, (_, leaf) in zip(names, leaves):
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"{where}: {name} has shape {value.shape}, the classifier needs {tuple(leaf.shape)}")
        out.append(jnp.asarray(value, dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
