"""The public API: bb3x_jax.load, model.logits, save_pytorch and the convert command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import bb3x_jax
from bb3x_jax.model import api
from tests import REPO
from tests.model import hf_fixtures


def test_logits_teacher_forced_encoder_decoder(tmp_path):
    """load(hf dir).logits(context, label)[b, t] is transformers' score of label[t] after start + label[:t]."""
    hf, _ = hf_fixtures.tiny_blenderbot()
    hf.save_pretrained(tmp_path / "bb")
    model = bb3x_jax.load(str(tmp_path / "bb"))
    context = np.array([[5, 6, 7, 0], [8, 9, 10, 11]])
    label = np.array([[4, 5, 2], [6, 2, 0]])
    decoder_in = np.array([[1, 4, 5], [1, 6, 2]])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(context), attention_mask=torch.tensor(context != 0).long(),
                 decoder_input_ids=torch.tensor(decoder_in)).logits.numpy()
    ours = np.asarray(model.logits(context, label))
    assert ours.shape == (2, 3, 67)
    np.testing.assert_allclose(ours[label != 0], ref[label != 0], atol=1e-4)


def test_logits_decoder_only_concatenate_context_and_label(tmp_path):
    """For OPT, right-padded contexts are left-aligned and only the label positions are scored."""
    hf, _ = hf_fixtures.tiny_opt()
    hf.save_pretrained(tmp_path / "opt")
    model = bb3x_jax.load(str(tmp_path / "opt"))
    context = np.array([[2, 5, 6, 1], [2, 8, 9, 10]])  # pad id 1, right-padded
    label = np.array([[7, 8, 2], [11, 2, 1]])
    ours = np.asarray(model.logits(context, label))
    for row, (ctx, lab) in enumerate(zip(context, label)):
        seq = np.concatenate([ctx[ctx != 1], lab[lab != 1]])
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(seq[None])).logits.numpy()[0]
        n_ctx = int((ctx != 1).sum())
        for t in range(int((lab != 1).sum())):
            np.testing.assert_allclose(ours[row, t], ref[n_ctx - 1 + t], atol=1e-4)


def test_convert_command_round_trip(tmp_path):
    """convert ParlAI -> parlai and ParlAI -> orbax -> parlai keep every parameter bit-exact and the
    dictionary byte for byte; a model without a ParlAI dictionary is refused in one line."""
    from tests import checkpoint_fixtures as fx

    encoder, _ = fx.gpt2_bpe(str(tmp_path / "src"))
    source = fx.parlai_trio_by_hand(str(tmp_path / "src" / "model"), encoder)
    run = lambda *a, check=True: subprocess.run([sys.executable, "-m", "bb3x_jax.cli.convert", *a], cwd=REPO,  # noqa: E731
                                                capture_output=True, text=True, check=check)
    out = json.loads(run(source, str(tmp_path / "m.pt"), "--to", "parlai").stdout.strip().splitlines()[-1])
    assert out["parameters"] > 0 and out["variant"] == "prelayernorm"
    assert out["written"][:3] == [str(tmp_path / "m.pt"), str(tmp_path / "m.pt.opt"), str(tmp_path / "m.pt.dict")]
    run(source, str(tmp_path / "ox"), "--to", "orbax")
    run(str(tmp_path / "ox"), str(tmp_path / "again" / "model"), "--to", "parlai")
    original = bb3x_jax.load(source)
    for path in (str(tmp_path / "m.pt"), str(tmp_path / "ox"), str(tmp_path / "again" / "model")):
        assert api.count_mismatch(original, bb3x_jax.load(path)) == 0, path
    assert open(tmp_path / "again" / "model.dict", "rb").read() == open(source + ".dict", "rb").read()
    hf, _ = hf_fixtures.tiny_blenderbot()
    hf.save_pretrained(tmp_path / "bb")
    refused = run(str(tmp_path / "bb"), str(tmp_path / "x.pt"), "--to", "parlai", check=False)
    assert refused.returncode == 2 and "needs the ParlAI dictionary" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_orbax_round_trip_through_the_convert_command(tmp_path):
    """hf -> orbax (convert CLI) -> load() -> hf keeps every parameter bit-exact and the logits equal."""
    hf, _ = hf_fixtures.tiny_blenderbot()
    hf.save_pretrained(tmp_path / "bb")
    subprocess.run([sys.executable, "-m", "bb3x_jax.cli.convert", str(tmp_path / "bb"), str(tmp_path / "ox"), "--to",
                    "orbax"], cwd=REPO, capture_output=True, text=True, check=True)
    original = bb3x_jax.load(str(tmp_path / "bb"))
    restored = bb3x_jax.load(str(tmp_path / "ox"))  # the folder of steps: newest step
    assert restored.config == original.config and "step 0" in restored.source
    assert api.count_mismatch(original, restored) == 0
    assert api.count_mismatch(original, bb3x_jax.load(str(tmp_path / "ox" / "0"))) == 0
    restored.save_pytorch(str(tmp_path / "bb2"), format="hf")
    assert api.count_mismatch(original, bb3x_jax.load(str(tmp_path / "bb2"))) == 0
    context, label = np.array([[5, 6, 7, 0]]), np.array([[4, 5, 2]])
    np.testing.assert_array_equal(np.asarray(original.logits(context, label)), np.asarray(restored.logits(context, label)))


def test_init_from_places_converted_weights_and_checks_the_tokenizer(tmp_path):
    """train.init_from builds the run's model from a checkpoint's weights (the run's dropout
    applies) and refuses a tokenizer whose vocabulary does not fit, or a truncation its positions
    cannot hold, naming the key."""
    from bb3x_jax import config as config_lib
    from bb3x_jax import sharding
    from bb3x_jax.train import runtime as setup_lib
    from configs import cringe

    hf, _ = hf_fixtures.tiny_blenderbot()
    hf.save_pretrained(tmp_path / "bb")
    original = bb3x_jax.load(str(tmp_path / "bb"))
    config = cringe.get_config()
    config.train.init_from = str(tmp_path / "bb")
    config.model.dropout = 0.2
    config.data.text_truncate = 40
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    with pytest.raises(config_lib.ConfigError, match="has 32 positions, the data needs 40"):
        setup_lib.init_model(config, None, mesh)
    config.data.text_truncate = 32
    cfg, network = setup_lib.init_model(config, None, mesh)
    assert cfg.dropout == 0.2 and cfg.d_model == original.config.d_model
    assert api.count_mismatch(original, api.BB3Model(network, cfg)) == 0

    config.model.scan_layers = True  # the same weights, stacked for a scanned model
    scanned_cfg, scanned = setup_lib.init_model(config, None, mesh)
    context, label = np.array([[5, 6, 7, 0]]), np.array([[4, 5, 2]])
    np.testing.assert_allclose(np.asarray(scanned.label_logits(context, label)),
                               np.asarray(original.logits(context, label)), atol=1e-5)

    class BigTokenizer:
        vocab_size, pad_id, start_id, end_id = 10_000, 0, 1, 2

    with pytest.raises(config_lib.ConfigError, match="config.train.init_from"):
        setup_lib.init_model(config, BigTokenizer(), mesh)


def test_load_refuses_what_it_cannot_read(tmp_path):
    """Unknown files fail clearly instead of guessing."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        bb3x_jax.load(str(tmp_path / "empty"))
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a ParlAI checkpoint"):
        bb3x_jax.load(str(tmp_path / "x.pt"))


@pytest.mark.parametrize("bad", [1000000000, 67, -3])
def test_generate_refuses_ids_outside_the_vocabulary(tmp_path, bad):
    """BB3Model.generate raises (never decodes) for an id outside [0, vocab_size)."""
    hf, cfg = hf_fixtures.tiny_blenderbot()
    hf.save_pretrained(tmp_path / "model")
    model = bb3x_jax.load(str(tmp_path / "model"))
    assert model.config.vocab_size == 67
    with pytest.raises(ValueError, match=rf"id {bad} is outside the vocabulary \[0, 67\)"):
        model.generate(np.array([[5, bad, 7]]), max_len=3)
    assert model.generate(np.array([[5, 66, 7]]), max_len=3).shape[0] == 1
