"""transformers directories (Blenderbot, OPT) in and out.

Import reads ``config.json`` and the safetensors / ``pytorch_model.bin``
weights directly (no transformers needed); export writes a directory that
``from_pretrained`` loads, by filling transformers' own model class with our
weights through the same name table (so the check that every key is consumed
runs both ways).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from bb3x_jax.model import transformer
from bb3x_jax.model.config import ModelConfig
from bb3x_jax.model.formats import pickles, tables

_GELU_NAMES = ("gelu", "gelu_python")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our config for a transformers ``config.json`` dict (model_type blenderbot or opt)."""
    kind = hf.get("model_type")
    act = hf.get("activation_function", "gelu")
    activation = "gelu" if act in _GELU_NAMES else act
    if kind == "blenderbot":
        if hf["encoder_attention_heads"] != hf["decoder_attention_heads"] or hf["encoder_ffn_dim"] != hf["decoder_ffn_dim"]:
            raise ValueError("encoder and decoder must share heads and ffn size")
        return ModelConfig(
            arch="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
            n_heads=hf["encoder_attention_heads"], ffn_dim=hf["encoder_ffn_dim"],
            n_encoder_layers=hf["encoder_layers"], n_decoder_layers=hf["decoder_layers"],
            n_positions=hf["max_position_embeddings"], variant="prelayernorm", activation=activation,
            embeddings_scale=bool(hf.get("scale_embedding", False)), pad_id=hf.get("pad_token_id", 0),
            start_id=hf.get("bos_token_id", 1), end_id=hf.get("eos_token_id", 2),
            decoder_start=(hf.get("decoder_start_token_id", 1),),
            dropout=hf.get("dropout", 0.0), attention_dropout=hf.get("attention_dropout", 0.0),
            activation_dropout=hf.get("activation_dropout", 0.0),
        )
    if kind == "opt":
        d = hf["hidden_size"]
        unsupported = {
            "do_layer_norm_before": (hf.get("do_layer_norm_before", True), True),
            "word_embed_proj_dim": (hf.get("word_embed_proj_dim") or d, d),
            "enable_bias": (hf.get("enable_bias", True), True),
            "_remove_final_layer_norm": (hf.get("_remove_final_layer_norm", False), False),
        }
        bad = {k: v for k, (v, want) in unsupported.items() if v != want}
        if bad:
            raise ValueError(f"unsupported OPT options (BB3 uses pre-LN OPT without projections): {bad}")
        return ModelConfig(
            arch="decoder_only", vocab_size=hf["vocab_size"], d_model=d, n_heads=hf["num_attention_heads"],
            ffn_dim=hf["ffn_dim"], n_encoder_layers=0, n_decoder_layers=hf["num_hidden_layers"],
            n_positions=hf["max_position_embeddings"], variant="prelayernorm", activation=activation,
            embeddings_scale=False, position_offset=2, pad_id=hf.get("pad_token_id", 1),
            start_id=hf.get("bos_token_id", 2), end_id=hf.get("eos_token_id", 2),
            decoder_start=(hf.get("bos_token_id", 2),), dropout=hf.get("dropout", 0.0),
            attention_dropout=hf.get("attention_dropout", 0.0),
        )
    raise ValueError(f"unsupported transformers model_type {kind!r} (blenderbot or opt)")


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers config fields for ``cfg`` (inverse of config_from_hf)."""
    if cfg.arch == "encoder_decoder":
        if cfg.variant != "prelayernorm" or len(cfg.decoder_start) != 1:
            raise ValueError("transformers' Blenderbot holds prelayernorm models with a one-token decoder start; "
                             "export this model as a ParlAI checkpoint instead")
        return dict(
            model_type="blenderbot", vocab_size=cfg.vocab_size, d_model=cfg.d_model,
            encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
            encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
            encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, max_position_embeddings=cfg.n_positions,
            activation_function=cfg.activation, scale_embedding=cfg.embeddings_scale, pad_token_id=cfg.pad_id,
            bos_token_id=cfg.start_id, eos_token_id=cfg.end_id, decoder_start_token_id=cfg.decoder_start[0],
            forced_eos_token_id=cfg.end_id, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
            activation_dropout=cfg.activation_dropout,
        )
    return dict(
        model_type="opt", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_decoder_layers,
        ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.n_positions,
        do_layer_norm_before=True, word_embed_proj_dim=cfg.d_model, activation_function=cfg.activation,
        pad_token_id=cfg.pad_id, bos_token_id=cfg.start_id, eos_token_id=cfg.end_id, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
    )


def table(cfg: ModelConfig):
    return tables.hf_blenderbot_table(cfg) if cfg.arch == "encoder_decoder" else tables.hf_opt_table(cfg)


class _SafetensorsFiles(Mapping):
    """The tensors of a directory's safetensors files, read one by one on access."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open  # deferred: optional, only for this format

        self._handles = [safe_open(f, framework="numpy") for f in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_weights(path: str, *, trust_pickle: bool = False) -> Mapping[str, Any]:
    """The tensors of a transformers directory, lazily: safetensors preferred (read per
    tensor), else ``.bin`` files memory-mapped by torch (a second copy is never made),
    by the safe unpickler unless ``trust_pickle`` (``pickles``)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return _SafetensorsFiles(files)
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    out: dict[str, Any] = {}
    for file in files:
        out.update(pickles.load(file, trust_pickle=trust_pickle))
    return out


def load_hf(path: str, *, rngs: nnx.Rngs | None = None, trust_pickle: bool = False):
    """(model, config) from a transformers Blenderbot or OPT directory."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    with nnx.use_eager_sharding(False):  # shapes only: every parameter is filled from the file
        model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=rngs or nnx.Rngs(0)))
    tables.load_state_dict(model, read_hf_weights(path, trust_pickle=trust_pickle), *table(cfg))
    return model, cfg


def state_dict_for_hf(model, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameters under transformers' keys (tied aliases and the zero output bias included)."""
    out = tables.export_state_dict(model, *table(cfg))
    if cfg.arch == "encoder_decoder":
        out["final_logits_bias"] = np.zeros((1, cfg.vocab_size), np.float32)
    return out


def save_hf(model, cfg: ModelConfig, path: str) -> None:
    """Writes a transformers directory that ``from_pretrained`` loads (safetensors).

    transformers has no equivalent of ParlAI's generator start-logit mask
    (``mask_start_logit``): a model loaded from a ParlAI generator checkpoint
    exports with every other logit unchanged and the __start__ logit unmasked.
    """
    import torch  # deferred: torch is needed only to read PyTorch checkpoints
    import transformers  # deferred: optional, only for this format

    fields = hf_config_dict(cfg)
    kind = fields.pop("model_type")
    if kind == "blenderbot":
        hf_model = transformers.BlenderbotForConditionalGeneration(transformers.BlenderbotConfig(**fields))
    else:
        hf_model = transformers.OPTForCausalLM(transformers.OPTConfig(**fields))
    tensors = {k: torch.from_numpy(v) for k, v in state_dict_for_hf(model, cfg).items()}
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise tables.CheckpointMismatch(f"transformers model disagrees: missing {missing}, unexpected {unexpected}")
    hf_model.save_pretrained(path)
