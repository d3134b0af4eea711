"""ParlAI checkpoint files: round trips, and logits equal ParlAI's own TransformerGeneratorModel."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from bb3x_jax.data.tokenizers import bpe
from bb3x_jax.model.formats import parlai, tables
from tests.model import hf_fixtures


def test_blenderbot_to_parlai_file_and_back(tmp_path):
    """transformers Blenderbot -> ours -> ParlAI file -> ours: bit-exact weights, same logits."""
    hf, cfg = hf_fixtures.tiny_blenderbot()
    model = hf_fixtures.new_model(cfg)
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_blenderbot_table(cfg))
    path = str(tmp_path / "model.pt")
    bpe.write_parlai_dict(tmp_path / "source.dict", [f"tok{i}" for i in range(cfg.vocab_size)])
    written = parlai.save_parlai(model, cfg, path, dict_file=str(tmp_path / "source.dict"))
    assert written == [path, path + ".opt", path + ".dict"]  # ParlAI's three files, the options outside the weights
    assert set(torch.load(path, weights_only=True)) == {"model"}
    assert open(path + ".dict").read() == open(tmp_path / "source.dict").read()
    again, cfg2, report = parlai.load_parlai(path)
    # ParlAI's generator masks the __start__ logit; everything else is the same architecture.
    assert cfg2 == cfg.replace(mask_start_logit=True) and report.ignored_keys == [] and not report.fid_prefixes
    for (path_a, a), (_, b) in zip(nnx.iter_graph(model), nnx.iter_graph(again)):
        if isinstance(a, nnx.Param):
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path_a))


def test_fid_prefixes_and_retriever_keys_are_reported(tmp_path):
    """BB3-3B's FiD key prefixes load; keys outside the generator are listed, not silently dropped."""
    _, cfg = hf_fixtures.tiny_blenderbot()
    model = hf_fixtures.new_model(cfg)
    state = parlai.state_dict_for_parlai(model, cfg)
    fid = {("seq2seq_" + k if k.startswith(("encoder.", "decoder.")) else k): torch.from_numpy(v) for k, v in state.items()}
    fid["retriever.query_encoder.weight"] = torch.zeros(3)
    torch.save({"model": fid, "opt": parlai.opt_from_config(cfg)}, tmp_path / "fid.pt")
    _, _, report = parlai.load_parlai(str(tmp_path / "fid.pt"))
    assert report.fid_prefixes and report.ignored_keys == ["retriever.query_encoder.weight"]


@pytest.mark.parametrize(
    "option, message",
    [
        ({"learn_positional_embeddings": False}, "sinusoidal"),
        ({"n_segments": 2}, "n_segments=2"),
        ({"variant": "postln"}, "variant='postln'"),
        ({"activation": "swish"}, "activation='swish'"),
    ],
)
def test_unsupported_options_fail_by_name(option, message):
    """An architecture option this implementation cannot honour is refused by name."""
    _, cfg = hf_fixtures.tiny_blenderbot()
    with pytest.raises(tables.CheckpointMismatch, match=message):
        parlai.config_from_opt({**parlai.opt_from_config(cfg), **option}, vocab_size=cfg.vocab_size)


class _Dictionary:
    """The few members ParlAI's TransformerGeneratorModel reads from a dictionary."""

    null_token, start_token, end_token, unk_token = "__null__", "__start__", "__end__", "__unk__"

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, token):
        return {"__null__": 0, "__start__": 1, "__end__": 2, "__unk__": 3}[token]


@pytest.mark.parlai
@pytest.mark.parametrize("variant", ["prelayernorm", "aiayn", "xlm", "bart"])
def test_logits_equal_parlai_transformer_generator(tmp_path, variant):
    """A ParlAI-format file written from ParlAI's own model loads here with its logits (1e-4), every variant."""
    from parlai.agents.transformer.modules import TransformerGeneratorModel

    torch.manual_seed(0)
    opt = {
        "embedding_size": 24, "n_heads": 3, "ffn_size": 40, "n_layers": 3, "n_encoder_layers": 2,
        "n_decoder_layers": 3, "n_positions": 32, "variant": variant, "activation": "gelu",
        "embeddings_scale": True, "learn_positional_embeddings": True, "n_segments": 0, "dropout": 0.0,
        "attention_dropout": 0.0, "relu_dropout": 0.0, "output_scaling": 1.0, "model": "transformer/generator",
    }
    reference = TransformerGeneratorModel(opt, _Dictionary(67)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, param in reference.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    torch.save({"model": reference.state_dict(), "opt": opt}, tmp_path / "ref.pt")
    model, cfg, _ = parlai.load_parlai(str(tmp_path / "ref.pt"))
    assert cfg.variant == variant
    xs = torch.tensor([[5, 6, 7, 9, 11, 0], [8, 9, 10, 0, 0, 0]])
    ys = torch.tensor([[4, 5, 3, 8], [6, 7, 12, 2]])
    with torch.no_grad():
        ref_scores, _, _ = reference(xs, ys=ys)
    dec = np.concatenate([np.ones((2, 1), np.int64), ys.numpy()[:, :-1]], axis=1)  # [__start__] + ys[:-1]
    ours = np.asarray(model(jnp.asarray(xs.numpy()), jnp.asarray(dec)))
    np.testing.assert_allclose(ours, ref_scores.numpy(), atol=1e-4, rtol=0)

    # Export: ParlAI's own model loads our file (strict) and gives the same logits.
    bpe.write_parlai_dict(tmp_path / "ref.dict", [f"tok{i}" for i in range(67)])
    parlai.save_parlai(model, cfg, str(tmp_path / "export.pt"), dict_file=str(tmp_path / "ref.dict"))
    exported = torch.load(tmp_path / "export.pt", weights_only=True)
    with open(tmp_path / "export.pt.opt") as f:
        exported_opt = json.load(f)
    rebuilt = TransformerGeneratorModel({**opt, **exported_opt}, _Dictionary(67)).eval()
    rebuilt.load_state_dict(exported["model"], strict=True)
    with torch.no_grad():
        again, _, _ = rebuilt(xs, ys=ys)
    np.testing.assert_allclose(again.numpy(), ref_scores.numpy(), atol=1e-5, rtol=0)
