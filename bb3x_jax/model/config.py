"""Architecture settings of the BB3 family, and named presets.

One frozen dataclass covers ParlAI's encoder-decoder transformers (variants
``aiayn``, ``xlm``, ``prelayernorm``; BB3-3B / R2C2 and BB1-3B are
``prelayernorm``) and the decoder-only OPT models of BB3-30B / 175B. Every
field says what it changes; anything not listed is fixed by the family
(learned positions, LayerNorm, biases on every projection, tied output
embedding).
"""

from __future__ import annotations

import dataclasses

ARCHS = ("encoder_decoder", "decoder_only")
VARIANTS = ("aiayn", "xlm", "prelayernorm", "bart")
ACTIVATIONS = ("gelu", "relu")
# Per-layer rematerialisation (jax.checkpoint) policies: none; full = save
# nothing, recompute the layer; dots = save matmul outputs; dots_no_batch =
# save matmul outputs without batch dimensions (not the attention scores).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "encoder_decoder"
    vocab_size: int = 8008
    d_model: int = 512
    n_heads: int = 8
    ffn_dim: int = 2048
    n_encoder_layers: int = 2
    n_decoder_layers: int = 6
    n_positions: int = 1024
    # ParlAI's transformer variant: aiayn = post-LN; xlm = post-LN plus a norm of
    # the embeddings (encoder: after adding positions; decoder: before, as
    # ParlAI does); bart = post-LN plus a norm after adding positions in both;
    # prelayernorm = pre-LN plus a final norm after the stack.
    variant: str = "prelayernorm"
    activation: str = "gelu"  # gelu is the exact (erf) gelu, as torch's default
    embeddings_scale: bool = True  # multiply token embeddings by sqrt(d_model)
    # Position ids start at this offset in the table (OPT: 2), and come from
    # cumsum(mask) - 1 so that left padding does not shift them.
    position_offset: int = 0
    layernorm_eps: float = 1e-5
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    pad_id: int = 0
    start_id: int = 1
    end_id: int = 2
    # Tokens that start the decoder: ParlAI's generator seeds __start__; the
    # bart agent (BB3-3B) seeds [__end__, __start__] and drops the first score.
    decoder_start: tuple[int, ...] = (1,)
    # ParlAI's TransformerGeneratorModel sets the __start__ logit to -1e20 (its
    # bart model and transformers' models do not).
    mask_start_logit: bool = False
    # Compute dtype of matmuls and activations (bfloat16 for training at scale);
    # LayerNorm, softmax and the logits stay float32, and parameters are stored
    # in param_dtype (keep float32: gradients and optimizer state follow it).
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Store each stack's layers stacked on a leading "layers" axis and apply them
    # with one lax.scan: compile time and program size independent of depth.
    # Checkpoint conversion still speaks per-layer names (convert.py unstacks).
    scan_layers: bool = False
    # jax.checkpoint policy applied per layer, one of REMAT_POLICIES.
    remat: str = "none"

    def __post_init__(self):
        checks = {
            "arch": (self.arch in ARCHS, f"one of {ARCHS}"),
            "variant": (self.variant in VARIANTS, f"one of {VARIANTS}"),
            "activation": (self.activation in ACTIVATIONS, f"one of {ACTIVATIONS}"),
            "d_model": (self.d_model > 0 and self.d_model % self.n_heads == 0, "a positive multiple of n_heads"),
            "n_decoder_layers": (self.n_decoder_layers > 0, "positive"),
            "n_encoder_layers": (
                (self.n_encoder_layers > 0) == (self.arch == "encoder_decoder"),
                "positive for encoder_decoder and 0 for decoder_only",
            ),
            "decoder_start": (len(self.decoder_start) >= 1, "at least one token"),
            "remat": (self.remat in REMAT_POLICIES, f"one of {REMAT_POLICIES}"),
            "dtype": (self.dtype in DTYPES, f"one of {DTYPES}"),
            "param_dtype": (self.param_dtype in DTYPES, f"one of {DTYPES}"),
        }
        bad = [f"{name} must be {rule} (got {getattr(self, name)!r})" for name, (ok, rule) in checks.items() if not ok]
        if bad:
            raise ValueError("invalid model config: " + "; ".join(bad))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# BB3-3B / R2C2 (ParlAI zoo bb3/bb3_3B, the `bart` model type with the
# prelayernorm variant): GPT-2 BPE dictionary, 50,257 + 4 specials padded to a
# multiple of 8 (UNVERIFIED against the real model.dict).
BB3_3B = ModelConfig(
    arch="encoder_decoder", vocab_size=50264, d_model=2048, n_heads=32, ffn_dim=8192,
    n_encoder_layers=22, n_decoder_layers=22, n_positions=1024, variant="prelayernorm",
    activation="gelu", embeddings_scale=True, decoder_start=(2, 1),
)
# BB1-3B (blender/blender_3B; HF BlenderbotForConditionalGeneration "facebook/blenderbot-3B").
BB1_3B = ModelConfig(
    arch="encoder_decoder", vocab_size=8008, d_model=2560, n_heads=32, ffn_dim=10240,
    n_encoder_layers=2, n_decoder_layers=24, n_positions=128, variant="prelayernorm",
    activation="gelu", embeddings_scale=True,
)
# BB3-30B / 175B: OPT decoders (metaseq); pad 1, bos = eos = 2.
_OPT = dict(arch="decoder_only", vocab_size=50272, n_encoder_layers=0, n_positions=2048,
            variant="prelayernorm", activation="relu", embeddings_scale=False, position_offset=2,
            pad_id=1, start_id=2, end_id=2, decoder_start=(2,))
BB3_30B = ModelConfig(d_model=7168, n_heads=56, ffn_dim=4 * 7168, n_decoder_layers=48, **_OPT)
BB3_175B = ModelConfig(d_model=12288, n_heads=96, ffn_dim=4 * 12288, n_decoder_layers=96, **_OPT)

PRESETS: dict[str, ModelConfig] = {
    "bb3_3b": BB3_3B,
    "bb1_3b": BB1_3B,
    "bb3_30b": BB3_30B,
    "bb3_175b": BB3_175B,
    # The CPU benchmark models (encoder-decoder, and a
    # decoder-only OPT of similar size: context + label = 160 positions).
    "bench_small": ModelConfig(vocab_size=8008, d_model=512, n_heads=8, ffn_dim=2048,
                               n_encoder_layers=2, n_decoder_layers=6, n_positions=512),
    "bench_small_opt": ModelConfig(d_model=512, n_heads=8, ffn_dim=2048, n_decoder_layers=6,
                                   **{**_OPT, "vocab_size": 8008, "n_positions": 512}),
    # Small models for tests and the laptop demo.
    "tiny": ModelConfig(vocab_size=2048, d_model=64, n_heads=4, ffn_dim=128,
                        n_encoder_layers=2, n_decoder_layers=2, n_positions=256),
    # The BB3 -> BB3x experiment's model on CPU (bb3x_jax/experiments/bb3x_table.py).
    "small": ModelConfig(vocab_size=4000, d_model=128, n_heads=4, ffn_dim=512,
                         n_encoder_layers=2, n_decoder_layers=2, n_positions=256),
    "tiny_opt": ModelConfig(d_model=64, n_heads=4, ffn_dim=256, n_decoder_layers=2, **{**_OPT, "vocab_size": 2048,
                                                                                        "n_positions": 256}),
}


def preset(name: str, **overrides) -> ModelConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base
