"""metaseq (OPT) checkpoints: bb3x_jax.load on files written in metaseq's layouts.

A tiny random transformers OPTForCausalLM is the reference; its weights are
written the way metaseq stores them (key names, fused K,V,Q qkv_proj,
Megatron model-parallel parts, FSDP flat parameters with shard_metadata, a cfg
with the model options), loaded with ``bb3x_jax.load`` and compared on logits.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

import bb3x_jax
from bb3x_jax.model import api
from bb3x_jax.model.formats import metaseq, pickles
from bb3x_jax.model.formats.tables import CheckpointMismatch

VOCAB, D, HEADS, FFN, LAYERS, POSITIONS = 72, 24, 4, 44, 2, 40  # heads and vocab split over 2 parts


def tiny_hf_opt(seed: int = 0) -> OPTForCausalLM:
    """A random OPT whose every weight (biases, norms) is non-trivial."""
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, ffn_dim=FFN, num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS, pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0,
        attention_dropout=0.0, activation_function="relu", do_layer_norm_before=True, word_embed_proj_dim=D,
    )).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    return model


def singleton_state(hf: OPTForCausalLM, *, fused: bool = False) -> dict[str, torch.Tensor]:
    """hf weights under metaseq's singleton names (output projection tied, version buffer)."""
    out = {}
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight":
            continue
        key = key.removeprefix("model.").replace("decoder.final_layer_norm.", "decoder.layer_norm.")
        out[key] = value.clone()
    out["decoder.output_projection.weight"] = out["decoder.embed_tokens.weight"]  # one tensor, as metaseq ties it
    out["decoder.version"] = torch.tensor([3.0])
    if fused:
        for i in range(LAYERS):
            p = f"decoder.layers.{i}.self_attn"
            for kind in ("weight", "bias"):
                k, v, q = (out.pop(f"{p}.{n}_proj.{kind}") for n in "kvq")
                out[f"{p}.qkv_proj.{kind}"] = torch.cat([k, v, q])  # metaseq's fused order is K, V, Q
    return out


def split_parts(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Megatron model-parallel parts: column-parallel on dim 0 (fused: per part K, V, Q),
    row-parallel weights on dim 1, vocab-parallel embeddings, the rest replicated."""
    parts = [{} for _ in range(n)]
    for key, value in state.items():
        if ".qkv_proj." in key:
            k, v, q = value.chunk(3)
            chunks = [torch.cat(t) for t in zip(k.chunk(n), v.chunk(n), q.chunk(n))]
        elif key == "decoder.output_projection.weight":
            continue
        elif key == "decoder.embed_tokens.weight" or any(f".{m}." in key for m in ("fc1", "q_proj", "k_proj",
                                                                                   "v_proj")):
            chunks = value.chunk(n)
        elif key.endswith(("fc2.weight", "out_proj.weight")):
            chunks = value.chunk(n, dim=1)
        else:
            chunks = [value] * n
        for part, chunk in zip(parts, chunks):
            part[key] = chunk.clone()
    for part in parts:
        part["decoder.output_projection.weight"] = part["decoder.embed_tokens.weight"]
    return parts


def options(**changes) -> dict:
    model = dict(_name="transformer_lm_megatron", decoder_layers=LAYERS, decoder_embed_dim=D,
                 decoder_ffn_embed_dim=FFN, decoder_attention_heads=HEADS,
                 max_target_positions="${task.max_target_positions}", activation_fn="relu",
                 decoder_learned_pos=True, no_scale_embedding=True, share_decoder_input_output_embed=True,
                 dropout=0.1, attention_dropout=0.0, model_parallel_size=1)
    model.update(changes)
    return model


def write(path, state, model_opts=None, *, as_args: bool = False, **extra) -> str:
    model_opts = model_opts or options()
    if as_args:  # older checkpoints: an argparse Namespace under "args"
        checkpoint = {"model": state, "args": argparse.Namespace(**model_opts), "cfg": None}
    else:
        checkpoint = {"model": state, "cfg": {"model": argparse.Namespace(**model_opts),
                                             "task": {"max_target_positions": POSITIONS},
                                             "common": {"model_parallel_size": model_opts["model_parallel_size"]}},
                      "extra_state": {"epoch": 1}, "optimizer_history": [], **extra}
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    torch.save(checkpoint, path)
    return str(path)


def assert_same_logits(model: api.BB3Model, hf: OPTForCausalLM) -> None:
    context = np.array([[2, 5, 6, 1, 1], [2, 8, 9, 10, 70]])  # right-padded with pad 1
    label = np.array([[7, 8, 2], [11, 2, 1]])
    ours = np.asarray(model.logits(context, label))
    assert ours.shape == (2, 3, VOCAB)
    for row, (ctx, lab) in enumerate(zip(context, label)):
        seq = np.concatenate([ctx[ctx != 1], lab[lab != 1]])
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(seq[None])).logits.numpy()[0]
        n_ctx = int((ctx != 1).sum())
        for t in range(int((lab != 1).sum())):
            np.testing.assert_allclose(ours[row, t], ref[n_ctx - 1 + t], atol=1e-4, rtol=0)


def test_consolidated_file_separate_qkv(tmp_path):
    """A consolidated file (separate q/k/v, tied output projection, version buffer,
    Namespace options with a ${task...} interpolation) gives transformers' logits and
    the OPT conventions; the ignored buffer is reported."""
    hf = tiny_hf_opt()
    path = write(tmp_path / "consolidated.pt", singleton_state(hf))
    model = bb3x_jax.load(path)
    assert_same_logits(model, hf)
    cfg = model.config
    assert (cfg.arch, cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.n_decoder_layers, cfg.n_positions) == (
        "decoder_only", VOCAB, D, HEADS, FFN, LAYERS, POSITIONS)
    assert (cfg.pad_id, cfg.start_id, cfg.end_id, cfg.position_offset, cfg.activation, cfg.embeddings_scale,
            cfg.variant, cfg.dropout) == (1, 2, 2, 2, "relu", False, "prelayernorm", 0.1)
    _, _, report = metaseq.load_metaseq(path)
    assert report.ignored_keys == ["decoder.version"] and report.model_parallel == 1 and not report.warnings
    # The parameters own their memory: overwriting the (memory-mapped) file changes nothing.
    before = np.asarray(model.logits([[2, 5, 6]], [[7, 2]]))
    write(tmp_path / "consolidated.pt", singleton_state(tiny_hf_opt(seed=9)))
    np.testing.assert_array_equal(np.asarray(model.logits([[2, 5, 6]], [[7, 2]])), before)


def test_fused_qkv_fp16_args_only(tmp_path):
    """A fused qkv_proj is split in metaseq's K, V, Q order; fp16 weights and an
    args-only (older) checkpoint load too."""
    hf = tiny_hf_opt(seed=1)
    with torch.no_grad():  # the reference runs on exactly the fp16-rounded weights
        for param in hf.parameters():
            param.copy_(param.half().float())
    state = {k: v.half() for k, v in singleton_state(hf, fused=True).items()}
    state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"]
    path = write(tmp_path / "model.pt", state, as_args=True)
    assert_same_logits(bb3x_jax.load(path), hf)
    assert metaseq.load_metaseq(path)[2].fused_qkv


@pytest.mark.parametrize("fused", [False, True])
def test_model_parallel_parts_merge(tmp_path, fused):
    """Two Megatron model-parallel parts (column/row/vocab-parallel splits, per-part
    fused K,V,Q) merge into the same model, from one part's path or from the folder."""
    hf = tiny_hf_opt(seed=2)
    for i, part in enumerate(split_parts(singleton_state(hf, fused=fused), 2)):
        write(tmp_path / "ckpt" / f"reshard-model_part-{i}.pt", part, options(model_parallel_size=2))
    (tmp_path / "ckpt" / "dict.txt").write_text("")  # metaseq folders hold tokenizer files too
    from_folder = bb3x_jax.load(str(tmp_path / "ckpt"))
    assert_same_logits(from_folder, hf)
    from_part = bb3x_jax.load(str(tmp_path / "ckpt" / "reshard-model_part-1.pt"))
    assert api.count_mismatch(from_folder, from_part) == 0
    report = metaseq.load_metaseq(str(tmp_path / "ckpt"))[2]
    assert (report.model_parallel, report.fused_qkv, report.ignored_keys) == (2, fused, ["decoder.version"])


def _flatten(state: dict[str, torch.Tensor], n_shards: int):
    """FSDP flat parameters as metaseq's raw checkpoints hold them: one flat_param_0 per
    wrapped module (each layer, and the top), chunked over shards, the last chunk padded."""
    groups = {"": [k for k in state if not k.startswith("decoder.layers.") and k != "decoder.version"
                   and k != "decoder.output_projection.weight"]}
    for i in range(LAYERS):
        groups[f"decoder.layers.{i}"] = [k for k in state if k.startswith(f"decoder.layers.{i}.")]
    shards = [{"model": {"decoder.version": state["decoder.version"]},
               "shard_metadata": {"param_metadata": [], "buffer_names": ["decoder.version"],
                                  "shared_param_info": [("decoder.embed_tokens.weight",
                                                         "decoder.output_projection.weight")]}}
              for _ in range(n_shards)]
    for path, keys in groups.items():
        names = [k[len(path) + 1:] if path else k for k in keys]
        flat = torch.cat([state[k].reshape(-1) for k in keys])
        chunks = list(flat.chunk(n_shards))
        for shard, chunk in zip(shards, chunks):
            pad = chunks[0].numel() - chunk.numel()
            key = f"{path}.flat_param_0" if path else "flat_param_0"
            shard["model"][key] = torch.cat([chunk, chunk.new_zeros(pad)])
            shard["shard_metadata"]["param_metadata"].append({"fsdp_path": path, "params": {"flat_param_0": {
                "names": names, "shapes": [state[k].shape for k in keys], "numels": [state[k].numel() for k in keys],
                "padding": pad}}})
    return shards


def test_fsdp_flat_shards_of_model_parallel_parts(tmp_path):
    """Raw training files (2 model-parallel parts x 2 FSDP shards of flat parameters,
    padded, unflattened with shard_metadata) load equal to transformers."""
    hf = tiny_hf_opt(seed=3)
    for p, part in enumerate(split_parts(singleton_state(hf, fused=True), 2)):
        for s, shard in enumerate(_flatten(part, 2)):
            write(tmp_path / "raw" / f"checkpoint_last-model_part-{p}-shard{s}.pt", shard["model"],
                  options(model_parallel_size=2), shard_metadata=shard["shard_metadata"])
    model = bb3x_jax.load(str(tmp_path / "raw" / "checkpoint_last-model_part-0-shard0.pt"))
    assert_same_logits(model, hf)
    report = metaseq.load_metaseq(str(tmp_path / "raw"))[2]
    assert (report.flat, report.model_parallel, report.fsdp_shards) == (True, 2, 2)


def test_config_overrides(tmp_path):
    """Settings that are not the checkpoint's (parameter dtype; scanned layers where the
    config has them) can be chosen at load time and keep the weights."""
    import dataclasses

    from bb3x_jax.model.config import ModelConfig

    hf = tiny_hf_opt(seed=6)
    path = write(tmp_path / "m.pt", singleton_state(hf, fused=True))
    network, cfg, _ = metaseq.load_metaseq(path, param_dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16" and network.embeddings[...].dtype == np.dtype("bfloat16")
    if "scan_layers" in {f.name for f in dataclasses.fields(ModelConfig)}:
        network, cfg, _ = metaseq.load_metaseq(path, scan_layers=True)
        assert_same_logits(api.BB3Model(network, cfg), hf)


def test_export_to_transformers(tmp_path):
    """load(metaseq) -> save_pytorch(hf) -> OPTForCausalLM.from_pretrained gives the
    original logits (no metaseq exporter is needed: the network is plain OPT)."""
    hf = tiny_hf_opt(seed=4)
    model = bb3x_jax.load(write(tmp_path / "m.pt", singleton_state(hf, fused=True)))
    model.save_pytorch(str(tmp_path / "hf"), format="hf")
    exported = OPTForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 2]])
    with torch.no_grad():
        np.testing.assert_allclose(exported(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.numpy(),
                                   atol=1e-5, rtol=0)


def test_key_problems_are_listed_together(tmp_path):
    """A missing key, an unexpected key and a mis-shaped key fail with one
    CheckpointMismatch naming all three (nothing is skipped or left random)."""
    state = singleton_state(tiny_hf_opt())
    del state["decoder.layers.1.fc2.bias"]
    state["decoder.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    state["decoder.layers.1.fc2.weight"] = torch.zeros(D, FFN - 1)
    with pytest.raises(CheckpointMismatch) as error:
        bb3x_jax.load(write(tmp_path / "bad.pt", state))
    message = str(error.value)
    assert "missing key 'decoder.layers.1.fc2.bias'" in message
    assert "unexpected key 'decoder.layers.0.self_attn.rotary.weight'" in message
    assert "shape of 'decoder.layers.1.fc2.weight' is (24, 43)" in message


def test_extra_layer_and_untied_output_fail(tmp_path):
    """A layer beyond decoder_layers is unexpected, and an output projection that
    differs from the embeddings (an untied head) is refused."""
    state = singleton_state(tiny_hf_opt())
    state["decoder.layers.2.fc1.bias"] = torch.zeros(FFN)
    state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"] + 1.0
    with pytest.raises(CheckpointMismatch) as error:
        bb3x_jax.load(write(tmp_path / "bad.pt", state))
    assert "unexpected key 'decoder.layers.2.fc1.bias'" in str(error.value)
    assert "'decoder.output_projection.weight' should be tied" in str(error.value)


def test_unsupported_options_fail_by_name(tmp_path):
    """Options that change the math and are not implemented fail naming each one."""
    state = singleton_state(tiny_hf_opt())
    opts = options(decoder_normalize_before=False, activation_fn="gelu", alibi=True, scale_fc=True)
    with pytest.raises(CheckpointMismatch) as error:
        bb3x_jax.load(write(tmp_path / "m.pt", state, opts))
    for name in ("decoder_normalize_before=False", "activation_fn='gelu'", "alibi=True", "scale_fc=True"):
        assert name in str(error.value)
    no_heads = options()
    del no_heads["decoder_attention_heads"]
    with pytest.raises(CheckpointMismatch, match="decoder_attention_heads is missing"):
        bb3x_jax.load(write(tmp_path / "m2.pt", state, no_heads))


def test_missing_model_parallel_part_fails(tmp_path):
    """A model-parallel checkpoint with a part missing is refused, naming what was found."""
    parts = split_parts(singleton_state(tiny_hf_opt()), 2)
    write(tmp_path / "ckpt" / "reshard-model_part-0.pt", parts[0], options(model_parallel_size=2))
    with pytest.raises(CheckpointMismatch, match="model_parallel_size=2 but 1 model-parallel part"):
        bb3x_jax.load(str(tmp_path / "ckpt" / "reshard-model_part-0.pt"))
    write(tmp_path / "ckpt" / "reshard-model_part-2.pt", parts[1], options(model_parallel_size=2))
    with pytest.raises(CheckpointMismatch, match=r"parts found: \[0, 2\]"):
        bb3x_jax.load(str(tmp_path / "ckpt"))


class _FakeNode:
    """Pickles like an omegaconf value node: its __dict__ with the value under ``_val``."""

    def __init__(self, value):
        self.__dict__.update(_val=value, _metadata=None, _parent=None)


class _FakeDictConfig:
    """Pickles like an omegaconf DictConfig: its __dict__ with key -> node under ``_content``."""

    def __init__(self, content):
        nodes = {k: v if isinstance(v, _FakeDictConfig) else _FakeNode(v) for k, v in content.items()}
        self.__dict__.update(_content=nodes, _metadata=None, _parent=None)


def test_cfg_of_unimportable_classes(tmp_path, monkeypatch):
    """A cfg pickled as omegaconf containers (and extra_state objects of classes that
    cannot be imported here, like metaseq's) is refused by the safe unpickler, naming the
    class; trusted, it loads: unknown classes become stand-ins and omegaconf's pickled
    layout (_content / _val) is read as plain values."""
    import sys
    import types

    fake = types.ModuleType("_not_installed_omegaconf")
    _FakeNode.__module__ = _FakeDictConfig.__module__ = fake.__name__
    fake._FakeNode, fake._FakeDictConfig = _FakeNode, _FakeDictConfig
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    hf = tiny_hf_opt(seed=5)
    cfg = _FakeDictConfig({"model": _FakeDictConfig(options()), "task": _FakeDictConfig({"max_target_positions": 40})})
    path = tmp_path / "m.pt"
    torch.save({"model": singleton_state(hf), "cfg": cfg, "extra_state": {"iterator": _FakeNode(3)}}, path)
    monkeypatch.delitem(sys.modules, fake.__name__)
    with pytest.raises(pickles.UntrustedPickleError, match="_not_installed_omegaconf._FakeDictConfig"):
        bb3x_jax.load(str(path))
    model = bb3x_jax.load(str(path), trust_pickle=True)
    assert_same_logits(model, hf)
    assert model.config.n_positions == POSITIONS and model.config.dropout == 0.1
