"""The BB3 family in Flax NNX: ParlAI's encoder-decoder transformer and OPT.

Semantics follow ParlAI's ``TransformerGeneratorModel`` (and are tested
against transformers' Blenderbot, BlenderbotSmall and OPT on the same
weights):
- token embeddings (times sqrt(d) when ``embeddings_scale``) plus learned
  positions; ``xlm`` normalises the sum in the encoder but the token
  embeddings before the positions in the decoder (ParlAI's order, also
  transformers' BlenderbotSmall), ``bart`` normalises the sum in both;
  encoder positions are ``cumsum(mask) - 1`` (+ ``position_offset``), decoder
  positions count from the cache position;
- ``aiayn``/``xlm``/``bart`` layers are post-LN: ``x = norm(x + drop(sublayer(x)))``;
  ``prelayernorm`` layers are pre-LN: ``x = x + drop(sublayer(norm(x)))`` and the
  stack ends with a final norm;
- attention scales queries by 1/sqrt(head_dim), softmax in float32, through
  ``jax.nn.dot_product_attention`` (the cuDNN kernel on GPU);
- the encoder zeroes padded positions after every layer, as ParlAI does;
- logits are ``h @ E^T`` with the shared embedding ``E``.

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``,
``mlp``) for the rules table in ``bb3x_jax/sharding.py``.

Layer stacks: with ``scan_layers`` each stack's layers are one module whose
parameters have a leading ``layers`` axis, applied by one ``jax.lax.scan`` (the
compiled program holds one layer body, whatever the depth); otherwise a list
applied by a Python loop. Either way a layer is applied as a pure function of
its parameters, its input and one dropout key (drawn per layer from the
stack's RNG stream), optionally under ``jax.checkpoint`` with the ``remat``
policy; the two layouts give the same logits, gradients and dropout masks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from bb3x_jax import sharding
from bb3x_jax.model.config import ModelConfig


def _dtype(name: str):
    return jnp.dtype(name)


def _init(stddev: float, names: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.normal(stddev), names)


class _Keys:
    """Parameter keys folded from one base key by a counter.

    Drawing every key through ``nnx.Rngs`` updates its state each time, which
    makes tracing a 96-layer model (``eval_shape``) slow; folding in a counter
    is cheap and just as deterministic.
    """

    def __init__(self, rngs: nnx.Rngs | None, base: jax.Array | None = None):
        self.rngs = rngs
        self._base = rngs.params() if base is None else base
        self._count = 0

    def __call__(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._base, self._count)


# jax.checkpoint policies by ModelConfig.remat name ("none" = no checkpoint;
# "full" = policy None: save nothing, recompute the whole layer).
_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _layer_rngs(key: jax.Array | None) -> nnx.Rngs | None:
    """The dropout streams of one layer call (None when deterministic)."""
    return None if key is None else nnx.Rngs(dropout=key)


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x @ kernel + bias, with a backward pass that puts the transpose on ``x``.

    The kernel gradient contracts the token axis of both ``x`` and the
    incoming gradient ``dy``; XLA:CPU's matmuls read one of them transposed,
    and autodiff's form makes that one ``dy``. ``dy`` of a residual-stream
    layer is a long elementwise chain (LayerNorm and dropout backward), which
    XLA fuses into the transposing copy and recomputes for every layer:
    about 0.3 s of a 0.9 s bench_small step. Written as ``(dy^T x)^T`` the
    copy falls on ``x``, a stored activation. Values are the same as
    autodiff's up to float rounding order.
    """
    return jnp.dot(x, kernel) + bias


def _dense_fwd(x, kernel, bias):
    return dense(x, kernel, bias), (x, kernel)


def _dense_bwd(residuals, dy):
    x, kernel = residuals
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    d_x = jnp.dot(dy, kernel.T)
    d_kernel = jnp.dot(dy2.T, x2).T
    d_bias = dy2.astype(jnp.float32).sum(0)
    return d_x, d_kernel.astype(kernel.dtype), d_bias.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out] with logical axis names."""

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], cfg: ModelConfig, rngs: _Keys):
        self.kernel = nnx.Param(_init(1.0 / math.sqrt(d_in), names)(rngs(), (d_in, d_out), _dtype(cfg.param_dtype)))
        self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, (names[1],))(rngs(), (d_out,), _dtype(cfg.param_dtype)))
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype))


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 (eps from the config), scale and bias on ``embed``."""

    def __init__(self, cfg: ModelConfig, rngs: _Keys):
        d = cfg.d_model
        self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("embed",))(rngs(), (d,), _dtype(cfg.param_dtype)))
        self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("embed",))(rngs(), (d,), _dtype(cfg.param_dtype)))
        self.eps = cfg.layernorm_eps
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v/out projections (ParlAI/HF layout)."""

    def __init__(self, cfg: ModelConfig, rngs: _Keys):
        d = cfg.d_model
        self.q_lin = Dense(d, d, ("embed", "heads"), cfg, rngs)
        self.k_lin = Dense(d, d, ("embed", "heads"), cfg, rngs)
        self.v_lin = Dense(d, d, ("embed", "heads"), cfg, rngs)
        self.out_lin = Dense(d, d, ("heads", "embed"), cfg, rngs)
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.dropout = nnx.Dropout(cfg.attention_dropout)  # keys come with each call

    def project_kv(self, kv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, H, Dh] of a sequence (cacheable)."""
        b, tk, _ = kv.shape
        k = self.k_lin(kv).reshape(b, tk, self.n_heads, self.head_dim)
        v = self.v_lin(kv).reshape(b, tk, self.n_heads, self.head_dim)
        return k, v

    def attend(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
        """Queries from ``x`` over keys/values; ``mask`` is boolean [B, 1 or H, Tq, Tk], True = allowed."""
        b, tq, _ = x.shape
        q = self.q_lin(x).reshape(b, tq, self.n_heads, self.head_dim)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if deterministic or self.dropout.rate == 0.0:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        else:  # attention dropout needs the weights, so no fused kernel here
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(self.head_dim)
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            weights = self.dropout(jax.nn.softmax(scores, axis=-1), deterministic=False, rngs=rngs).astype(v.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.out_lin(out.reshape(b, tq, self.n_heads * self.head_dim))

    def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array, *, deterministic: bool,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        return self.attend(x, *self.project_kv(kv), mask, deterministic=deterministic, rngs=rngs)


def gelu_exact(x: jax.Array) -> jax.Array:
    """x * Phi(x) written with erf, as torch computes it.

    Same values as ``jax.nn.gelu(approximate=False)``, which uses erfc; on
    XLA:CPU that form made the backward's transposing copy fusion about 15x
    slower (55 ms vs 3.4 ms per bench_small FFN), a quarter of the train step.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


class FeedForward(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: _Keys):
        self.lin1 = Dense(cfg.d_model, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
        self.lin2 = Dense(cfg.ffn_dim, cfg.d_model, ("mlp", "embed"), cfg, rngs)
        self.activation = cfg.activation
        self.dropout = nnx.Dropout(cfg.activation_dropout)

    def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = self.lin1(x)
        h = gelu_exact(h) if self.activation == "gelu" else jax.nn.relu(h)
        return self.lin2(self.dropout(h, deterministic=deterministic, rngs=rngs))


class _Sublayers(nnx.Module):
    """Applies a sublayer with the variant's residual/norm order."""

    def __init__(self, cfg: ModelConfig, rngs: _Keys):
        self.pre_ln = cfg.variant == "prelayernorm"
        self.dropout = nnx.Dropout(cfg.dropout)

    def residual(self, x, norm, fn, deterministic, rngs=None):
        if self.pre_ln:
            return x + self.dropout(fn(norm(x)), deterministic=deterministic, rngs=rngs)
        return norm(x + self.dropout(fn(x), deterministic=deterministic, rngs=rngs))


class EncoderLayer(_Sublayers):
    def __init__(self, cfg: ModelConfig, rngs: _Keys):
        super().__init__(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.norm1 = LayerNorm(cfg, rngs)
        self.ffn = FeedForward(cfg, rngs)
        self.norm2 = LayerNorm(cfg, rngs)

    def __call__(self, x, mask, *, deterministic: bool, key: jax.Array | None = None):
        """One layer; ``key`` seeds its dropout masks (None when deterministic)."""
        rngs, d = _layer_rngs(key), deterministic
        x = self.residual(x, self.norm1, lambda h: self.attention(h, h, mask, deterministic=d, rngs=rngs), d, rngs)
        return self.residual(x, self.norm2, lambda h: self.ffn(h, deterministic=d, rngs=rngs), d, rngs)


class DecoderLayer(_Sublayers):
    def __init__(self, cfg: ModelConfig, rngs: _Keys, cross_attention: bool):
        super().__init__(cfg, rngs)
        self.self_attention = Attention(cfg, rngs)
        self.norm1 = LayerNorm(cfg, rngs)
        if cross_attention:
            self.encoder_attention = Attention(cfg, rngs)
            self.norm2 = LayerNorm(cfg, rngs)
        self.ffn = FeedForward(cfg, rngs)
        self.norm3 = LayerNorm(cfg, rngs)
        self.cross_attention = cross_attention

    def __call__(self, x, self_mask, memory=None, memory_mask=None, *, deterministic: bool,
                 key: jax.Array | None = None):
        """One layer; ``key`` seeds its dropout masks (None when deterministic)."""
        rngs, d = _layer_rngs(key), deterministic
        x = self.residual(
            x, self.norm1, lambda h: self.self_attention(h, h, self_mask, deterministic=d, rngs=rngs), d, rngs
        )
        if self.cross_attention:
            x = self.residual(
                x,
                self.norm2,
                lambda h: self.encoder_attention(h, memory, memory_mask, deterministic=d, rngs=rngs),
                d,
                rngs,
            )
        return self.residual(x, self.norm3, lambda h: self.ffn(h, deterministic=d, rngs=rngs), d, rngs)

    def cached(self, x, self_mask, write_kv, cross_kv=None, cross_mask=None):
        """One decoding call. ``write_kv(k, v)`` stores the new tokens' keys/values in
        the cache and returns this layer's whole cached (keys, values)."""

        def self_attention(h):
            keys, values = write_kv(*self.self_attention.project_kv(h))
            return self.self_attention.attend(h, keys, values, self_mask, deterministic=True)

        x = self.residual(x, self.norm1, self_attention, True)
        if self.cross_attention:
            x = self.residual(
                x,
                self.norm2,
                lambda h: self.encoder_attention.attend(h, *cross_kv, cross_mask, deterministic=True),
                True,
            )
        return self.residual(x, self.norm3, lambda h: self.ffn(h, deterministic=True), True)


class _Stack(nnx.Module):
    """Embeddings + positions (+ xlm norm) on the way in, final norm on the way out."""

    def __init__(self, cfg: ModelConfig, rngs: _Keys):
        self.position_embeddings = nnx.Param(
            _init(cfg.d_model**-0.5, (None, "embed"))(
                rngs(), (cfg.n_positions + cfg.position_offset, cfg.d_model), _dtype(cfg.param_dtype)
            )
        )
        self.norm_embeddings = LayerNorm(cfg, rngs) if cfg.variant != "aiayn" else None
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs.rngs)
        # One stream for all layers: each layer call gets its own key from it.
        self.layer_rngs = rngs.rngs["dropout"].fork()
        self.cfg = cfg
        self.is_decoder = False

    def embed(self, embeddings: jax.Array, ids: jax.Array, positions: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.cfg
        dtype = _dtype(cfg.dtype)
        x = jnp.take(embeddings, ids, axis=0).astype(dtype)
        if cfg.embeddings_scale:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)
        if cfg.variant == "xlm" and self.is_decoder:
            x = self.norm_embeddings(x)
        x = x + jnp.take(self.position_embeddings[...], positions + cfg.position_offset, axis=0).astype(dtype)
        if cfg.variant == "bart" or (cfg.variant == "xlm" and not self.is_decoder):
            x = self.norm_embeddings(x)
        return self.dropout(x, deterministic=deterministic)

    def finish(self, x: jax.Array) -> jax.Array:
        return self.norm_embeddings(x) if self.cfg.variant == "prelayernorm" else x

    def run_layers(self, fn, x: jax.Array, deterministic: bool, *consts) -> jax.Array:
        """``x = fn(layer, x, key, *consts)`` for every layer in order: one scan or a loop.

        The layer is rebuilt from its parameters inside a pure function, so
        the same function is scanned, looped, and rematerialised; ``key`` is the
        layer's own dropout key (None when deterministic).
        """
        cfg = self.cfg
        n = cfg.n_decoder_layers if self.is_decoder else cfg.n_encoder_layers
        keys = None if deterministic else jax.random.split(self.layer_rngs(), n)
        x = sharding.constrain(x)

        def make_step(graphdef):
            def step(state, h, key, *args):
                return sharding.constrain(fn(nnx.merge(graphdef, state), h, key, *args))

            return _rematerialised(step, cfg.remat, prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)
            step = make_step(graphdef)
            x, _ = jax.lax.scan(lambda h, xs: (step(xs[0], h, xs[1], *consts), None), x, (state, keys))
            return x
        for i, layer in enumerate(self.layers):
            graphdef, state = nnx.split(layer)
            x = make_step(graphdef)(state, x, None if keys is None else keys[i], *consts)
        return x


def _rematerialised(fn, policy: str, *, prevent_cse: bool):
    """``fn`` under jax.checkpoint with the named policy ("none": unchanged).

    Inside a scan, CSE prevention is unnecessary and only costs (jax's advice).
    """
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy], prevent_cse=prevent_cse)


def _make_layers(cfg: ModelConfig, rngs: _Keys, n: int, make):
    """``n`` layers ``make(keys)``: a list, or with ``scan_layers`` one module whose
    parameters are stacked on a leading ``layers`` axis (traced once, not n times)."""
    if not cfg.scan_layers:
        return nnx.List([make(rngs) for _ in range(n)])
    create = nnx.vmap(lambda key: make(_Keys(None, key)), in_axes=0, out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
    return create(jax.random.split(rngs(), n))


def _positions_from_mask(mask: jax.Array) -> jax.Array:
    """cumsum(mask) - 1, clipped at 0: left padding does not shift positions."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class Encoder(_Stack):
    def __init__(self, cfg: ModelConfig, rngs: _Keys):
        super().__init__(cfg, rngs)
        self.layers = _make_layers(cfg, rngs, cfg.n_encoder_layers, lambda keys: EncoderLayer(cfg, keys))

    def __call__(self, embeddings, ids, *, deterministic: bool = True):
        """Returns (encoder states [B, S, d], padding mask [B, S])."""
        mask = ids != self.cfg.pad_id
        x = self.embed(embeddings, ids, _positions_from_mask(mask), deterministic)
        keep = mask[..., None].astype(x.dtype)
        x = x * keep

        def layer_fn(layer, h, key, attn_mask, keep):
            return layer(h, attn_mask, deterministic=deterministic, key=key) * keep

        x = self.run_layers(layer_fn, x, deterministic, mask[:, None, None, :], keep)
        return self.finish(x) * keep, mask


class Decoder(_Stack):
    def __init__(self, cfg: ModelConfig, rngs: _Keys, cross_attention: bool):
        super().__init__(cfg, rngs)
        self.is_decoder = True
        self.layers = _make_layers(
            cfg, rngs, cfg.n_decoder_layers, lambda keys: DecoderLayer(cfg, keys, cross_attention)
        )

    def __call__(self, embeddings, ids, positions, self_mask, memory=None, memory_mask=None, *, deterministic=True):
        x = self.embed(embeddings, ids, positions, deterministic)
        cross = None if memory_mask is None else memory_mask[:, None, None, :]

        def layer_fn(layer, h, key, self_mask, memory, cross):
            return layer(h, self_mask, memory, cross, deterministic=deterministic, key=key)

        x = self.run_layers(layer_fn, x, deterministic, self_mask, memory, cross)
        return self.finish(x)

    def project_memory(self, memory: jax.Array) -> list[dict] | dict:
        """Every layer's cross-attention keys/values of the encoder memory: a list, or stacked."""
        if not self.cfg.scan_layers:
            return [dict(zip(("xk", "xv"), layer.encoder_attention.project_kv(memory))) for layer in self.layers]
        graphdef, state = nnx.split(self.layers)
        xk, xv = jax.lax.map(lambda s: nnx.merge(graphdef, s).encoder_attention.project_kv(memory), state)
        return {"xk": xk, "xv": xv}

    def cached(self, x, self_mask, entries: list[dict] | dict, index, cross_mask):
        """All layers' cached decoding calls: (x, updated cache entries), a loop or one scan.

        The scanned layout carries the stacked [layers, ...] keys/values through
        the scan and writes only the new tokens into them, so a decoding step
        updates the cache in place instead of rebuilding it as scan outputs.
        """

        def write(cache_k, cache_v, k, v, at):
            return (jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), at),
                    jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), at))

        if not self.cfg.scan_layers:
            new = []
            for layer, entry in zip(self.layers, entries):
                entry = dict(entry)

                def write_kv(k, v, entry=entry):
                    entry["k"], entry["v"] = write(entry["k"], entry["v"], k, v, (0, index, 0, 0))
                    return entry["k"], entry["v"]

                cross = (entry["xk"], entry["xv"]) if "xk" in entry else None
                x = layer.cached(x, self_mask, write_kv, cross, cross_mask)
                new.append(entry)
            return x, new
        graphdef, state = nnx.split(self.layers)
        n = self.cfg.n_decoder_layers
        cross_xs = (entries["xk"], entries["xv"]) if "xk" in entries else None

        def body(carry, xs):
            h, cache_k, cache_v = carry
            layer_state, cross, i = xs
            written = {}

            def write_kv(k, v):
                written["k"], written["v"] = write(cache_k, cache_v, k[None], v[None], (i, 0, index, 0, 0))
                return written["k"][i], written["v"][i]

            h = nnx.merge(graphdef, layer_state).cached(h, self_mask, write_kv, cross, cross_mask)
            return (h, written["k"], written["v"]), None

        (x, cache_k, cache_v), _ = jax.lax.scan(
            body, (x, entries["k"], entries["v"]), (state, cross_xs, jnp.arange(n))
        )
        return x, {**entries, "k": cache_k, "v": cache_v}


class Transformer(nnx.Module):
    """An encoder-decoder (``arch="encoder_decoder"``) or OPT-style decoder-only model.

    ``__call__`` takes token ids and returns float32 next-token logits:
    - encoder-decoder: ``(encoder_ids [B, S], decoder_ids [B, T]) -> [B, T, V]``
      (``decoder_ids`` are the decoder's inputs: start tokens then the label,
      teacher-forced);
    - decoder-only: ``(None, ids [B, T]) -> [B, T, V]`` with causal attention
      over the non-pad tokens.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        rngs = _Keys(rngs)
        self.cfg = cfg
        self.embeddings = nnx.Param(
            _init(cfg.d_model**-0.5, ("vocab", "embed"))(rngs(), (cfg.vocab_size, cfg.d_model), _dtype(cfg.param_dtype))
        )
        self.encoder = Encoder(cfg, rngs) if cfg.arch == "encoder_decoder" else None
        self.decoder = Decoder(cfg, rngs, cross_attention=cfg.arch == "encoder_decoder")

    def encode(self, encoder_ids, *, deterministic: bool = True):
        return self.encoder(self.embeddings[...], encoder_ids, deterministic=deterministic)

    def decode(self, decoder_ids, memory=None, memory_mask=None, *, deterministic: bool = True) -> jax.Array:
        """Teacher-forced decoder states over the whole sequence."""
        cfg = self.cfg
        t = decoder_ids.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if cfg.arch == "decoder_only":
            valid = decoder_ids != cfg.pad_id
            positions = _positions_from_mask(valid)
            self_mask = causal & valid[:, None, None, :]
        else:
            positions = jnp.broadcast_to(jnp.arange(t), decoder_ids.shape)
            self_mask = causal
        return self.decoder(
            self.embeddings[...], decoder_ids, positions, self_mask, memory, memory_mask, deterministic=deterministic
        )

    def init_cache(self, batch: int, max_len: int, memory=None, memory_mask=None) -> dict:
        """An empty decoding cache for ``max_len`` decoder tokens (explicit state, a pytree).

        Holds each layer's self-attention keys/values, the encoder memory's
        cross-attention keys/values (computed once here), which cached
        positions are real tokens, and per row the count of real tokens so far
        (decoder-only positions skip left padding). The layers' entries are a
        list of dicts, or with ``scan_layers`` one dict of [layers, ...] arrays.
        """
        cfg = self.cfg
        dtype = _dtype(cfg.dtype)
        shape = (batch, max_len, cfg.n_heads, cfg.head_dim)
        n = cfg.n_decoder_layers
        cross = self.decoder.project_memory(memory) if cfg.arch == "encoder_decoder" else None
        if cfg.scan_layers:  # one entry of stacked [layers, ...] arrays
            layers = {"k": jnp.zeros((n, *shape), dtype), "v": jnp.zeros((n, *shape), dtype), **(cross or {})}
        else:
            layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), **(cross[i] if cross else {})}
                      for i in range(n)]
        return {
            "layers": layers,
            "index": jnp.zeros((), jnp.int32),
            "valid": jnp.zeros((batch, max_len), bool),
            "count": jnp.zeros((batch,), jnp.int32),
            "memory_mask": memory_mask,
        }

    def decode_cached(self, ids: jax.Array, cache: dict, valid: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Logits [B, t, V] of ``t`` new decoder tokens after the cached ones, and the updated cache.

        Equal to the full forward's logits at those positions (tested): use it
        for a prompt (t > 1) and then token by token (t = 1). ``valid`` [B, t]
        marks the real tokens of a (left-padded) decoder-only prompt; without
        it every new token is real, so a generated token that happens to equal
        the pad id is attended to like any other (as in transformers).
        """
        cfg = self.cfg
        index = cache["index"]
        t = ids.shape[1]
        max_len = cache["valid"].shape[1]
        if cfg.arch == "decoder_only":
            new_valid = jnp.ones(ids.shape, bool) if valid is None else valid
            positions = jnp.maximum(cache["count"][:, None] + jnp.cumsum(new_valid.astype(jnp.int32), axis=1) - 1, 0)
        else:
            new_valid = jnp.ones(ids.shape, bool)
            positions = jnp.broadcast_to(index + jnp.arange(t), ids.shape)
        valid = jax.lax.dynamic_update_slice(cache["valid"], new_valid, (0, index))
        query_pos = index + jnp.arange(t)
        causal = jnp.arange(max_len)[None, :] <= query_pos[:, None]
        self_mask = causal[None, None] & valid[:, None, None, :]
        cross_mask = None if cache["memory_mask"] is None else cache["memory_mask"][:, None, None, :]
        x = self.decoder.embed(self.embeddings[...], ids, positions, True)
        x, layers = self.decoder.cached(x, self_mask, cache["layers"], index, cross_mask)
        new_cache = {
            "layers": layers,
            "index": index + t,
            "valid": valid,
            "count": cache["count"] + new_valid.sum(axis=1, dtype=jnp.int32),
            "memory_mask": cache["memory_mask"],
        }
        return self.output(self.decoder.finish(x)), new_cache

    def reorder_cache(self, cache: dict, rows: jax.Array) -> dict:
        """The cache with its rows taken from ``rows`` [N] (beam search keeps the
        survivors' histories). The encoder's keys/values are not moved: beams of
        one example share them, and rows never leave their example."""
        axis = 1 if self.cfg.scan_layers else 0

        def take(entry):
            return {**entry, "k": jnp.take(entry["k"], rows, axis=axis), "v": jnp.take(entry["v"], rows, axis=axis)}

        layers = cache["layers"]
        return {
            **cache,
            "layers": take(layers) if self.cfg.scan_layers else [take(e) for e in layers],
            "valid": jnp.take(cache["valid"], rows, axis=0),
            "count": jnp.take(cache["count"], rows, axis=0),
        }

    def output(self, states: jax.Array) -> jax.Array:
        """Logits in float32: states @ E^T with the shared embedding (in the compute dtype,
        accumulated and returned in float32)."""
        dtype = _dtype(self.cfg.dtype)
        logits = jnp.dot(states.astype(dtype), self.embeddings[...].astype(dtype).T, preferred_element_type=jnp.float32)
        if self.cfg.mask_start_logit:
            logits = logits.at[..., self.cfg.start_id].set(-1e20)
        return logits

    def label_logits(self, context_ids, label_ids, *, deterministic: bool = True) -> jax.Array:
        """Teacher-forced float32 logits [B, T, V]: entry t scores ``label_ids[:, t]``.

        Encoder-decoder: the decoder reads ``decoder_start`` then the label
        (ParlAI's bart framing seeds [__end__, __start__] and drops the first
        score). Decoder-only: the context, left-aligned, then the label as one
        sequence; only the label positions are returned.
        """
        cfg = self.cfg
        b = label_ids.shape[0]
        if cfg.arch == "encoder_decoder":
            start = jnp.broadcast_to(jnp.asarray(cfg.decoder_start, label_ids.dtype), (b, len(cfg.decoder_start)))
            decoder_in = jnp.concatenate([start, label_ids[:, :-1]], axis=1)
            memory, memory_mask = self.encode(context_ids, deterministic=deterministic)
            states = self.decode(decoder_in, memory, memory_mask, deterministic=deterministic)
            # Project only the scored positions: the vocabulary matmul is the largest one.
            return self.output(states[:, len(cfg.decoder_start) - 1 :])
        order = jnp.argsort(context_ids != cfg.pad_id, axis=1, stable=True)  # padding to the left
        context = jnp.take_along_axis(context_ids, order, axis=1)
        sequence = jnp.concatenate([context, label_ids[:, :-1]], axis=1)
        states = self.decode(sequence, deterministic=deterministic)
        return self.output(states[:, context.shape[1] - 1 :])

    def __call__(self, encoder_ids, decoder_ids, *, deterministic: bool = True) -> jax.Array:
        if self.cfg.arch == "encoder_decoder":
            memory, memory_mask = self.encode(encoder_ids, deterministic=deterministic)
            states = self.decode(decoder_ids, memory, memory_mask, deterministic=deterministic)
        else:
            states = self.decode(decoder_ids, deterministic=deterministic)
        return self.output(states)
