"""ParlAI checkpoints as ParlAI writes them (model, model.opt, model.dict): in through ``bb3x_jax.load``
with their tokenizer, out through ``save_pytorch(format="parlai")`` into files ParlAI loads strictly."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import bb3x_jax
from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data.tokenizers import files as tokenizer_files
from bb3x_jax.model import api
from tests import checkpoint_fixtures as fx

CONTEXTS = ["hi", "hello there\nhow are you?", "I love music.\nWhat do you like?\nI like pasta and science"]
LABELS = ["hello! do you like music?", "fine", "that sounds great, tell me more about your favorite pasta"]


@pytest.fixture(scope="module")
def datapath(tmp_path_factory):
    root = tmp_path_factory.mktemp("parlai_ckpt")
    fx.gpt2_bpe(str(root / "data" / "gpt2"))
    return str(root / "data")


def _gpt2(datapath: str) -> str:
    return os.path.join(datapath, "gpt2")


def _parlai_agent(path: str, datapath: str):
    from parlai.core.agents import create_agent_from_model_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_agent_from_model_file(path, {"datapath": datapath, "datatype": "valid"})


def _parlai_scores(agent, contexts, labels) -> tuple[list, list, np.ndarray]:
    """(text vecs, label vecs, scores [n, T, V]) from ParlAI's own agent and model (teacher forcing)."""
    observations = []
    for context, label in zip(contexts, labels):
        observations.append(agent.observe({"text": context, "eval_labels": [label], "episode_done": True}))
        agent.reset()
    batch = agent.batchify(observations)
    agent.model.eval()  # as ParlAI's eval_step (its attention dropout is on in training)
    with torch.no_grad():
        scores, _, _ = agent.model(batch.text_vec, ys=batch.label_vec)
    texts = [o["text_vec"].tolist() for o in observations]
    labels_vec = [o["eval_labels_vec"].tolist() for o in observations]
    return texts, labels_vec, scores.float().numpy()


def _assert_same_scores(ours, theirs):
    ours_ctx, ours_lab, ours_scores = ours
    ref_ctx, ref_lab, ref_scores = theirs
    assert ours_ctx == ref_ctx and ours_lab == ref_lab
    for i, lab in enumerate(ref_lab):
        np.testing.assert_allclose(ours_scores[i, : len(lab)], ref_scores[i, : len(lab)], atol=1e-4, rtol=0)


@pytest.mark.parlai
@pytest.mark.parametrize("model_type", ["bart", "transformer/generator"])
def test_loads_what_parlai_agent_save_writes(datapath, tmp_path, model_type):
    """A checkpoint written by ParlAI's agent.save() (no "opt" in the weights file) loads with its
    architecture from model.opt and its dictionary from model.dict; the pairs are framed as the agent
    frames them and the logits equal the agent's model's (1e-4)."""
    path = fx.parlai_agent_save(str(tmp_path / "ckpt" / "model"), datapath, model=model_type)
    assert "opt" not in torch.load(path, weights_only=True, map_location="cpu")
    model = bb3x_jax.load(path, bpe_dir=_gpt2(datapath))
    assert model.tokenizer_spec.kind == "parlai" and model.tokenizer.vocab_size == model.config.vocab_size
    assert model.config.decoder_start == ((2, 1) if model_type == "bart" else (1,))
    agent = _parlai_agent(path, datapath)
    for text in CONTEXTS + LABELS:
        assert model.tokenizer.encode(text) == agent.dict.txt2vec(text)
    _assert_same_scores(fx.framed_logits(model, CONTEXTS, LABELS), _parlai_scores(agent, CONTEXTS, LABELS))


@pytest.mark.parlai
def test_export_is_loaded_strictly_by_parlai(datapath, tmp_path):
    """save_pytorch(format="parlai") writes model, model.opt and model.dict (the source's, byte for
    byte); create_agent_from_model_file builds the same agent from them, loads the weights strictly,
    and scores the pairs as the source does."""
    source = fx.parlai_agent_save(str(tmp_path / "src" / "model"), datapath, model="bart")
    model = bb3x_jax.load(source, bpe_dir=_gpt2(datapath))
    out = str(tmp_path / "export" / "model")
    written = model.save_pytorch(out, format="parlai")
    assert written[:3] == [out, out + ".opt", out + ".dict"]
    assert open(out + ".dict", "rb").read() == open(source + ".dict", "rb").read()
    assert set(torch.load(out, weights_only=True)) == {"model"}
    agent = _parlai_agent(out, datapath)  # its load_state_dict is strict
    assert type(agent).__name__ == "BartAgent"
    missing, unexpected = agent.model.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)
    assert not missing and not unexpected
    _assert_same_scores(fx.framed_logits(model, CONTEXTS, LABELS), _parlai_scores(agent, CONTEXTS, LABELS))
    again = bb3x_jax.load(out)  # the BPE files were copied beside the export
    assert api.count_mismatch(model, again) == 0


@pytest.mark.parametrize("fp16", [False, True])
def test_hand_written_trio_loads_fp16_or_fp32(datapath, tmp_path, fp16):
    """The same three files written without ParlAI (fp16 weights as zoo models store them, optimizer
    state present and ignored) load; fp16 weights become their float32 values."""
    path = fx.parlai_trio_by_hand(str(tmp_path / "model"), os.path.join(_gpt2(datapath), "encoder.json"), fp16=fp16)
    model = bb3x_jax.load(path, bpe_dir=_gpt2(datapath))
    weights = torch.load(path, weights_only=True)["model"]["embeddings.weight"]
    assert weights.dtype == (torch.float16 if fp16 else torch.float32)
    np.testing.assert_array_equal(np.asarray(model.network.embeddings[...]), weights.float().numpy())
    assert model.framing() == framing_lib.Framing(48, 12, context="bart", label="parlai")


def test_missing_files_are_named(datapath, tmp_path):
    """No model.opt, no model.dict, no BPE files: the error names the file and where it looked; the
    BPE files are found beside the checkpoint, in bpe_dir, or in the opt's datapath/gpt2."""
    encoder = os.path.join(_gpt2(datapath), "encoder.json")
    path = fx.parlai_trio_by_hand(str(tmp_path / "a" / "model"), encoder)
    with pytest.raises(tokenizer_files.TokenizerFileError, match=r"encoder\.json.*bpe_dir"):
        bb3x_jax.load(path)
    opt = json.load(open(path + ".opt"))
    json.dump({**opt, "datapath": datapath}, open(path + ".opt", "w"))
    assert bb3x_jax.load(path).tokenizer_spec.files["vocab"] == encoder  # <opt datapath>/gpt2
    json.dump(opt, open(path + ".opt", "w"))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(os.path.join(_gpt2(datapath), name), tmp_path / "a" / name)
    assert bb3x_jax.load(path).tokenizer_spec.files["vocab"] == str(tmp_path / "a" / "encoder.json")
    os.remove(path + ".dict")
    with pytest.raises(tokenizer_files.TokenizerFileError, match=r"model\.dict is missing"):
        bb3x_jax.load(path)
    os.remove(path + ".opt")
    with pytest.raises(tokenizer_files.TokenizerFileError, match=r"model\.opt is missing"):
        bb3x_jax.load(path)


def test_export_needs_a_parlai_dictionary(tmp_path):
    """A model without a ParlAI dictionary (e.g. this project's sentencepiece runs) is not exported
    as a ParlAI checkpoint that ParlAI could not use."""
    from tests.model import hf_fixtures

    hf, _ = hf_fixtures.tiny_blenderbot()
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="needs the ParlAI dictionary"):
        bb3x_jax.load(str(tmp_path / "hf")).save_pytorch(str(tmp_path / "out"), format="parlai")


@pytest.mark.parlai
def test_fid_agent_checkpoint_exports_as_its_generator(datapath, tmp_path):
    """BB3-3B's layout: a fusion-in-decoder agent from ParlAI's projects (seq2seq_* keys, retriever
    keys, generation with bart). It loads (the retriever reported) and exports as the bart generator
    that ParlAI's core agent loads strictly and scores as we do; the source agent is recorded."""
    path = fx.parlai_agent_save(str(tmp_path / "fid" / "model"), datapath, model="bart")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"] = {("seq2seq_" + k if k.startswith(("encoder.", "decoder.")) else k): v
                           for k, v in checkpoint["model"].items()}
    checkpoint["model"]["retriever.query_encoder.weight"] = torch.zeros(3)
    torch.save(checkpoint, path)
    opt = json.load(open(path + ".opt"))
    opt.update(model="projects.seeker.agents.seeker:ComboFidGoldDocumentAgent", generation_model="bart")
    json.dump(opt, open(path + ".opt", "w"))
    model = bb3x_jax.load(path, bpe_dir=_gpt2(datapath))
    assert model.framing().context == "bart" and model.config.decoder_start == (2, 1)
    out = str(tmp_path / "export" / "model")
    model.save_pytorch(out, format="parlai")
    exported = json.load(open(out + ".opt"))
    assert exported["model"] == "bart" and exported["bb3x_source_model"] == opt["model"]
    agent = _parlai_agent(out, datapath)
    _assert_same_scores(fx.framed_logits(model, CONTEXTS, LABELS), _parlai_scores(agent, CONTEXTS, LABELS))
