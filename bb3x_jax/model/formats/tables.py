"""Name tables between our parameters and PyTorch checkpoints, used both ways.

A table is a list of (our path, their key, transform) rows; the transform is
``"T"`` for torch Linear weights ([out, in] there, [in, out] here) or ``None``.
Import checks that every key of the checkpoint is consumed and every parameter
of ours is filled with the right shape, and fails listing what is missing,
unexpected or mis-shaped: nothing is silently skipped or left random.

Tables always name parameters per layer (``decoder.layers.3.ffn.lin1.kernel``).
A scanned model (``scan_layers``) stores each stack's layers stacked on a
leading ``layers`` axis; ``_flat_params`` presents such a parameter as one
view per layer, so tables, import and export are the same for both layouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bb3x_jax.errors import UserError
from bb3x_jax.model.config import ModelConfig
from bb3x_jax.model.transformer import Transformer

Row = tuple[str, str, str | None]


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint whose keys or shapes do not fit the architecture."""


def attention_rows(ours: str, theirs: str, q="q_proj", k="k_proj", v="v_proj", o="out_proj") -> list[Row]:
    rows = []
    for mine, their in (("q_lin", q), ("k_lin", k), ("v_lin", v), ("out_lin", o)):
        rows.append((f"{ours}.{mine}.kernel", f"{theirs}.{their}.weight", "T"))
        rows.append((f"{ours}.{mine}.bias", f"{theirs}.{their}.bias", None))
    return rows


def norm_rows(ours: str, theirs: str) -> list[Row]:
    return [(f"{ours}.scale", f"{theirs}.weight", None), (f"{ours}.bias", f"{theirs}.bias", None)]


def _ffn(ours: str, theirs: str) -> list[Row]:
    return [
        (f"{ours}.lin1.kernel", f"{theirs}.fc1.weight", "T"),
        (f"{ours}.lin1.bias", f"{theirs}.fc1.bias", None),
        (f"{ours}.lin2.kernel", f"{theirs}.fc2.weight", "T"),
        (f"{ours}.lin2.bias", f"{theirs}.fc2.bias", None),
    ]


def hf_blenderbot_table(cfg: ModelConfig) -> tuple[list[Row], dict[str, str]]:
    """Rows for transformers' BlenderbotForConditionalGeneration (prelayernorm) or
    BlenderbotSmallForConditionalGeneration (ParlAI's xlm variant), plus tied aliases."""
    if cfg.arch != "encoder_decoder" or cfg.variant not in ("prelayernorm", "xlm"):
        raise ValueError("transformers' Blenderbot is the prelayernorm, BlenderbotSmall the xlm encoder-decoder")
    norm = "layer_norm" if cfg.variant == "prelayernorm" else "layernorm_embedding"
    rows: list[Row] = [
        ("embeddings", "model.shared.weight", None),
        ("encoder.position_embeddings", "model.encoder.embed_positions.weight", None),
        ("decoder.position_embeddings", "model.decoder.embed_positions.weight", None),
        *norm_rows("encoder.norm_embeddings", f"model.encoder.{norm}"),
        *norm_rows("decoder.norm_embeddings", f"model.decoder.{norm}"),
    ]
    for i in range(cfg.n_encoder_layers):
        ours, theirs = f"encoder.layers.{i}", f"model.encoder.layers.{i}"
        rows += attention_rows(f"{ours}.attention", f"{theirs}.self_attn")
        rows += norm_rows(f"{ours}.norm1", f"{theirs}.self_attn_layer_norm")
        rows += norm_rows(f"{ours}.norm2", f"{theirs}.final_layer_norm")
        rows += _ffn(f"{ours}.ffn", theirs)
    for i in range(cfg.n_decoder_layers):
        ours, theirs = f"decoder.layers.{i}", f"model.decoder.layers.{i}"
        rows += attention_rows(f"{ours}.self_attention", f"{theirs}.self_attn")
        rows += attention_rows(f"{ours}.encoder_attention", f"{theirs}.encoder_attn")
        rows += norm_rows(f"{ours}.norm1", f"{theirs}.self_attn_layer_norm")
        rows += norm_rows(f"{ours}.norm2", f"{theirs}.encoder_attn_layer_norm")
        rows += norm_rows(f"{ours}.norm3", f"{theirs}.final_layer_norm")
        rows += _ffn(f"{ours}.ffn", theirs)
    # Keys that must equal another (tied) key, and the output bias that must be zero.
    tied = {
        "model.encoder.embed_tokens.weight": "model.shared.weight",
        "model.decoder.embed_tokens.weight": "model.shared.weight",
        "lm_head.weight": "model.shared.weight",
    }
    return rows, tied


def hf_opt_table(cfg: ModelConfig) -> tuple[list[Row], dict[str, str]]:
    """Rows for transformers' OPTForCausalLM (pre-LN decoder, tied output)."""
    if cfg.arch != "decoder_only":
        raise ValueError("OPT is a decoder-only model")
    rows: list[Row] = [
        ("embeddings", "model.decoder.embed_tokens.weight", None),
        ("decoder.position_embeddings", "model.decoder.embed_positions.weight", None),
        *norm_rows("decoder.norm_embeddings", "model.decoder.final_layer_norm"),
    ]
    for i in range(cfg.n_decoder_layers):
        ours, theirs = f"decoder.layers.{i}", f"model.decoder.layers.{i}"
        rows += attention_rows(f"{ours}.self_attention", f"{theirs}.self_attn")
        rows += norm_rows(f"{ours}.norm1", f"{theirs}.self_attn_layer_norm")
        rows += norm_rows(f"{ours}.norm3", f"{theirs}.final_layer_norm")
        rows += _ffn(f"{ours}.ffn", theirs)
    return rows, {"lm_head.weight": "model.decoder.embed_tokens.weight"}


class _HostStacks:
    """Host copies of stacked (scanned) parameters, shared by all their layer views.

    Each stack is copied to the host once, however many layers are read or
    written; writes are applied to the model by ``commit``, one stack at a time.
    """

    def __init__(self):
        self.copies: dict[int, tuple[nnx.Param, np.ndarray]] = {}
        self.dirty: set[int] = set()

    def host(self, stacked: nnx.Param) -> np.ndarray:
        if id(stacked) not in self.copies:
            value = stacked.get_value()
            abstract = isinstance(value, jax.ShapeDtypeStruct)  # a model from nnx.eval_shape, to be filled
            self.copies[id(stacked)] = (stacked, np.zeros(value.shape, value.dtype) if abstract else np.array(value))
        return self.copies[id(stacked)][1]

    def commit(self) -> None:
        for key in sorted(self.dirty):
            stacked, buffer = self.copies[key]
            stacked.set_value(jnp.asarray(buffer, dtype=stacked.dtype))
        self.dirty.clear()


class _LayerSlice:
    """Layer ``index`` of a stacked parameter, read and written like an ``nnx.Param``."""

    def __init__(self, stacked: nnx.Param, index: int, stacks: _HostStacks):
        self.stacked, self.index, self.stacks = stacked, index, stacks

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stacked.shape[1:])

    @property
    def dtype(self):
        return self.stacked.dtype

    def __getitem__(self, item):
        return self.stacks.host(self.stacked)[self.index][item]

    def set_value(self, value) -> None:
        self.stacks.host(self.stacked)[self.index] = np.asarray(value)
        self.stacks.dirty.add(id(self.stacked))


def _commit(params: Mapping[str, Any]) -> None:
    """Applies the writes made through a ``_flat_params`` view to the stacked parameters."""
    stacks = next((t.stacks for t in params.values() if isinstance(t, _LayerSlice)), None)
    if stacks is not None:
        stacks.commit()


def _is_stacked(path: tuple, variable: nnx.Variable) -> bool:
    names = variable.get_metadata().get("out_sharding") or ()
    return bool(names) and names[0] == "layers" and "layers" in path


def _flat_params(model: nnx.Module) -> dict[str, Any]:
    """Parameters by flat per-layer name; a stacked layer parameter appears once per layer
    (``encoder.layers.{i}.…``) as a ``_LayerSlice``."""
    out: dict[str, Any] = {}
    stacks = _HostStacks()
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Param):
            continue
        parts = [str(p) for p in path]
        if not _is_stacked(path, variable):
            out[".".join(parts)] = variable
            continue
        at = parts.index("layers") + 1
        for i in range(variable.shape[0]):
            out[".".join(parts[:at] + [str(i)] + parts[at:])] = _LayerSlice(variable, i, stacks)
    return out


def load_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    rows: list[Row],
    tied: Mapping[str, str],
    *,
    zero_keys: tuple[str, ...] = ("final_logits_bias",),
) -> None:
    """Fills ``model``'s parameters from a torch-style state dict (numpy or torch tensors).

    Raises CheckpointMismatch listing every missing, unexpected or mis-shaped
    key at once.
    """
    params = _flat_params(model)
    as_numpy = _NumpyView(state_dict)  # tensors converted one at a time, when used
    problems: list[str] = []
    used: set[str] = set()
    filled: set[str] = set()
    for ours, theirs, transform in rows:
        if ours not in params:
            problems.append(f"table names unknown parameter {ours!r}")
            continue
        if theirs not in as_numpy:
            problems.append(f"missing key {theirs!r} (for {ours})")
            continue
        value = as_numpy[theirs].T if transform == "T" else as_numpy[theirs]
        target = params[ours]
        if value.shape != tuple(target.shape):
            problems.append(f"shape of {theirs!r} is {as_numpy[theirs].shape}, expected {tuple(target.shape)} "
                            f"({'transposed ' if transform else ''}for {ours})")
            continue
        target.set_value(value if isinstance(target, _LayerSlice) else jnp.asarray(value, dtype=target.dtype))
        used.add(theirs)
        filled.add(ours)
    _commit(params)
    for alias, source in tied.items():
        if alias in as_numpy:
            if source in as_numpy and not np.array_equal(as_numpy[alias], as_numpy[source]):
                problems.append(f"{alias!r} should be tied to {source!r} but differs")
            used.add(alias)
    for key in as_numpy:
        if key in zero_keys or key.split(".")[-1] in zero_keys:
            if np.any(as_numpy[key] != 0):
                problems.append(f"{key!r} is non-zero; this architecture has no such term")
            used.add(key)
    unexpected = sorted(set(as_numpy) - used)
    problems += [f"unexpected key {k!r}" for k in unexpected]
    problems += [f"parameter {p!r} not filled by the checkpoint" for p in sorted(set(params) - filled)]
    if problems:
        raise CheckpointMismatch(f"{len(problems)} problem(s) loading the checkpoint:\n  " + "\n  ".join(problems))


def export_state_dict(model: nnx.Module, rows: list[Row], tied: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Our parameters under the table's keys (float32, writable for torch), tied aliases filled."""
    params = _flat_params(model)
    out = {}
    for ours, theirs, transform in rows:
        value = np.asarray(params[ours][...], dtype=np.float32)
        out[theirs] = np.array(value.T if transform == "T" else value, order="C")
    for alias, source in tied.items():
        out[alias] = out[source]
    return out


class _NumpyView(Mapping):
    """A state dict seen as numpy arrays, converted on access: with lazy sources
    (safetensors, memory-mapped torch files) at most one tensor is in flight."""

    def __init__(self, state_dict: Mapping[str, Any]):
        self._source = state_dict

    def __getitem__(self, key: str) -> np.ndarray:
        return to_numpy(self._source[key])

    def __iter__(self):
        return iter(self._source)

    def __len__(self) -> int:
        return len(self._source)

    def __contains__(self, key) -> bool:
        return key in self._source


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def relayout(model: nnx.Module, cfg: ModelConfig) -> nnx.Module:
    """The same weights in a model of ``cfg``, which may stack its layers differently
    (``scan_layers``): every parameter goes through its flat per-layer name."""
    rows = [(name, name, None) for name in _flat_params(model)]
    weights = export_state_dict(model, rows, {})
    with nnx.use_eager_sharding(False):
        target = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    load_state_dict(target, weights, rows, {})
    return target
