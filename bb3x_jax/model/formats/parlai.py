"""ParlAI checkpoints in and out, as ParlAI's ``TorchAgent.save`` writes them.

A ParlAI checkpoint is three files: ``model`` (torch-saved ``{"model":
state_dict, "optimizer": ..., ...}``), ``model.opt`` (the agent's options,
JSON) and ``model.dict`` (the dictionary). The architecture comes from the
options (ParlAI's option names); options this implementation cannot honour
fail by name instead of being ignored. Files this project wrote before it
wrote the three (``{"model": ..., "opt": ...}`` in one file) still load.
Weights may be fp16 or fp32; optimizer state is never read. Keys are ParlAI's
``TransformerGeneratorModel`` names, with the fusion-in-decoder prefixes
``seq2seq_encoder.`` / ``seq2seq_decoder.`` of BB3-3B's checkpoint accepted;
keys outside the generator (BB3's retriever) are listed in the load report,
never silently dropped.

``save_parlai`` writes the three files: the weights, the source checkpoint's
options with the architecture (and the truncation a run trained with) set,
and the source's dictionary unchanged, so that ParlAI's
``create_agent_from_model_file`` builds the same agent and loads the weights
strictly.

ParlAI checkpoints are Python pickles: they are read by the safe unpickler of
``bb3x_jax.model.formats.pickles`` (ParlAI's own files need nothing else).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np
from flax import nnx

from bb3x_jax.data import framing
from bb3x_jax.data.tokenizers import files as tokenizer_files
from bb3x_jax.model import transformer
from bb3x_jax.model.config import ACTIVATIONS, VARIANTS, ModelConfig
from bb3x_jax.model.formats import pickles, tables

FID_PREFIXES = {"seq2seq_encoder.": "encoder.", "seq2seq_decoder.": "decoder."}


@dataclasses.dataclass
class LoadReport:
    """What a ParlAI load did besides filling parameters."""

    path: str
    fid_prefixes: bool = False
    ignored_keys: list[str] = dataclasses.field(default_factory=list)  # outside the generator (e.g. retriever)
    opt: dict[str, Any] = dataclasses.field(default_factory=dict)  # the options the architecture came from
    opt_file: str = ""  # path.opt when the options came from there (ParlAI's own layout)


def _layers(opt: dict[str, Any], key: str) -> int:
    value = opt.get(key, -1)
    return int(value) if value is not None and int(value) > 0 else int(opt["n_layers"])


def config_from_opt(opt: dict[str, Any], vocab_size: int) -> ModelConfig:
    """Our config from ParlAI options (and the embedding matrix's row count)."""
    required = ("embedding_size", "n_heads", "ffn_size")
    missing = [k for k in required if k not in opt]
    if missing:
        raise tables.CheckpointMismatch(f"opt lacks {missing}")
    unsupported = []
    if not opt.get("learn_positional_embeddings", False):
        unsupported.append("learn_positional_embeddings=False (sinusoidal positions are not implemented)")
    if int(opt.get("n_segments", 0) or 0) != 0:
        unsupported.append(f"n_segments={opt['n_segments']} (segment embeddings are not implemented)")
    if float(opt.get("output_scaling", 1.0)) != 1.0:
        unsupported.append(f"output_scaling={opt['output_scaling']}")
    if opt.get("share_word_embeddings", True) is False:
        unsupported.append("share_word_embeddings=False")
    variant = opt.get("variant", "aiayn")
    if variant not in VARIANTS:
        unsupported.append(f"variant={variant!r} (known: {', '.join(VARIANTS)})")
    activation = opt.get("activation", "relu")
    if activation not in ACTIVATIONS:
        unsupported.append(f"activation={activation!r} (known: {', '.join(ACTIVATIONS)})")
    if unsupported:
        raise tables.CheckpointMismatch("unsupported ParlAI options: " + "; ".join(unsupported))
    n_positions = opt.get("n_positions") or max(
        int(opt.get("truncate") or 0), int(opt.get("text_truncate") or 0), int(opt.get("label_truncate") or 0), 1024
    )
    bart = framing.is_bart_agent(opt)
    return ModelConfig(
        arch="encoder_decoder",
        vocab_size=vocab_size,
        d_model=int(opt["embedding_size"]),
        n_heads=int(opt["n_heads"]),
        ffn_dim=int(opt["ffn_size"]),
        n_encoder_layers=_layers(opt, "n_encoder_layers"),
        n_decoder_layers=_layers(opt, "n_decoder_layers"),
        n_positions=int(n_positions),
        variant=variant,
        activation=activation,
        embeddings_scale=bool(opt.get("embeddings_scale", True)),
        dropout=float(opt.get("dropout", 0.0) or 0.0),
        attention_dropout=float(opt.get("attention_dropout", 0.0) or 0.0),
        activation_dropout=float(opt.get("relu_dropout", 0.0) or 0.0),
        decoder_start=(2, 1) if bart else (1,),
        mask_start_logit=not bart,
    )


def opt_from_config(cfg: ModelConfig) -> dict[str, Any]:
    """ParlAI options that rebuild ``cfg`` (the architecture part of an opt file)."""
    if cfg.arch != "encoder_decoder":
        raise ValueError("ParlAI checkpoints hold encoder-decoder models; save OPT models as transformers directories")
    return {
        "model": "bart" if tuple(cfg.decoder_start) == (cfg.end_id, cfg.start_id) else "transformer/generator",
        "embedding_size": cfg.d_model,
        "n_heads": cfg.n_heads,
        "ffn_size": cfg.ffn_dim,
        "n_layers": cfg.n_decoder_layers,
        "n_encoder_layers": cfg.n_encoder_layers,
        "n_decoder_layers": cfg.n_decoder_layers,
        "n_positions": cfg.n_positions,
        "variant": cfg.variant,
        "activation": cfg.activation,
        "embeddings_scale": cfg.embeddings_scale,
        "learn_positional_embeddings": True,
        "n_segments": 0,
        "output_scaling": 1.0,
        "share_word_embeddings": True,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "relu_dropout": cfg.activation_dropout,
    }


def table(cfg: ModelConfig) -> tuple[list[tables.Row], dict[str, str]]:
    """Our parameters under ParlAI's TransformerGeneratorModel names."""
    lin = ("q_lin", "k_lin", "v_lin", "out_lin")
    rows: list[tables.Row] = [("embeddings", "embeddings.weight", None)]

    def attention(ours: str, theirs: str):
        return tables.attention_rows(ours, theirs, *lin)

    def norm(ours: str, theirs: str):
        return tables.norm_rows(ours, theirs)

    def ffn(ours: str, theirs: str):
        return [
            (f"{ours}.lin1.kernel", f"{theirs}.lin1.weight", "T"),
            (f"{ours}.lin1.bias", f"{theirs}.lin1.bias", None),
            (f"{ours}.lin2.kernel", f"{theirs}.lin2.weight", "T"),
            (f"{ours}.lin2.bias", f"{theirs}.lin2.bias", None),
        ]

    for stack in ("encoder", "decoder"):
        rows.append((f"{stack}.position_embeddings", f"{stack}.position_embeddings.weight", None))
        if cfg.variant != "aiayn":
            rows += norm(f"{stack}.norm_embeddings", f"{stack}.norm_embeddings")
    for i in range(cfg.n_encoder_layers):
        p = f"encoder.layers.{i}"
        rows += attention(f"{p}.attention", f"{p}.attention")
        rows += norm(f"{p}.norm1", f"{p}.norm1") + norm(f"{p}.norm2", f"{p}.norm2") + ffn(f"{p}.ffn", f"{p}.ffn")
    for i in range(cfg.n_decoder_layers):
        p = f"decoder.layers.{i}"
        rows += attention(f"{p}.self_attention", f"{p}.self_attention")
        rows += attention(f"{p}.encoder_attention", f"{p}.encoder_attention")
        for n in ("norm1", "norm2", "norm3"):
            rows += norm(f"{p}.{n}", f"{p}.{n}")
        rows += ffn(f"{p}.ffn", f"{p}.ffn")
    tied = {"encoder.embeddings.weight": "embeddings.weight", "decoder.embeddings.weight": "embeddings.weight"}
    return rows, tied


def _split_generator_keys(state: dict[str, Any], report: LoadReport) -> dict[str, Any]:
    """Strips FiD prefixes; moves keys outside the generator into the report.

    ``START`` is TorchGeneratorModel's buffer holding the start token id, not a
    parameter; it is checked by the caller and dropped here.
    """
    state = {k: v for k, v in state.items() if k != "START"}
    if any(k.startswith(tuple(FID_PREFIXES)) for k in state):
        report.fid_prefixes = True
        out = {}
        for key, value in state.items():
            for prefix, plain in FID_PREFIXES.items():
                if key.startswith(prefix):
                    out[plain + key[len(prefix) :]] = value
                    break
            else:
                if key.startswith(("embeddings.", "encoder.", "decoder.")):
                    out[key] = value
                else:
                    report.ignored_keys.append(key)
        return out
    return dict(state)


def read_checkpoint(path: str, *, trust_pickle: bool = False) -> tuple[Any, dict[str, Any], str]:
    """(the torch-saved dict, the options, the options file or '') of a ParlAI model file.

    The options are ``path.opt`` (ParlAI's layout); a file without one must
    hold them itself (this project's earlier single-file layout). Read by the
    safe unpickler unless ``trust_pickle`` (``pickles``), memory-mapped.
    """
    checkpoint = pickles.load(path, trust_pickle=trust_pickle)  # tensors are read as they are used
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise tables.CheckpointMismatch(f"{path}: not a ParlAI checkpoint (a dict with 'model')")
    if os.path.isfile(tokenizer_files.parlai_opt_path(path)):
        return checkpoint, tokenizer_files.read_parlai_opt(path), tokenizer_files.parlai_opt_path(path)
    if isinstance(checkpoint.get("opt"), dict):
        return checkpoint, dict(checkpoint["opt"]), ""
    tokenizer_files.read_parlai_opt(path)  # raises, naming the missing path.opt
    raise AssertionError("unreachable")


def load_parlai(path: str, *, rngs: nnx.Rngs | None = None, trust_pickle: bool = False):
    """(model, config, report) from a ParlAI checkpoint (model file; ``.opt`` beside it)."""
    checkpoint, opt, opt_file = read_checkpoint(path, trust_pickle=trust_pickle)
    report = LoadReport(path=path, opt=opt, opt_file=opt_file)
    state = _split_generator_keys(checkpoint["model"], report)
    if "embeddings.weight" not in state:
        raise tables.CheckpointMismatch(f"{path}: no 'embeddings.weight' (shared embeddings) in the model state")
    cfg = config_from_opt(opt, vocab_size=int(state["embeddings.weight"].shape[0]))
    start = checkpoint["model"].get("START")
    if start is not None and [int(x) for x in tables.to_numpy(start).reshape(-1)] != [cfg.start_id]:
        raise tables.CheckpointMismatch(f"{path}: START buffer {start} differs from the start id {cfg.start_id}")
    with nnx.use_eager_sharding(False):  # shapes only: every parameter is filled from the file
        model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=rngs or nnx.Rngs(0)))
    tables.load_state_dict(model, state, *table(cfg))
    return model, cfg, report


def state_dict_for_parlai(model, cfg: ModelConfig) -> dict[str, np.ndarray]:
    return tables.export_state_dict(model, *table(cfg))


# Options of a source checkpoint that name another machine's files or run; ParlAI fills the
# missing ones with its defaults when it loads the export (as for its own saved options).
_STALE_OPT_KEYS = ("datapath", "parlai_home", "download_path", "starttime", "override")


def export_opt(cfg: ModelConfig, path: str, base_opt: dict[str, Any] | None = None,
               truncation: tuple[int, int] | None = None) -> dict[str, Any]:
    """The ``.opt`` of an export: the source's options, with this model's architecture, the export's
    own file names, and (after training here) the truncation the model was trained with."""
    opt = {k: v for k, v in (base_opt or {}).items() if k not in _STALE_OPT_KEYS}
    opt.update(opt_from_config(cfg))  # its model: bart or transformer/generator, as the architecture says
    source_model = (base_opt or {}).get("model")
    if source_model and source_model != opt["model"]:
        # An agent from ParlAI's projects (BB3-3B's fusion-in-decoder search agents generate
        # with bart): the export is its generator alone, loadable by ParlAI's core agent.
        opt["bb3x_source_model"] = source_model
    opt["model_file"] = os.path.abspath(path)
    opt["dict_file"] = os.path.abspath(path) + ".dict"
    opt["init_model"] = None  # the weights are the model file's
    opt.setdefault("inference", "greedy")  # ParlAI's generator agents refuse options without a decoding method
    opt.setdefault("beam_size", 1)
    if truncation is not None:
        opt["text_truncate"], opt["label_truncate"] = int(truncation[0]), int(truncation[1])
    return opt


def save_parlai(model, cfg: ModelConfig, path: str, *, dict_file: str, base_opt: dict[str, Any] | None = None,
                truncation: tuple[int, int] | None = None, bpe_files: tuple[str, str] | None = None) -> list[str]:
    """Writes ``path``, ``path.opt`` and ``path.dict`` (a copy of ``dict_file``, unchanged) as ParlAI's
    ``agent.save`` lays them out; ``bpe_files`` (GPT-2's ``encoder.json`` / ``vocab.bpe``) are copied
    beside them so that ``bb3x_jax.load`` finds them (ParlAI itself reads them from its datapath).
    Returns the files written."""
    import torch  # deferred: torch is needed only to read PyTorch checkpoints

    state = {k: torch.from_numpy(v) for k, v in state_dict_for_parlai(model, cfg).items()}
    # Tied entries share one tensor, as in a ParlAI model's state dict.
    state["encoder.embeddings.weight"] = state["decoder.embeddings.weight"] = state["embeddings.weight"]
    state["START"] = torch.tensor([cfg.start_id])
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    torch.save({"model": state}, path)
    with open(tokenizer_files.parlai_opt_path(path), "w") as f:
        json.dump(export_opt(cfg, path, base_opt, truncation), f, indent=4)
    shutil.copyfile(dict_file, path + ".dict")
    written = [path, tokenizer_files.parlai_opt_path(path), path + ".dict"]
    for source, name in zip(bpe_files or (), ("encoder.json", "vocab.bpe")):
        if os.path.abspath(source) != os.path.join(folder, name):
            shutil.copyfile(source, os.path.join(folder, name))
        written.append(os.path.join(folder, name))
    return written
