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

The ``dialogue`` arch (``ClassifierConfig.dialogue``): a pretrained dialogue
model (encoder-decoder, ``transformer.Transformer``) reads the pair as it was
trained to: its encoder the framed context, its decoder the response
(teacher-forced after the decoder start tokens); a linear layer reads the
decoder's final states, their mean over the response tokens and the state
after the whole response. Why: the feedback labels are few (about 1,900 on
the 2,000-conversation synthetic release) and cannot teach a small classifier
from scratch which words belong to which topic; a model trained by likelihood
on every bot message has learnt that, and its decoder states say how the
response follows from the context (on the synthetic release's valid split,
balanced accuracy against the world's rule with the same labels: 79% for the
encoder arch, 81% for this arch from random weights, 87% from the
likelihood-trained model). Its input row is the context row
(``framing.text_truncate`` tokens, right-padded) followed by the label row
(``framing.label_truncate``), so both archs pass one id array around
(``encode_rows``).

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

from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data.tokenizers import base as tokenizer_lib
from bb3x_jax.data.tokenizers import bpe
from bb3x_jax.model import transformer
from bb3x_jax.model.config import ModelConfig

ARCHS = ("encoder", "dialogue")


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
    # "encoder": the small encoder above (d_model .. pool); "dialogue": ``dialogue`` (a
    # pretrained encoder-decoder's config) reads the pair framed by ``framing``
    # (Framing.to_dict()), and max_len is text_truncate + label_truncate.
    arch: str = "encoder"
    dialogue: ModelConfig | None = None
    framing: tuple[tuple[str, object], ...] = ()  # Framing fields as sorted (name, value) pairs (hashable)

    def __post_init__(self):
        if isinstance(self.dialogue, dict):  # read back from meta.json
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.dialogue.items()}
            object.__setattr__(self, "dialogue", ModelConfig(**values))
        if isinstance(self.framing, dict):  # to_dict's form
            object.__setattr__(self, "framing", tuple(sorted(self.framing.items())))
        if self.arch == "dialogue":
            self._check_dialogue()
        checks = {
            "vocab_size": self.vocab_size > max(self.pad_id, self.sep_id),
            "d_model": self.d_model > 0 and self.n_heads > 0 and self.d_model % self.n_heads == 0,
            "ffn_dim": self.ffn_dim > 0,
            "n_layers": self.n_layers >= 1,
            "max_len": self.max_len >= 2,
            "dropout": 0.0 <= self.dropout < 1.0,
            "pool": self.pool in ("response", "all"),
            "arch": self.arch in ARCHS and (self.dialogue is not None) == (self.arch == "dialogue"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid classifier config ({', '.join(bad)}): {self}")

    def _check_dialogue(self) -> None:
        if not isinstance(self.dialogue, ModelConfig) or self.dialogue.arch != "encoder_decoder":
            raise ValueError("the dialogue classifier reads an encoder-decoder model (its encoder the context, "
                             f"its decoder the response); got {self.dialogue}")
        framing = self.input_framing()
        if self.max_len != framing.text_truncate + framing.label_truncate:
            raise ValueError(f"dialogue classifier rows are text_truncate + label_truncate = "
                             f"{framing.text_truncate + framing.label_truncate} ids, max_len is {self.max_len}")
        if max(framing.text_truncate, framing.label_truncate) > self.dialogue.n_positions:
            raise ValueError(f"the dialogue model has {self.dialogue.n_positions} positions, the framing needs "
                             f"{max(framing.text_truncate, framing.label_truncate)}")

    def input_framing(self) -> framing_lib.Framing:
        """How the dialogue arch frames a pair (the dialogue model's own framing)."""
        return framing_lib.Framing.from_dict(dict(self.framing))

    @classmethod
    def for_dialogue(cls, model: ModelConfig, framing: framing_lib.Framing, *, dropout: float,
                     pad_id: int, sep_id: int) -> ClassifierConfig:
        """The dialogue arch over ``model`` (its dropout rates set to ``dropout`` for fine-tuning)."""
        model = dataclasses.replace(model, dropout=dropout, attention_dropout=0.0, activation_dropout=0.0)
        return cls(vocab_size=model.vocab_size, d_model=model.d_model, n_heads=model.n_heads, ffn_dim=model.ffn_dim,
                   n_layers=model.n_encoder_layers, max_len=framing.text_truncate + framing.label_truncate,
                   dropout=dropout, pad_id=pad_id, sep_id=sep_id, arch="dialogue", dialogue=model,
                   framing=tuple(sorted(framing.to_dict().items())))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["framing"] = dict(self.framing)
        return d

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


class DialogueClassifier(nnx.Module):
    """``(ids [B, text_truncate + label_truncate]: context row, label row) -> logits [B]`` (> 0: good)."""

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.text_truncate = cfg.input_framing().text_truncate
        self.network = transformer.Transformer(cfg.dialogue, rngs=rngs)
        d = cfg.dialogue.d_model
        self.head = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (2 * d, 1), jnp.float32))
        self.head_bias = nnx.Param(jnp.zeros((1,), jnp.float32))
        self.head_dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, ids: jax.Array, *, deterministic: bool = True, key: jax.Array | None = None) -> jax.Array:
        """The network's own dropout draws from its RNG streams (``nnx.reseed`` them per step);
        ``key`` drops out the pooled features."""
        if not deterministic and key is None:
            raise ValueError("training mode (deterministic=False) needs a dropout key")
        model = self.cfg.dialogue
        context, label = ids[:, : self.text_truncate], ids[:, self.text_truncate :]
        start = jnp.broadcast_to(jnp.asarray(model.decoder_start, label.dtype),
                                 (label.shape[0], len(model.decoder_start)))
        memory, memory_mask = self.network.encode(context, deterministic=deterministic)
        states = self.network.decode(jnp.concatenate([start, label[:, :-1]], axis=1), memory, memory_mask,
                                     deterministic=deterministic)
        # states[:, t] has read the start tokens and label[:t] (the bart framing's extra start drops one)
        states = states[:, len(model.decoder_start) - 1 :].astype(jnp.float32)
        valid = (label != model.pad_id).astype(jnp.float32)
        count = valid.sum(1)
        mean = (states * valid[..., None]).sum(1) / jnp.maximum(count, 1.0)[:, None]
        last = jnp.maximum(count.astype(jnp.int32) - 1, 0)  # reads the whole response: it predicts the end
        final = jnp.take_along_axis(states, last[:, None, None], axis=1)[:, 0]
        pooled = jnp.concatenate([mean, final], axis=-1)
        if not deterministic:
            pooled = self.head_dropout(pooled, deterministic=False, rngs=nnx.Rngs(dropout=key))
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


def encode_dialogue_pairs(contexts: Sequence[str | bytes], responses: Sequence[str | bytes], tokenizer,
                          framing: framing_lib.Framing) -> np.ndarray:
    """Rows [n, text_truncate + label_truncate]: the context row and the label row, each framed as the
    dialogue model was trained (``framing``) and right-padded."""
    if len(contexts) != len(responses):
        raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
    n = len(contexts)
    context = framing_lib.frame_context_rows(contexts, tokenizer, framing).padded(n, framing.text_truncate,
                                                                                 tokenizer.pad_id)
    label = framing_lib.frame_label_rows(responses, tokenizer, framing).padded(n, framing.label_truncate,
                                                                              tokenizer.pad_id)
    return np.concatenate([context, label], axis=1).astype(np.int32)


def encode_rows(cfg: ClassifierConfig, contexts: Sequence[str | bytes], responses: Sequence[str | bytes],
                tokenizer) -> np.ndarray:
    """The classifier's input rows [n, cfg.max_len] for either arch."""
    if cfg.arch == "dialogue":
        return encode_dialogue_pairs(contexts, responses, tokenizer, cfg.input_framing())
    return encode_pairs(contexts, responses, tokenizer, cfg.max_len)


def padding_rows(cfg: ClassifierConfig, n: int) -> np.ndarray:
    """Filler rows of a fixed-shape batch, never all padding: a lone separator (encoder), or a lone
    end id as context and as response (dialogue)."""
    rows = np.full((n, cfg.max_len), cfg.pad_id, np.int32)
    rows[:, -1] = cfg.sep_id
    if cfg.arch == "dialogue":
        rows[:, -1] = cfg.pad_id
        rows[:, 0] = rows[:, cfg.input_framing().text_truncate] = cfg.sep_id
    return rows


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


def construct(cfg: ClassifierConfig, seed: int) -> FeedbackClassifier | DialogueClassifier:
    """The classifier with its initial weights (traced abstractly by callers that only need shapes)."""
    with nnx.use_eager_sharding(False):  # one device; the layers' axis names are only metadata here
        if cfg.arch == "dialogue":
            return DialogueClassifier(cfg, rngs=nnx.Rngs(seed))
        return FeedbackClassifier(cfg, rngs=nnx.Rngs(params=seed))


def abstract_params(cfg: ClassifierConfig):
    """The parameters' shapes and dtypes (nothing allocated): what a saved judge must match."""
    return nnx.state(nnx.eval_shape(lambda: construct(cfg, 0)), nnx.Param)


def build(cfg: ClassifierConfig, seed: int, network_params=None) -> FeedbackClassifier | DialogueClassifier:
    """A randomly initialised classifier (initialisation jitted: one compiled program, not op by op);
    ``network_params``: the dialogue arch's pretrained network parameters (its head stays random)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: construct(cfg, seed)))
    state = jax.jit(lambda: nnx.state(construct(cfg, seed)))()
    model = nnx.merge(graphdef, state)
    if network_params is not None:
        if cfg.arch != "dialogue":
            raise ValueError("pretrained network parameters need the dialogue arch")
        nnx.update(model.network, network_params)
    return model


def inference_rest(cfg: ClassifierConfig):
    """The non-parameter state (the dialogue network's RNG streams) a loaded classifier needs besides
    its parameters; jitted, so the unused random weights are never computed."""
    return jax.jit(lambda: nnx.split(construct(cfg, 0), nnx.Param, ...)[2])()


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
