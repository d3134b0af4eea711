"""Scanned layer stacks, per-layer rematerialisation and bf16 compute.

The scanned layout must be a pure change of storage and program shape: same
logits, gradients, dropout masks and checkpoints as the layer list.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bb3x_jax.model import config, transformer
from bb3x_jax.model.__main__ import count_parameters
from bb3x_jax.model.formats import parlai, tables
from tests.model import hf_fixtures

CONTEXT = np.array([[5, 6, 7, 9, 11, 0], [8, 9, 10, 0, 0, 0]])
LABEL = np.array([[4, 5, 3, 2], [6, 7, 2, 0]])


def _copy_weights(source, source_cfg, target_cfg, seed: int = 1):
    """A new model of ``target_cfg`` holding ``source``'s weights, through the ParlAI or OPT table."""
    rows, tied = parlai.table(source_cfg) if source_cfg.arch == "encoder_decoder" else tables.hf_opt_table(source_cfg)
    target = hf_fixtures.new_model(target_cfg, seed=seed)
    tables.load_state_dict(target, tables.export_state_dict(source, rows, tied), rows, tied)
    return target, rows, tied


def _pair(name: str, **overrides):
    """(unscanned model, scanned model with the same weights, unscanned config)."""
    cfg = config.preset(name, vocab_size=64, **overrides)
    plain = hf_fixtures.new_model(cfg)
    scanned, _, _ = _copy_weights(plain, cfg, cfg.replace(scan_layers=True))
    return plain, scanned, cfg


def _cached_logits(model, ids, prefill: int, context=None):
    """A prefill then one token at a time through the KV cache (encoder memory from ``context``)."""

    def start(model, context):
        memory, memory_mask = (None, None) if context is None else model.encode(context)
        return model.init_cache(ids.shape[0], ids.shape[1], memory, memory_mask)

    cache = jax.jit(start)(model, None if context is None else jnp.asarray(context))
    step = jax.jit(lambda model, c, x: model.decode_cached(x, c))
    prefill_step = jax.jit(lambda model, c, x: model.decode_cached(
        x, c, valid=x != model.cfg.pad_id if model.cfg.arch == "decoder_only" else None))
    logits, cache = prefill_step(model, cache, jnp.asarray(ids[:, :prefill]))
    chunks = [np.asarray(logits)]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(model, cache, jnp.asarray(ids[:, t : t + 1]))
        chunks.append(np.asarray(logits))
    return np.concatenate(chunks, axis=1)


def test_scanned_parameters_are_stacked_on_a_layers_axis():
    """Every per-layer parameter has a leading axis of n_layers named "layers" (replicated by the rules
    table); nothing else changes, and the parameter count is the same."""
    from bb3x_jax import sharding

    cfg = config.preset("tiny", n_encoder_layers=3, n_decoder_layers=2, scan_layers=True)
    model = hf_fixtures.new_model(cfg)
    kernel = model.decoder.layers.encoder_attention.q_lin.kernel
    assert kernel.shape == (2, cfg.d_model, cfg.d_model)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    assert model.encoder.layers.norm1.scale.shape == (3, cfg.d_model)
    assert model.embeddings.get_metadata()["out_sharding"] == ("vocab", "embed")
    assert sharding.LOGICAL_RULES["layers"] is None
    assert count_parameters(cfg) == count_parameters(cfg.replace(scan_layers=False))


@pytest.mark.parametrize("name", ["tiny", "tiny_opt"])
def test_scanned_logits_equal_layer_list(name):
    """With the same weights, scan_layers=True gives the layer list's logits (1e-5) in the full
    forward, teacher-forced label_logits and step-by-step cached decoding."""
    plain, scanned, cfg = _pair(name, n_decoder_layers=3)
    ctx, lab = jnp.asarray(CONTEXT), jnp.asarray(LABEL)
    if cfg.arch == "encoder_decoder":
        ids = np.array([[1, 4, 5, 3, 8], [1, 6, 7, 12, 13]])
        forward = jax.jit(lambda m: (m.label_logits(ctx, lab), m(ctx, jnp.asarray(ids))))
        valid = np.ones(ids.shape, bool)
    else:
        ids = np.array([[2, 5, 6, 7, 9, 10], [1, 1, 2, 8, 9, 12]])
        forward = jax.jit(lambda m: (m.label_logits(ctx, lab), m(None, jnp.asarray(ids))))
        valid = ids != cfg.pad_id
    (labels_plain, full), (labels_scan, full_scan) = forward(plain), forward(scanned)
    np.testing.assert_allclose(labels_scan, labels_plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(full_scan, full, atol=1e-5, rtol=0)
    cached = _cached_logits(scanned, ids, 2, CONTEXT if cfg.arch == "encoder_decoder" else None)
    np.testing.assert_allclose(cached[valid], np.asarray(full)[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["aiayn", "xlm", "bart"])
def test_scanned_parlai_round_trip_is_bit_exact(variant):
    """ParlAI keys -> scanned model -> ParlAI keys is bit-exact for the post-LN variants (prelayernorm:
    the transformers tests), and the scanned model's logits equal the layer list's."""
    plain, scanned, cfg = _pair("tiny", variant=variant)
    rows, tied = parlai.table(cfg)
    exported = tables.export_state_dict(scanned, rows, tied)
    original = tables.export_state_dict(plain, rows, tied)
    assert exported.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
    forward = jax.jit(lambda m: m.label_logits(jnp.asarray(CONTEXT), jnp.asarray(LABEL)))
    np.testing.assert_allclose(forward(scanned), forward(plain), atol=1e-5, rtol=0)


def test_abstract_scanned_model_is_filled_by_a_checkpoint():
    """A shape-only scanned model (nnx.eval_shape: no random init, one weight copy when filled) loads a
    checkpoint into its stacks and gives the layer list's logits."""
    plain, _, cfg = _pair("tiny_opt")
    rows, tied = tables.hf_opt_table(cfg)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg.replace(scan_layers=True), rngs=nnx.Rngs(1)))
    tables.load_state_dict(abstract, tables.export_state_dict(plain, rows, tied), rows, tied)
    kernel = abstract.decoder.layers.ffn.lin1.kernel.get_value()
    assert isinstance(kernel, jax.Array) and kernel.shape == (cfg.n_decoder_layers, cfg.d_model, cfg.ffn_dim)
    forward = jax.jit(lambda m: m.label_logits(jnp.asarray(CONTEXT), jnp.asarray(LABEL)))
    np.testing.assert_allclose(forward(abstract), forward(plain), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["blenderbot", "opt"])
def test_scanned_model_to_transformers_and_back(tmp_path, kind):
    """transformers weights load into a scanned model; its export loads in transformers with our logits
    (1e-5) and re-imports bit-exact."""
    from bb3x_jax.model.formats import hf

    hf_model, cfg = hf_fixtures.tiny_blenderbot() if kind == "blenderbot" else hf_fixtures.tiny_opt()
    scanned_cfg = cfg.replace(scan_layers=True)
    model = hf_fixtures.new_model(scanned_cfg)
    tables.load_state_dict(model, hf_model.state_dict(), *hf.table(cfg))
    hf.save_hf(model, scanned_cfg, str(tmp_path / "export"))
    import transformers

    cls = transformers.BlenderbotForConditionalGeneration if kind == "blenderbot" else transformers.OPTForCausalLM
    reloaded = cls.from_pretrained(tmp_path / "export").eval()
    pad = cfg.pad_id  # encoder inputs right-padded (as transformers' Blenderbot expects), OPT prompts left-padded
    ids = np.array([[5, 6, 7, 9], [8, 9, 10, pad]]) if kind == "blenderbot" else np.array([[2, 5, 6, 7], [pad, 2, 8, 9]])
    with torch.no_grad():
        if kind == "blenderbot":
            dec = np.array([[1, 4, 5], [1, 6, 7]])
            ref = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != pad).long(),
                           decoder_input_ids=torch.tensor(dec)).logits.numpy()
            ours, valid = np.asarray(jax.jit(lambda m: m(jnp.asarray(ids), jnp.asarray(dec)))(model)), dec != pad
        else:
            ref = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != pad).long()).logits.numpy()
            ours, valid = np.asarray(jax.jit(lambda m: m(None, jnp.asarray(ids)))(model)), ids != pad
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5, rtol=0)
    again = hf_fixtures.new_model(scanned_cfg, seed=5)
    tables.load_state_dict(again, hf.read_hf_weights(str(tmp_path / "export")), *hf.table(cfg))
    for (path, a), (_, b) in zip(nnx.iter_graph(model), nnx.iter_graph(again)):
        if isinstance(a, nnx.Param):
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_layers_get_distinct_dropout_keys_in_both_layouts():
    """Each layer call gets its own dropout key, the same one whether the stack is scanned or looped."""
    n = 4
    draws = {}
    for scan in (False, True):
        cfg = config.preset("tiny", n_encoder_layers=n, dropout=0.1, scan_layers=scan)
        encoder = hf_fixtures.new_model(cfg).encoder

        def push(layer, h, key):  # a shift register of one random number per layer
            return jnp.concatenate([h[1:], jax.random.uniform(key, (1,))])

        draws[scan] = np.asarray(encoder.run_layers(push, jnp.zeros(n), False))
    assert len(set(draws[True].tolist())) == n
    np.testing.assert_array_equal(draws[True], draws[False])


def _grads(model, deterministic: bool):
    """(loss, gradients w.r.t. the parameters) of a label-logit loss, jitted, the model state threaded
    as in the train step."""
    graphdef, state = nnx.split(model)
    ctx, lab = jnp.asarray(CONTEXT), jnp.asarray(LABEL)

    def loss_and_grad(state):
        m = nnx.merge(graphdef, state)
        loss_fn = lambda m: jnp.mean(jax.nn.log_softmax(m.label_logits(ctx, lab, deterministic=deterministic))[..., 3])
        return nnx.value_and_grad(loss_fn)(m)

    return jax.jit(loss_and_grad)(state)


def _flat(model, grads) -> dict[str, np.ndarray]:
    """Gradients under the checkpoint table's per-layer names, so both layouts compare key by key."""
    rows, tied = parlai.table(model.cfg) if model.cfg.arch == "encoder_decoder" else tables.hf_opt_table(model.cfg)
    holder = hf_fixtures.new_model(model.cfg)
    nnx.update(holder, grads)
    return tables.export_state_dict(holder, rows, tied)


@functools.lru_cache(maxsize=1)
def _reference_gradients():
    """A decoder-only model with every dropout on, and its loss and gradients (layer list, no remat)."""
    cfg = config.preset("tiny_opt", vocab_size=64, dropout=0.2, attention_dropout=0.1, activation_dropout=0.1)
    model = hf_fixtures.new_model(cfg)
    loss, grads = _grads(model, False)
    return model, cfg, float(loss), _flat(model, grads)


def _assert_same_gradients(model, what: str):
    reference, _, loss_ref, flat_ref = _reference_gradients()
    loss, grads = _grads(model, False)
    assert abs(float(loss) - loss_ref) < 1e-6, what
    flat = _flat(model, grads)
    for key in flat_ref:
        np.testing.assert_allclose(flat[key], flat_ref[key], atol=1e-6, rtol=1e-5, err_msg=f"{what}: {key}")


def test_scanned_gradients_with_dropout_equal_layer_list():
    """Under nnx.value_and_grad in jit with every dropout on, the scanned stack gives the loop's loss and
    gradients (so each layer gets the same, layer-specific dropout masks)."""
    reference, cfg, _, _ = _reference_gradients()
    scanned, _, _ = _copy_weights(reference, cfg, cfg.replace(scan_layers=True))
    _assert_same_gradients(scanned, "scan")


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_remat_policies_keep_gradients(scan, policy):
    """Every remat policy gives the policy-"none" loss and gradients (1e-6), dropout on, looped or scanned."""
    reference, cfg, _, _ = _reference_gradients()
    model, _, _ = _copy_weights(reference, cfg, cfg.replace(scan_layers=scan, remat=policy))
    _assert_same_gradients(model, f"{policy} scan={scan}")
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.grad(lambda m: m(None, jnp.asarray(LABEL)).sum())(nnx.merge(graphdef, s)))(state)
    assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)


def test_scan_compiles_one_layer_body():
    """The scanned model's program does not grow with depth: the traced forward+backward has the same
    equations for 2 and 6 layers, and the compiled forward loops (HLO while) instead of unrolling."""
    sizes = {}
    for n in (2, 6):
        cfg = config.preset("tiny_opt", vocab_size=64, n_decoder_layers=n, scan_layers=True, remat="full")
        graphdef, state = nnx.split(hf_fixtures.new_model(cfg))

        def loss_and_grad(state):
            return nnx.value_and_grad(lambda m: m(None, jnp.asarray(LABEL)).mean())(nnx.merge(graphdef, state))

        jaxpr = jax.make_jaxpr(loss_and_grad)(state)
        sizes[n] = (len(jaxpr.eqns), str(jaxpr).count("dot_general"))
        assert any(e.primitive.name == "scan" for e in jaxpr.eqns)
    assert sizes[2] == sizes[6]
    hlo = jax.jit(lambda s: nnx.merge(graphdef, s)(None, jnp.asarray(LABEL))).lower(state).compile().as_text()
    assert hlo.count(" while(") == 1  # the decoder stack: one loop, one layer body


def test_unknown_remat_policy_fails_naming_it():
    """A mistyped remat policy is refused at config time, naming the field, the value and the choices."""
    with pytest.raises(ValueError, match=r"remat must be one of \('none', 'full', 'dots', 'dots_no_batch'\) "
                                         r"\(got 'sometimes'\)"):
        config.preset("tiny", remat="sometimes")
    with pytest.raises(ValueError, match="dtype must be one of"):
        config.preset("tiny", dtype="bf16")


def _dot_operand_dtypes(jaxpr) -> set:
    """dtypes of every dot_general operand, nested jaxprs (scan, remat, pjit) included."""
    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.update(str(v.aval.dtype) for v in eqn.invars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= _dot_operand_dtypes(inner)
    return found


def test_bfloat16_compute_with_float32_parameters():
    """dtype=bfloat16, param_dtype=float32: parameters and their gradients stay float32, every matmul
    reads bfloat16, and label_logits come out float32, close to the float32 model's.

    Tolerance: 0.1 absolute on logits spanning about +-4.5 (bf16 keeps 8 significant bits, ~0.4%
    per rounding, and a residual stream passes several roundings per layer; measured 0.024-0.03),
    and the same argmax for at least 90% of positions (measured: all).
    """
    cfg = config.preset("tiny", vocab_size=64, scan_layers=True)
    reference = hf_fixtures.new_model(cfg)
    model, _, _ = _copy_weights(reference, cfg, cfg.replace(dtype="bfloat16"))
    ctx, lab = jnp.asarray(CONTEXT), jnp.asarray(LABEL)
    assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {"float32"}
    forward = jax.jit(lambda m: m.label_logits(ctx, lab))
    logits, want = forward(model), np.asarray(forward(reference))
    assert logits.dtype == jnp.float32
    assert 0 < np.abs(np.asarray(logits) - want).max() <= 0.1
    assert np.mean(np.argmax(logits, -1) == np.argmax(want, -1)) >= 0.9
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).label_logits(ctx, lab))(state)
    assert _dot_operand_dtypes(jaxpr.jaxpr) == {"bfloat16"}
    _, grads = _grads(model, True)
    assert {str(x.dtype) for x in jax.tree.leaves(grads)} == {"float32"}


def test_train_step_runs_a_scanned_rematerialised_model():
    """The real train step (plain jit, nnx.value_and_grad, dropout reseeded from the state, CRINGE) takes a
    scanned model with remat: the loss falls on a fixed batch and the stacked parameters keep shape and dtype."""
    import optax

    from bb3x_jax.train import step as step_lib

    cfg = config.preset("tiny_opt", vocab_size=64, dropout=0.1, scan_layers=True, remat="dots_no_batch")
    rng = np.random.default_rng(0)
    label = rng.integers(3, 64, size=(4, 5)).astype(np.int32)
    label[:, -1] = cfg.pad_id
    batch = {"context_ids": rng.integers(3, 64, size=(4, 6)).astype(np.int32), "label_ids": label,
             "feedback": np.array([1, 0, -1, 1], np.int32), "valid": np.ones(4, bool)}
    tx = optax.sgd(0.5)
    graphdef, state = step_lib.init_state(hf_fixtures.new_model(cfg), tx, 0)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state.params)
    train_step = step_lib.make_train_step(graphdef, tx, objective="mle", pad_id=cfg.pad_id)
    losses = []
    for _ in range(3):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] and all(np.isfinite(losses))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state.params) == shapes
