"""The network against transformers' PyTorch implementations on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bb3x_jax.model import config
from bb3x_jax.model.formats import tables
from tests.model import hf_fixtures


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_blenderbot_logits_match_transformers(scan):
    """Converted Blenderbot weights give transformers' logits to 1e-4 (prelayernorm, gelu, scaled embeddings),
    with the layer list and with scanned layers."""
    hf, cfg = hf_fixtures.tiny_blenderbot()
    model = hf_fixtures.new_model(cfg.replace(scan_layers=scan))
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_blenderbot_table(cfg))
    enc = np.array([[5, 6, 7, 9, 11, 0], [8, 9, 10, 0, 0, 0], [3, 4, 5, 6, 7, 8]])
    dec = np.array([[1, 4, 5, 3], [1, 6, 7, 0], [1, 9, 0, 0]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0).long(),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = np.asarray(hf_fixtures.forward(model, jnp.asarray(enc), jnp.asarray(dec)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours[dec != 0], ref[dec != 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_opt_logits_match_transformers_with_left_padding(scan):
    """Converted OPT weights give transformers' logits to 1e-4, positions unshifted by left padding
    (layer list and scanned layers)."""
    hf, cfg = hf_fixtures.tiny_opt()
    model = hf_fixtures.new_model(cfg.replace(scan_layers=scan))
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_opt_table(cfg))
    ids = np.array([[2, 5, 6, 7, 9, 10], [1, 1, 2, 8, 9, 12], [1, 1, 1, 1, 2, 4]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 1).long()).logits.numpy()
    ours = np.asarray(hf_fixtures.forward(model, None, jnp.asarray(ids)))
    np.testing.assert_allclose(ours[ids != 1], ref[ids != 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_blenderbot_gradients_match_torch_autograd(scan):
    """The parameter gradients (the dense layers' hand-written backward included) equal torch autograd's
    on transformers' Blenderbot with the same weights, to 1e-4 of each tensor's largest gradient."""
    hf, cfg = hf_fixtures.tiny_blenderbot()
    rows, tied = tables.hf_blenderbot_table(cfg)
    model = hf_fixtures.new_model(cfg.replace(scan_layers=scan))
    tables.load_state_dict(model, hf.state_dict(), rows, tied)
    enc = np.array([[5, 6, 7, 9, 11, 0], [8, 9, 10, 0, 0, 0], [3, 4, 5, 6, 7, 8]])
    dec = np.array([[1, 4, 5, 3], [1, 6, 7, 0], [1, 9, 0, 0]])
    weights = np.random.default_rng(0).normal(size=(*dec.shape, cfg.vocab_size)).astype(np.float32)
    weights[dec == 0] = 0.0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(jnp.asarray(enc), jnp.asarray(dec))
        return jnp.sum(logits * weights)

    nnx.update(model, jax.jit(jax.grad(loss))(params))
    ours = tables.export_state_dict(model, rows, tied)
    hf.zero_grad()
    logits = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0).long(),
                decoder_input_ids=torch.tensor(dec)).logits
    (logits * torch.tensor(weights)).sum().backward()
    compared = 0
    for name, param in hf.named_parameters():
        if param.grad is None or name not in ours:
            continue
        want = param.grad.numpy()
        np.testing.assert_allclose(ours[name], want, atol=1e-4 * max(np.abs(want).max(), 1e-3), rtol=0,
                                   err_msg=name)
        compared += 1
    assert compared == len(dict(hf.named_parameters()))  # every tensor has a gradient and was compared


def test_checkpoint_mismatches_are_listed():
    """Missing, unexpected and mis-shaped keys are all reported in one error; nothing is skipped."""
    hf, cfg = hf_fixtures.tiny_blenderbot()
    state = dict(hf.state_dict())
    state.pop("model.encoder.layers.0.fc1.bias")
    state["model.encoder.layers.1.fc2.weight"] = torch.zeros(3, 3)
    state["retriever.weight"] = torch.zeros(2)
    with pytest.raises(tables.CheckpointMismatch) as info:
        tables.load_state_dict(hf_fixtures.new_model(cfg), state, *tables.hf_blenderbot_table(cfg))
    text = str(info.value)
    assert "missing key 'model.encoder.layers.0.fc1.bias'" in text
    assert "shape of 'model.encoder.layers.1.fc2.weight' is (3, 3)" in text
    assert "unexpected key 'retriever.weight'" in text
    assert "not filled" in text


def test_nonzero_output_bias_is_refused():
    """A checkpoint with a non-zero final_logits_bias cannot be represented, so it is refused."""
    hf, cfg = hf_fixtures.tiny_blenderbot()
    state = dict(hf.state_dict())
    state["final_logits_bias"] = torch.ones_like(state["final_logits_bias"])
    with pytest.raises(tables.CheckpointMismatch, match="final_logits_bias"):
        tables.load_state_dict(hf_fixtures.new_model(cfg), state, *tables.hf_blenderbot_table(cfg))


def test_parameters_carry_logical_axis_names():
    """Every parameter names its dimensions for the sharding rules table."""
    from bb3x_jax import sharding

    model = hf_fixtures.new_model(config.preset("tiny"))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        assert all(name is None or name in sharding.LOGICAL_RULES for name in spec), spec
    assert model.embeddings.get_metadata()["out_sharding"] == ("vocab", "embed")
    assert model.decoder.layers[0].ffn.lin1.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_bad_model_config_is_refused():
    """Inconsistent architecture settings fail naming the field."""
    with pytest.raises(ValueError, match="d_model must be a positive multiple of n_heads"):
        config.ModelConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="variant must be one of"):
        config.ModelConfig(variant="postln")
    with pytest.raises(ValueError, match="unknown model preset 'bb4'"):
        config.preset("bb4")


@pytest.mark.parametrize("kind", ["blenderbot", "opt"])
def test_export_to_transformers_and_back(tmp_path, kind):
    """Export -> from_pretrained gives our logits; import of the export is bit-exact."""
    from bb3x_jax.model.formats import hf

    hf_model, cfg = hf_fixtures.tiny_blenderbot() if kind == "blenderbot" else hf_fixtures.tiny_opt()
    hf_model.save_pretrained(tmp_path / "orig")
    model, loaded_cfg = hf.load_hf(str(tmp_path / "orig"))
    assert loaded_cfg == cfg
    hf.save_hf(model, cfg, str(tmp_path / "export"))
    import transformers

    cls = transformers.BlenderbotForConditionalGeneration if kind == "blenderbot" else transformers.OPTForCausalLM
    reloaded = cls.from_pretrained(tmp_path / "export").eval()
    if kind == "blenderbot":
        enc = np.array([[5, 6, 7, 9, 0], [8, 9, 10, 11, 12]])
        dec = np.array([[1, 4, 5], [1, 6, 0]])
        with torch.no_grad():
            ref = reloaded(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0).long(),
                           decoder_input_ids=torch.tensor(dec)).logits.numpy()
        ours = np.asarray(hf_fixtures.forward(model, jnp.asarray(enc), jnp.asarray(dec)))
        valid = dec != 0
    else:
        ids = np.array([[2, 5, 6, 7], [1, 2, 8, 9]])
        with torch.no_grad():
            ref = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 1).long()).logits.numpy()
        ours = np.asarray(hf_fixtures.forward(model, None, jnp.asarray(ids)))
        valid = ids != 1
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5, rtol=0)
    again, _ = hf.load_hf(str(tmp_path / "export"))
    for (path, a), (_, b) in zip(nnx.iter_graph(model), nnx.iter_graph(again)):
        if isinstance(a, nnx.Param):
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def _cached_logits(model, ids, prefill: int, memory=None, memory_mask=None):
    """Logits of every position computed through the cache: a prefill (a decoder-only prompt's
    padding marked), then one token at a time."""
    cache = jax.jit(lambda m, *a: m.init_cache(ids.shape[0], ids.shape[1], *a))(model, memory, memory_mask)
    step = jax.jit(lambda c, x: model.decode_cached(x, c))
    prompt = jnp.asarray(ids[:, :prefill])
    chunks = []
    if model.cfg.arch == "decoder_only":
        logits, cache = jax.jit(lambda c, x: model.decode_cached(x, c, valid=x != model.cfg.pad_id))(cache, prompt)
    else:
        logits, cache = step(cache, prompt)
    chunks.append(np.asarray(logits))
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(cache, jnp.asarray(ids[:, t : t + 1]))
        chunks.append(np.asarray(logits))
    return np.concatenate(chunks, axis=1)


def test_cached_decoding_equals_full_forward_and_transformers_blenderbot():
    """Step-by-step decoding with the KV cache gives the full forward's (and transformers') logits."""
    hf, cfg = hf_fixtures.tiny_blenderbot()
    model = hf_fixtures.new_model(cfg)
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_blenderbot_table(cfg))
    enc = np.array([[5, 6, 7, 9, 11, 0], [8, 9, 10, 0, 0, 0]])
    dec = np.array([[1, 4, 5, 3, 8, 9], [1, 6, 7, 12, 13, 14]])
    full = np.asarray(hf_fixtures.forward(model, jnp.asarray(enc), jnp.asarray(dec)))
    memory, memory_mask = jax.jit(lambda m, x: m.encode(x))(model, jnp.asarray(enc))
    for prefill in (1, 3):
        cached = _cached_logits(model, dec, prefill, memory, memory_mask)
        np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0).long(),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()
    np.testing.assert_allclose(cached, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_cached_decoding_equals_full_forward_and_transformers_opt(scan):
    """OPT with left-padded prompts: cached decoding gives the full forward's and transformers' logits
    (layer list, and scanned layers with a stacked cache)."""
    hf, cfg = hf_fixtures.tiny_opt()
    model = hf_fixtures.new_model(cfg.replace(scan_layers=scan))
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_opt_table(cfg))
    ids = np.array([[2, 5, 6, 7, 9, 10, 11], [1, 1, 2, 8, 9, 12, 13], [1, 1, 1, 2, 4, 5, 6]])
    full = np.asarray(hf_fixtures.forward(model, None, jnp.asarray(ids)))
    cached = _cached_logits(model, ids, prefill=4)
    valid = ids != 1
    np.testing.assert_allclose(cached[valid], full[valid], atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid).long()).logits.numpy()
    np.testing.assert_allclose(cached[valid], ref[valid], atol=1e-4, rtol=0)


def test_xlm_variant_matches_transformers_blenderbot_small():
    """ParlAI's xlm variant (post-LN; decoder norms embeddings before positions) equals BlenderbotSmall.

    (transformers drops the decoder's sqrt(d) scale before the norm, which only
    matters through LayerNorm's eps; the fixture's embeddings make that < 1e-6.)
    """
    hf, cfg = hf_fixtures.tiny_blenderbot_small()
    model = hf_fixtures.new_model(cfg)
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_blenderbot_table(cfg))
    enc = np.array([[5, 6, 7, 9, 11, 0], [8, 9, 10, 0, 0, 0]])
    dec = np.array([[1, 4, 5, 3, 8], [1, 6, 7, 12, 0]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0).long(),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = np.asarray(hf_fixtures.forward(model, jnp.asarray(enc), jnp.asarray(dec)))
    np.testing.assert_allclose(ours[dec != 0], ref[dec != 0], atol=1e-4, rtol=0)
    memory, memory_mask = jax.jit(lambda m, x: m.encode(x))(model, jnp.asarray(enc))
    cached = _cached_logits(model, dec, 2, memory, memory_mask)
    np.testing.assert_allclose(cached[dec != 0], ref[dec != 0], atol=1e-4, rtol=0)
