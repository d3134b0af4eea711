"""metaseq checkpoints in: the OPT decoders of BB3-30B / BB3-175B as metaseq saved them.

A metaseq checkpoint file is a ``torch.save``-d dict with the weights under
``"model"`` and the options under ``"cfg"`` (``cfg["model"]``: the model
section, a dict, ``argparse.Namespace`` or omegaconf container) or, in older
files, ``"args"`` (a Namespace). What is read (facts checked against
facebookresearch/metaseq, ``metaseq/models/transformer_lm.py``,
``models/transformer_decoder.py``, ``modules/transformer_decoder_layer.py``,
``modules/multihead_attention.py``, ``modules/megatron/mpu/layers.py``,
``distributed/stitch_fsdp_ckpt.py``, ``scripts/reshard_mp.py``,
``scripts/reshard_fsdp.py``, ``scripts/convert_to_singleton.py``):

- Keys: ``decoder.embed_tokens.weight``, ``decoder.embed_positions.weight``
  (``max_target_positions + pad + 1`` rows: positions start at pad + 1 = 2),
  per layer ``self_attn.{q,k,v,out}_proj`` or a fused ``self_attn.qkv_proj``
  whose rows are K, V, Q (split in that order by the attention's forward and by
  metaseq's own resharding), ``self_attn_layer_norm``, ``fc1``, ``fc2``,
  ``final_layer_norm``; the final ``decoder.layer_norm``; and
  ``decoder.output_projection.weight``, the tied output embedding (must equal
  ``embed_tokens``). Buffers (``decoder.version``, ``*._float_tensor``) are
  ignored and listed in the report. A bare decoder state dict (no ``decoder.``
  prefix) and a wrapped one (``model.decoder.``) are accepted.
- Model-parallel parts (``<stem>-model_part-<i>.pt``, Megatron layout):
  column-parallel ``q/k/v_proj``, ``qkv_proj`` and ``fc1`` (weights and biases)
  are split on the output dim (dim 0; a fused part holds its own K, V, Q
  blocks), row-parallel ``out_proj`` / ``fc2`` weights on the input dim
  (dim 1) with replicated biases, the vocab-parallel ``embed_tokens`` (and its
  tied ``output_projection``) on the vocab dim; layer norms and positions are
  replicated (taken from part 0; a part that differs is reported, as metaseq
  itself only logs it). ``load_metaseq`` takes one part (finds its siblings) or
  the folder; a missing part is an error.
- FSDP flat parameters (``...flat_param_<n>`` keys, optionally split over
  ``-shard<k>.pt`` files per part) are unflattened with the file's
  ``shard_metadata`` (names, shapes, numels, padding per flat parameter; the
  layout ``metaseq.scripts.reshard_fsdp`` reads).

Options that change the computation and are not implemented fail by name
(post-LN, non-relu activations, sinusoidal or ALiBi positions, an untied output
projection, input/output projections, extra norms, no biases ...); missing,
unexpected or mis-shaped keys fail listing them all (``CheckpointMismatch``).

Memory: files are opened memory-mapped (``torch.load(mmap=True)``; the legacy
non-zip format is read whole), the network is built shape-only (no random
initialisation) and filled one group at a time (the top-level tensors, then
each layer): only that group's tensors are materialised, as owned copies of the
mapped bytes or as the merge of their model-parallel / FSDP pieces, then
stored in the parameter dtype and dropped. No full second copy of the weights
ever exists; peak = the network + about one group (+ mapped file pages, which
the OS can drop). Measured on a 51M-parameter fp32 checkpoint (198 MB): peak
anonymous memory +246 MB consolidated and +244 MB from 2 model-parallel parts,
+198 MB after the load; no parameter aliases the file (jax on CPU would
otherwise share aligned host buffers, and a later overwrite of the file would
change or fault the model). With ``scan_layers`` (layers stacked in one
array) the network is built with its random init and filled in one group, as
the other loaders do: more memory.

Checkpoints are Python pickles, read by the safe unpickler of
``bb3x_jax.model.formats.pickles`` (tensors, plain values, ``argparse.Namespace``
options). A file whose options or ``extra_state`` were pickled as objects
(omegaconf containers, metaseq classes) is refused naming the class; trusted
(``trust_pickle``), such classes are read as inert stand-ins, so neither
package is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import pickle
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from bb3x_jax.model import transformer
from bb3x_jax.model.config import ModelConfig, preset
from bb3x_jax.model.formats import pickles, tables

CheckpointMismatch = tables.CheckpointMismatch

# <stem>[-model_part-<i>][-shard<k>].pt
_NAME_RE = re.compile(r"^(?P<stem>.+?)(?:-model_part-(?P<part>\d+))?(?:-shard(?P<shard>\d+))?\.pt$")
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_FLAT_RE = re.compile(r"(^|\.)flat_param_\d+$")
_IGNORED_RE = re.compile(r"(^|\.)(version|_float_tensor)$")
_COLUMN_RE = re.compile(r"\.(fc1|q_proj|k_proj|v_proj)\.(weight|bias)$")
_ROW_WEIGHT_RE = re.compile(r"\.(fc2|out_proj)\.weight$")
_VOCAB_KEYS = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
_EMBED, _OUTPUT = _VOCAB_KEYS
# metaseq archs whose registered defaults set activation_fn="gelu" (transformer_lm.py).
_GELU_ARCHS = ("transformer_lm_megatron", "transformer_lm_gpt", "transformer_lm_gpt2_tiny")
_PAD = 1  # metaseq's Dictionary: bos 0, pad 1, eos 2, unk 3; positions start at pad + 1


@dataclasses.dataclass
class LoadReport:
    """What a metaseq load found besides the parameters."""

    path: str
    files: list[str] = dataclasses.field(default_factory=list)
    model_parallel: int = 1
    fsdp_shards: int = 1  # per model-parallel part
    flat: bool = False  # FSDP flat parameters were unflattened
    fused_qkv: bool = False  # qkv_proj (K, V, Q) was split
    key_prefix: str = ""  # "" | "added decoder." | "stripped model."
    ignored_keys: list[str] = dataclasses.field(default_factory=list)  # buffers, not parameters
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the model options read
    warnings: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------
# Reading files: the safe unpickler, or (trusted files) a tolerant one; memory-mapped.


class _StandIn:
    """An object of a class that could not be imported (kept as its pickled state)."""

    _qualified = "?"
    _args: tuple = ()
    _state: Any = None

    def __init__(self, *args, **kwargs):  # pickle usually rebuilds with __new__ and __setstate__ only
        self._args = args

    def __setstate__(self, state):
        self._state = state

    def __repr__(self):
        return f"<unimported {self._qualified}>"


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StandIn,), {"_qualified": f"{module}.{name}"})


_PICKLE = types.SimpleNamespace(Unpickler=_TolerantUnpickler, load=lambda f, **kw: _TolerantUnpickler(f, **kw).load(),
                                __name__="bb3x_jax_tolerant_pickle")


def _torch_load(path: str, *, mmap_only: bool = False, trust_pickle: bool = False):
    """The file by the safe unpickler (``pickles.load``); trusted files by the tolerant one, which
    keeps objects of classes that cannot be imported as their pickled state."""
    return pickles.load(path, trust_pickle=trust_pickle, pickle_module=_PICKLE, mmap_only=mmap_only)


def _is_metaseq_dict(checkpoint) -> bool:
    return (isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping) and "opt" not in checkpoint
            and ("cfg" in checkpoint or "args" in checkpoint))


def is_metaseq_file(path: str, *, trust_pickle: bool = False) -> bool:
    """Whether ``path`` is a metaseq checkpoint (a cheap memory-mapped peek; False
    for files torch cannot memory-map, which ``load`` then reads the slow way, and
    for files the safe unpickler refuses, which ``load`` then names)."""
    try:
        return _is_metaseq_dict(_torch_load(path, mmap_only=True, trust_pickle=trust_pickle))
    except Exception:  # noqa: BLE001 - anything unreadable is simply not ours
        return False


def is_metaseq_dir(path: str, *, trust_pickle: bool = False) -> bool:
    """Whether the folder holds metaseq checkpoint file(s) (one peek)."""
    names = sorted(n for n in os.listdir(path) if _NAME_RE.match(n))
    return bool(names) and is_metaseq_file(os.path.join(path, names[0]), trust_pickle=trust_pickle)


def checkpoint_files(path: str) -> list[list[str]]:
    """The files of one checkpoint as ``files[part][shard]``.

    ``path`` is a file (its model-parallel / FSDP siblings are found by name)
    or a folder holding exactly one checkpoint (one stem).
    """
    if os.path.isdir(path):
        folder = path
        found = [n for n in sorted(os.listdir(folder)) if _NAME_RE.match(n)]
        stems = sorted({_NAME_RE.match(n)["stem"] for n in found})
        if not stems:
            raise FileNotFoundError(f"{path}: no *.pt checkpoint files")
        if len(stems) > 1:
            raise CheckpointMismatch(f"{path}: several checkpoints ({', '.join(stems)}); pass one file instead")
        stem = stems[0]
    else:
        folder, name = os.path.split(path)
        match = _NAME_RE.match(name)
        if match is None or (match["part"] is None and match["shard"] is None):
            return [[path]]
        stem = match["stem"]
        found = [n for n in sorted(os.listdir(folder or ".")) if _NAME_RE.match(n)]
    table: dict[int, dict[int, str]] = {}
    kinds = set()
    for name in found:
        m = _NAME_RE.match(name)
        if m["stem"] != stem:
            continue
        kinds.add((m["part"] is None, m["shard"] is None))
        part = int(m["part"] or 0)
        shard = int(m["shard"] or 0)
        table.setdefault(part, {})[shard] = os.path.join(folder, name)
    if len(kinds) > 1:
        raise CheckpointMismatch(f"{path}: files of {stem!r} mix naming schemes (with and without -model_part-/-shard)")
    problems = []
    if sorted(table) != list(range(len(table))):
        problems.append(f"model-parallel parts found: {sorted(table)}, expected 0..{max(table)}")
    shard_counts = {len(s) for s in table.values()}
    for part, shards in table.items():
        if sorted(shards) != list(range(len(shards))):
            problems.append(f"part {part}: FSDP shards found {sorted(shards)}, expected 0..{max(shards)}")
    if len(shard_counts) > 1:
        problems.append(f"parts have different FSDP shard counts {sorted(shard_counts)}")
    if problems:
        raise CheckpointMismatch(f"{path}: incomplete checkpoint {stem!r}: " + "; ".join(problems))
    return [[table[p][s] for s in sorted(table[p])] for p in sorted(table)]


# ---------------------------------------------------------------------------
# Options.


def _plain(value, depth: int = 0):
    """dicts / Namespaces / omegaconf stand-ins -> plain dicts and values."""
    if depth > 20:
        return value
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, _StandIn):
        state = value._state if isinstance(value._state, Mapping) else {}
        if "_content" in state:  # an omegaconf container: {"_content": {key: node}}
            return _plain(state["_content"], depth + 1)
        if "_val" in state:  # an omegaconf value node
            return _plain(state["_val"], depth + 1)
        if value._args and len(value._args) == 1:  # e.g. an enum rebuilt from its value
            return _plain(value._args[0], depth + 1)
        return {k: _plain(v, depth + 1) for k, v in state.items()} if state else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, depth + 1) for v in value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def model_options(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model options of a metaseq checkpoint as a plain dict, ``${a.b}``
    interpolations resolved against the whole cfg (they survive ``to_container``)."""
    cfg = _plain(checkpoint.get("cfg")) or {}
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not model:
        model = _plain(checkpoint.get("args")) or {}
        if not isinstance(model, dict):
            raise CheckpointMismatch("the checkpoint has neither cfg['model'] nor args to read the architecture from")
    root = cfg if isinstance(cfg, dict) and cfg else {"model": model}

    def resolve(value, depth=0):
        if isinstance(value, str) and depth < 10:
            m = re.fullmatch(r"\$\{([\w.]+)\}", value.strip())
            if m:
                node: Any = root
                for part in m[1].split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                return resolve(node, depth + 1)
        return value

    out = {k: resolve(v) for k, v in model.items()}
    common = root.get("common") if isinstance(root.get("common"), dict) else {}
    if out.get("model_parallel_size") is None and common.get("model_parallel_size") is not None:
        out["model_parallel_size"] = common["model_parallel_size"]
    return out


def _unsupported(opts: Mapping[str, Any], d_model: int) -> list[str]:
    """Options that change the math and that this network does not implement."""
    bad = []

    def on(name):
        return bool(opts.get(name)) and opts.get(name) not in ("False", "false", "0")

    if opts.get("decoder_normalize_before") is False:
        bad.append("decoder_normalize_before=False (post-LN layers; this network is pre-LN)")
    activation = activation_of(opts)
    if activation != "relu":
        why = ("metaseq's 'gelu' is the erf gelu in early metaseq and the tanh approximation later"
               if activation == "gelu" else "not implemented")
        bad.append(f"activation_fn={activation!r} (only relu is supported: {why})")
    if opts.get("decoder_learned_pos") is False:
        bad.append("decoder_learned_pos=False (sinusoidal positions are not implemented)")
    if on("alibi"):
        bad.append("alibi=True (ALiBi attention biases are not implemented)")
    if opts.get("share_decoder_input_output_embed") is False:
        bad.append("share_decoder_input_output_embed=False (an untied output projection is not implemented)")
    for name in ("decoder_input_dim", "decoder_output_dim"):
        if opts.get(name) not in (None, d_model):
            bad.append(f"{name}={opts[name]} != decoder_embed_dim={d_model} (project_in/out_dim are not implemented)")
    for name, what in (("scale_fc", "an FFN layer norm"), ("scale_attn", "an attention layer norm"),
                       ("scale_heads", "per-head scales"), ("use_stable_embedding", "an embedding layer norm"),
                       ("layernorm_embedding", "an embedding layer norm"),
                       ("no_decoder_final_norm", "no final layer norm"), ("disable_bias", "projections without bias"),
                       ("disable_affine_ln", "layer norms without weight and bias"),
                       ("adaptive_softmax_cutoff", "an adaptive softmax")):
        if on(name):
            bad.append(f"{name}={opts[name]!r} ({what} is not implemented)")
    doc_sep = opts.get("self_attn_doc_sep")
    if doc_sep not in (None, -1, "-1"):
        bad.append(f"self_attn_doc_sep={doc_sep} (document-reset attention and positions are not implemented)")
    return bad


def activation_of(opts: Mapping[str, Any]) -> str:
    """activation_fn, or metaseq's registered default for the arch when absent."""
    activation = opts.get("activation_fn")
    if activation is None:
        arch = opts.get("_name") or opts.get("arch") or ""
        activation = "gelu" if arch in _GELU_ARCHS else "relu"
    return str(activation)


def config_from_metaseq(opts: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                        **overrides) -> tuple[ModelConfig, list[str]]:
    """(our config, warnings) from the model options and the merged tensor shapes.

    Sizes come from the weights and are checked against the options; the
    conventions (pad 1, bos = eos = 2, positions offset 2, relu, pre-LN) are
    those of our OPT presets.
    """
    if _EMBED not in shapes or len(shapes[_EMBED]) != 2:
        raise CheckpointMismatch(f"no 2-d {_EMBED!r} in the checkpoint (found {len(shapes)} keys)")
    vocab, d_model = shapes[_EMBED]
    problems, warnings = [], []
    for name, value in (("decoder_embed_dim", d_model),):
        if opts.get(name) is not None and int(opts[name]) != value:
            problems.append(f"{name}={opts[name]} but {_EMBED} has width {value}")
    bad = _unsupported(opts, d_model)
    if bad:
        raise CheckpointMismatch("unsupported metaseq options: " + "; ".join(bad))
    if opts.get("decoder_attention_heads") is None:
        problems.append("decoder_attention_heads is missing from the options (it cannot be read from the weights)")
    layer_ids = {int(m[1]) for k in shapes if (m := _LAYER_RE.match(k))}
    n_layers = int(opts["decoder_layers"]) if opts.get("decoder_layers") is not None else len(layer_ids)
    fc1 = shapes.get("decoder.layers.0.fc1.weight")
    ffn = int(opts["decoder_ffn_embed_dim"]) if opts.get("decoder_ffn_embed_dim") is not None else (fc1 or (0,))[0]
    if fc1 is not None and fc1[0] != ffn:
        problems.append(f"decoder_ffn_embed_dim={ffn} but decoder.layers.0.fc1.weight has shape {fc1}")
    pos = shapes.get("decoder.embed_positions.weight")
    if pos is None:
        problems.append("no 'decoder.embed_positions.weight' (learned positions) in the checkpoint")
        n_positions = int(opts.get("max_target_positions") or 2048)
    else:
        n_positions = pos[0] - (_PAD + 1)
        max_target = opts.get("max_target_positions")
        if isinstance(max_target, int) and max_target != n_positions:
            warnings.append(f"max_target_positions={max_target} but the position table holds {n_positions} "
                            f"positions (+{_PAD + 1} offset rows); using the table")
    if n_layers <= 0 or ffn <= 0 or n_positions <= 0:
        problems.append(f"cannot size the model: {n_layers} layers, ffn {ffn}, {n_positions} positions")
    if problems:
        raise CheckpointMismatch("metaseq options do not fit the weights: " + "; ".join(problems))
    heads = int(opts["decoder_attention_heads"])
    if d_model % heads:
        raise CheckpointMismatch(f"decoder_embed_dim={d_model} is not a multiple of decoder_attention_heads={heads}")
    base = preset("bb3_30b")  # our OPT conventions: pad 1, bos = eos = 2, offset 2, pre-LN, tied output
    changes = dict(
        vocab_size=int(vocab), d_model=int(d_model), n_heads=heads, ffn_dim=int(ffn), n_decoder_layers=n_layers,
        n_positions=int(n_positions), activation="relu",
        embeddings_scale=not bool(opts.get("no_scale_embedding", False)),
        dropout=float(opts.get("dropout") or 0.0), attention_dropout=float(opts.get("attention_dropout") or 0.0),
        activation_dropout=0.0,
    )
    return base.replace(**changes, **overrides), warnings


# ---------------------------------------------------------------------------
# Lazy tensors: shapes are known up front, values are produced one layer at a time.


class _Lazy:
    """A tensor's shape now, its value on ``load()``. ``owned``: the value is freshly
    allocated (a merge); otherwise it may be a view of a memory-mapped file, which is
    copied before it is stored (jax on CPU aliases aligned host buffers: a parameter
    must not alias a file that may be overwritten later)."""

    __slots__ = ("shape", "load", "owned")

    def __init__(self, shape, load: Callable[[], Any], owned: bool = False):
        self.shape = tuple(int(s) for s in shape)
        self.load = load
        self.owned = owned


def _eager(tensor) -> _Lazy:
    return _Lazy(tuple(tensor.shape), lambda: tensor)


def _same_tensor(a, b) -> bool:
    try:
        return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())
    except Exception:  # noqa: BLE001 - not torch tensors
        return a is b


def _unflatten(shards: list[Mapping[str, Any]], label: str, report: LoadReport) -> dict[str, _Lazy]:
    """The named tensors of one model-parallel part stored as FSDP flat parameters
    over ``shards`` (each a checkpoint dict with ``model`` and ``shard_metadata``)."""
    import torch  # deferred: torch is needed only to read PyTorch checkpoints

    metas = [s.get("shard_metadata") for s in shards]
    if any(not isinstance(m, Mapping) or "param_metadata" not in m for m in metas):
        raise CheckpointMismatch(f"{label}: FSDP flat parameters without shard_metadata cannot be unflattened")
    out: dict[str, _Lazy] = {}
    used: set[str] = set()
    cache: dict[str, Any] = {}
    for idx, entry in enumerate(metas[0]["param_metadata"]):
        prefix = entry.get("fsdp_path") or ""
        for flat_name, info in entry["params"].items():
            key = f"{prefix}.{flat_name}" if prefix else flat_name
            missing = [i for i, s in enumerate(shards) if key not in s["model"]]
            if missing:
                raise CheckpointMismatch(f"{label}: flat parameter {key!r} missing in FSDP shard(s) {missing}")
            used.add(key)
            pads = [int(m["param_metadata"][idx]["params"][flat_name].get("padding", 0)) for m in metas]
            sizes = [int(s["model"][key].numel()) - p for s, p in zip(shards, pads)]
            names, shapes = list(info["names"]), [tuple(s) for s in info["shapes"]]
            numels = [int(n) for n in info["numels"]]
            if sum(numels) != sum(sizes):
                raise CheckpointMismatch(f"{label}: {key!r} holds {sum(sizes)} values, its metadata {sum(numels)}")

            def flat(key=key, pads=pads):
                if key not in cache:
                    pieces = [s["model"][key].reshape(-1) for s in shards]
                    pieces = [p[: p.numel() - pad] if pad else p for p, pad in zip(pieces, pads)]
                    cache.clear()  # one flat parameter at a time (a layer's, or the top module's)
                    cache[key] = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                return cache[key]

            offset = 0
            for name, shape, numel in zip(names, shapes, numels):
                full = f"{prefix}.{name}" if prefix else name
                out[full] = _Lazy(shape, lambda f=flat, o=offset, n=numel, s=shape: f().narrow(0, o, n).view(s))
                offset += numel
    for src, dest in metas[0].get("shared_param_info", []) or []:
        if src in out:
            out[dest] = out[src]
    for name in metas[0].get("buffer_names", []) or []:
        if name in shards[0]["model"]:
            out[name] = _eager(shards[0]["model"][name])
            used.add(name)
    for name, value in shards[0]["model"].items():
        if name not in used:
            if _FLAT_RE.search(name):
                raise CheckpointMismatch(f"{label}: flat parameter {name!r} is not described by shard_metadata")
            out[name] = _eager(value)
    report.flat = True
    return out


def _part_state(shards: list[Mapping[str, Any]], label: str, report: LoadReport) -> dict[str, _Lazy]:
    state = shards[0]["model"]
    if any(_FLAT_RE.search(k) for k in state):
        return _unflatten(shards, label, report)
    if len(shards) > 1:
        raise CheckpointMismatch(f"{label}: {len(shards)} FSDP shard files hold unflattened weights; "
                                 "only flat (flat_param_N) FSDP shards can be merged")
    out = {k: _eager(v) for k, v in state.items()}
    if _EMBED in state and _OUTPUT in state and _same_tensor(state[_EMBED], state[_OUTPUT]):
        out[_OUTPUT] = out[_EMBED]  # the tied parameter, stored once
    return out


def _normalise_prefix(state: dict[str, _Lazy], report: LoadReport) -> dict[str, _Lazy]:
    keys = list(state)
    if keys and all(k.startswith("model.decoder.") or _IGNORED_RE.search(k) for k in keys) \
            and any(k.startswith("model.decoder.") for k in keys):
        report.key_prefix = "stripped model."
        return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    if not any(k.startswith("decoder.") for k in keys) and "embed_tokens.weight" in state:
        report.key_prefix = "added decoder."
        return {f"decoder.{k}": v for k, v in state.items()}
    return state


def _merge_parts(parts: list[dict[str, _Lazy]], report: LoadReport, problems: list[str]) -> dict[str, _Lazy]:
    """One logical (singleton) state from model-parallel parts, fused qkv split into q/k/v."""
    import torch  # deferred: torch is needed only to read PyTorch checkpoints

    n = len(parts)
    keys = list(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if set(part) != set(keys):
            diff = sorted(set(part) ^ set(keys))
            problems.append(f"model-parallel part {i} has different keys than part 0: {diff[:10]}")
    keys = [k for k in keys if all(k in p for p in parts)]
    merged: dict[str, _Lazy] = {}

    def cat(key, dim) -> _Lazy | None:
        shapes = [p[key].shape for p in parts]
        if any(len(s) != len(shapes[0]) or len(s) <= dim for s in shapes) or \
                any(s[:dim] + s[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:] for s in shapes):
            problems.append(f"{key!r}: model-parallel parts have shapes {shapes}, not splittable on dim {dim}")
            return None
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes)
        if n == 1:
            return parts[0][key]
        return _Lazy(shape, lambda: torch.cat([p[key].load() for p in parts], dim=dim), owned=True)

    def replicated(key) -> _Lazy | None:
        shapes = [p[key].shape for p in parts]
        if len(set(shapes)) > 1:
            problems.append(f"{key!r}: replicated across model-parallel parts but shapes differ: {shapes}")
            return None
        if n == 1:
            return parts[0][key]

        def load():
            first = parts[0][key].load()
            for i, p in enumerate(parts[1:], 1):
                other = p[key].load()
                if not torch.equal(first, other):
                    diff = float((first.float() - other.float()).abs().max())
                    report.warnings.append(f"{key!r}: part {i} differs from part 0 by up to {diff:.3g}; using part 0")
            return first

        return _Lazy(shapes[0], load)

    def split_qkv(key):
        shapes = [p[key].shape for p in parts]
        if any(s[0] % 3 or s[1:] != shapes[0][1:] for s in shapes):
            problems.append(f"{key!r}: fused K, V, Q rows not divisible by 3 in every part (shapes {shapes})")
            return
        for index, name in enumerate(("k_proj", "v_proj", "q_proj")):  # metaseq's fused order is K, V, Q
            target = key.replace(".qkv_proj.", f".{name}.")
            if target in merged or target in parts[0]:
                problems.append(f"{key!r} and {target!r} are both present")
                continue
            rows = [s[0] // 3 for s in shapes]

            def load(index=index, rows=rows):
                blocks = [p[key].load().narrow(0, index * r, r) for p, r in zip(parts, rows)]
                return blocks[0] if n == 1 else torch.cat(blocks, dim=0)

            merged[target] = _Lazy((sum(rows), *shapes[0][1:]), load, owned=n > 1)

    aliased = all(p.get(_OUTPUT) is not None and p.get(_OUTPUT) is p.get(_EMBED) for p in parts)
    for key in keys:
        if ".qkv_proj." in key:
            report.fused_qkv = True
            split_qkv(key)
            continue
        if key == _OUTPUT and aliased:
            continue
        if key in _VOCAB_KEYS or _COLUMN_RE.search(key):
            lazy = cat(key, 0)
        elif _ROW_WEIGHT_RE.search(key):
            lazy = cat(key, 1)
        else:  # layer norms, positions, row-parallel biases, buffers
            lazy = replicated(key)
        if lazy is not None:
            merged[key] = lazy
    if aliased and _EMBED in merged:
        merged[_OUTPUT] = merged[_EMBED]
    return merged


# ---------------------------------------------------------------------------
# Names and filling.


def table(cfg: ModelConfig) -> tuple[list[tables.Row], dict[str, str]]:
    """Our parameters under metaseq's (singleton, separate q/k/v) names, and the tied output."""
    if cfg.arch != "decoder_only" or cfg.variant != "prelayernorm":
        raise ValueError("metaseq checkpoints hold pre-LN decoder-only (OPT) models")

    def linear(ours, theirs):
        return [(f"{ours}.kernel", f"{theirs}.weight", "T"), (f"{ours}.bias", f"{theirs}.bias", None)]

    def norm(ours, theirs):
        return [(f"{ours}.scale", f"{theirs}.weight", None), (f"{ours}.bias", f"{theirs}.bias", None)]

    rows: list[tables.Row] = [
        ("embeddings", _EMBED, None),
        ("decoder.position_embeddings", "decoder.embed_positions.weight", None),
        *norm("decoder.norm_embeddings", "decoder.layer_norm"),
    ]
    for i in range(cfg.n_decoder_layers):
        ours, theirs = f"decoder.layers.{i}", f"decoder.layers.{i}"
        for mine, their in (("q_lin", "q_proj"), ("k_lin", "k_proj"), ("v_lin", "v_proj"), ("out_lin", "out_proj")):
            rows += linear(f"{ours}.self_attention.{mine}", f"{theirs}.self_attn.{their}")
        rows += norm(f"{ours}.norm1", f"{theirs}.self_attn_layer_norm")
        rows += norm(f"{ours}.norm3", f"{theirs}.final_layer_norm")
        rows += linear(f"{ours}.ffn.lin1", f"{theirs}.fc1") + linear(f"{ours}.ffn.lin2", f"{theirs}.fc2")
    return rows, {_OUTPUT: _EMBED}


def _count_params(module: nnx.Module) -> int:
    return sum(isinstance(v, nnx.Param) for _, v in nnx.iter_graph(module))


class _Holder(nnx.Module):
    """A view on some of another module's parameters under the same paths."""

    def __init__(self, **children):
        for name, child in children.items():
            setattr(self, name, child)


def _fill(network, cfg: ModelConfig, state: dict[str, _Lazy], problems: list[str]) -> None:
    """Fills ``network`` group by group (the top-level tensors, then each layer)
    with ``tables.load_state_dict``; all problems are collected, then raised."""
    rows, tied = table(cfg)
    if getattr(cfg, "scan_layers", False):  # layers stacked in one module: one group, all tensors at once
        groups: list[tuple[str, nnx.Module]] = [("", network)]
    else:
        top = _Holder(embeddings=network.embeddings, decoder=_Holder(
            position_embeddings=network.decoder.position_embeddings, norm_embeddings=network.decoder.norm_embeddings))
        groups = [("", top)] + [(f"decoder.layers.{i}.", layer) for i, layer in enumerate(network.decoder.layers)]
        if sum(_count_params(m) for _, m in groups) != _count_params(network):
            raise AssertionError("metaseq loader groups do not cover every parameter of the network")
    prefixes = [p for p, _ in groups]
    keys_of: dict[str, list[str]] = {prefix: [] for prefix, _ in groups}
    for key in state:
        m = _LAYER_RE.match(key)
        if m is not None and int(m[1]) >= cfg.n_decoder_layers:
            problems.append(f"unexpected key {key!r} (the options say {cfg.n_decoder_layers} layers)")
        elif m is not None and f"decoder.layers.{m[1]}." in keys_of:
            keys_of[f"decoder.layers.{m[1]}."].append(key)
        else:
            keys_of[""].append(key)
    for prefix, module in groups:
        if prefix:
            rows_g = [(o[len(prefix):], t, f) for o, t, f in rows if o.startswith(prefix)]
        else:  # everything no layer group takes
            rows_g = [r for r in rows if not any(p and r[0].startswith(p) for p in prefixes)]
        tied_g = {a: s for a, s in tied.items() if a in keys_of[prefix] or s in keys_of[prefix]}
        values: dict[str, Any] = {}
        loaded: dict[int, Any] = {}
        for key in keys_of[prefix]:
            lazy = state[key]
            try:
                if id(lazy) not in loaded:
                    value = lazy.load()
                    loaded[id(lazy)] = value if lazy.owned else value.clone()
                values[key] = loaded[id(lazy)]
            except Exception as error:  # noqa: BLE001 - reported with the rest
                problems.append(f"{key!r} could not be assembled: {error}")
        try:
            tables.load_state_dict(module, values, rows_g, tied_g, zero_keys=())
        except CheckpointMismatch as error:
            lines = str(error).split("\n")[1:] or [str(error)]
            problems += [line.strip() for line in lines if line.strip()]
        del values, loaded


def _abstract_network(cfg: ModelConfig, seed: int):
    """The network with shape-only parameters (no random init: filling then holds one
    copy of the weights) and real non-parameter state (dropout keys from ``seed``,
    computed under jit, which drops the unused parameter initialisers)."""
    def make():
        with nnx.use_eager_sharding(False):
            return transformer.Transformer(cfg, rngs=nnx.Rngs(seed))

    network = nnx.eval_shape(make)
    nnx.update(network, jax.jit(lambda: nnx.state(make(), nnx.Not(nnx.Param)))())
    return network


def load_metaseq(path: str, *, seed: int = 0, trust_pickle: bool = False, **config_overrides):
    """(network, config, report) from a metaseq checkpoint file, one of its
    model-parallel parts / FSDP shards, or the folder holding them.

    ``seed`` seeds the dropout keys (as ``nnx.Rngs(seed)`` does for the other
    loaders); ``config_overrides`` change settings that are not the checkpoint's
    (``param_dtype``, ``dtype``, ...) on the config read from it.
    """
    files = checkpoint_files(path)
    report = LoadReport(path=path, files=[f for part in files for f in part], model_parallel=len(files),
                        fsdp_shards=len(files[0]))
    checkpoints = [[_torch_load(f, trust_pickle=trust_pickle) for f in part] for part in files]
    for file, checkpoint in zip(report.files, [c for part in checkpoints for c in part]):
        if not _is_metaseq_dict(checkpoint):
            raise CheckpointMismatch(f"{file}: not a metaseq checkpoint (a dict with 'model' and 'cfg' or 'args')")
    opts = model_options(checkpoints[0][0])
    mp = opts.get("model_parallel_size")
    named_parts = "-model_part-" in os.path.basename(files[0][0])
    if named_parts and isinstance(mp, int) and mp != len(files):
        raise CheckpointMismatch(f"{path}: the options say model_parallel_size={mp} but {len(files)} model-parallel "
                                 f"part(s) were found: {[os.path.basename(p[0]) for p in files]}")
    problems: list[str] = []
    parts = [_normalise_prefix(_part_state(part, f"{path} part {i}", report), report)
             for i, part in enumerate(checkpoints)]
    state = _merge_parts(parts, report, problems)
    for key in [k for k in state if _IGNORED_RE.search(k)]:
        report.ignored_keys.append(key)
        del state[key]
    cfg, warnings = config_from_metaseq(opts, {k: v.shape for k, v in state.items()}, **config_overrides)
    report.warnings += warnings
    report.options = {k: opts.get(k) for k in (
        "_name", "arch", "decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads",
        "max_target_positions", "activation_fn", "decoder_learned_pos", "no_scale_embedding",
        "share_decoder_input_output_embed", "decoder_normalize_before", "dropout", "attention_dropout",
        "model_parallel_size") if k in opts}
    if len(files) > 1 and cfg.n_heads % len(files):
        problems.append(f"{cfg.n_heads} heads do not split over {len(files)} model-parallel parts")
    if getattr(cfg, "scan_layers", False):  # stacked layers are written into an existing stack: build it

        with nnx.use_eager_sharding(False):
            network = transformer.Transformer(cfg, rngs=nnx.Rngs(seed))
    else:
        network = _abstract_network(cfg, seed)
    _fill(network, cfg, state, problems)
    if problems:
        raise CheckpointMismatch(f"{len(problems)} problem(s) loading the metaseq checkpoint {path}:\n  "
                                 + "\n  ".join(problems))
    del checkpoints, parts, state
    return network, cfg, report


def summary(report: LoadReport) -> str:
    """One line for the log."""
    layout = f"{report.model_parallel} model-parallel part(s) x {report.fsdp_shards} FSDP shard(s)"
    extras = [x for x, on in (("flat params unflattened", report.flat), ("fused K,V,Q split", report.fused_qkv),
                              (report.key_prefix, bool(report.key_prefix))) if on]
    return (f"metaseq checkpoint {report.path}: {layout}" + (f" ({', '.join(extras)})" if extras else "")
            + f"; {len(report.ignored_keys)} buffer(s) ignored: {report.ignored_keys[:10]}")
