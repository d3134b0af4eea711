"""Tiny random transformers models with odd sizes, our configs for the same shapes, and how the
tests build and call our models.

Our models are called jitted, never op by op: on XLA:CPU an eager call compiles
each operation as a program of its own (hundreds per forward pass, each taking
tens of milliseconds), a jitted one compiles one program per shape, which the
suite's persistent compilation cache then shares between tests.
"""

from __future__ import annotations

import jax
import torch
from transformers import BlenderbotConfig, BlenderbotForConditionalGeneration, OPTConfig, OPTForCausalLM

from bb3x_jax.model import build, config


def forward(model, *args):
    """``model(*args)`` in one compiled program (a model passed as an argument is a pytree)."""
    return jax.jit(lambda m, *a: m(*a))(model, *args)


def tiny_blenderbot(seed: int = 0, *, scale_embedding: bool = True, positions: int = 32):
    torch.manual_seed(seed)
    hf_config = BlenderbotConfig(
        vocab_size=67, d_model=24, encoder_layers=2, decoder_layers=3, encoder_attention_heads=3,
        decoder_attention_heads=3, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=positions,
        activation_function="gelu", scale_embedding=scale_embedding, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    ours = config.ModelConfig(vocab_size=67, d_model=24, n_heads=3, ffn_dim=40, n_encoder_layers=2,
                              n_decoder_layers=3, n_positions=positions, embeddings_scale=scale_embedding)
    return BlenderbotForConditionalGeneration(hf_config).eval(), ours


def tiny_opt(seed: int = 0):
    torch.manual_seed(seed)
    hf_config = OPTConfig(
        vocab_size=71, hidden_size=24, num_hidden_layers=2, ffn_dim=44, num_attention_heads=3,
        max_position_embeddings=40, pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0,
        attention_dropout=0.0, activation_function="relu", do_layer_norm_before=True, word_embed_proj_dim=24,
    )
    ours = config.preset("tiny_opt", vocab_size=71, d_model=24, n_heads=3, ffn_dim=44, n_decoder_layers=2,
                         n_positions=40)
    return OPTForCausalLM(hf_config).eval(), ours


def new_model(cfg, seed: int = 1):
    """A randomly initialised model of ``cfg``, built op by op: the tests build dozens of configs, and
    eager initialisation reuses its per-shape programs across them, where a jitted initialiser is one
    new program (seconds of compiling) per config."""
    return build.construct(cfg, seed)


def tiny_blenderbot_small(seed: int = 0):
    """transformers' BlenderbotSmall: ParlAI's xlm variant (post-LN, embedding norms)."""
    from transformers import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration

    torch.manual_seed(seed)
    hf_config = BlenderbotSmallConfig(
        vocab_size=61, d_model=20, encoder_layers=2, decoder_layers=2, encoder_attention_heads=5,
        decoder_attention_heads=5, encoder_ffn_dim=36, decoder_ffn_dim=36, max_position_embeddings=24,
        activation_function="gelu", scale_embedding=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    model = BlenderbotSmallForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        # transformers' BlenderbotSmall decoder does not multiply by sqrt(d) before its
        # embedding norm (ParlAI does); LayerNorm makes that scale irrelevant except
        # through eps, so embeddings of unit scale keep the eps effect below 1e-6.
        model.model.shared.weight.normal_(0.0, 1.0)
        for name, param in model.named_parameters():  # non-trivial norms
            if "layernorm_embedding" in name or "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    ours = config.ModelConfig(vocab_size=61, d_model=20, n_heads=5, ffn_dim=36, n_encoder_layers=2,
                              n_decoder_layers=2, n_positions=24, variant="xlm")
    return model, ours


def _chatty(hf, end_id: int, end_bias: float, seed: int):
    """Re-draws the matrices at a scale where tokens mix, and leans the final states
    toward the end token, so that generations vary and some of them end early."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim == 2 and "embed_positions" not in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
        end = hf.get_input_embeddings().weight[end_id]
        final_norm = hf.model.decoder.layer_norm if hasattr(hf.model.decoder, "layer_norm") \
            else hf.model.decoder.final_layer_norm
        final_norm.bias += end_bias * end / end.norm()
    return hf


def chatty_blenderbot(end_bias: float = 1.5, seed: int = 0):
    """A tiny Blenderbot (no embedding scale) whose greedy and beam outputs vary and sometimes end."""
    hf, ours = tiny_blenderbot(seed, scale_embedding=False, positions=40)
    return _chatty(hf, 2, end_bias, seed), ours


def chatty_opt(end_bias: float = 1.5, seed: int = 0, pad_bias: float = 0.0):
    """A tiny OPT whose generations vary and sometimes end (and, with ``pad_bias``, often
    produce the pad id 1 as a token)."""
    hf, ours = tiny_opt(seed)
    hf = _chatty(hf, 2, end_bias, seed)
    if pad_bias:
        with torch.no_grad():
            pad = hf.get_input_embeddings().weight[1]
            hf.model.decoder.final_layer_norm.bias += pad_bias * pad / pad.norm()
    return hf, ours
