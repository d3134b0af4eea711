"""Loading a checkpoint never runs code from it: every entry point refuses a pickle that would call a
function, naming the file and what it would call, unless the user opts in (trust_pickle)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest
import torch

import bb3x_jax
from bb3x_jax.model.formats import pickles
from tests import REPO
from tests import checkpoint_fixtures as fx
from tests.model import hf_fixtures
from tests.model.formats import test_metaseq


class _CreatesAFile:
    """Unpickled, this calls open(marker, "w"): a stand-in for any code a file could run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def parlai_files(tmp_path):
    """A ParlAI checkpoint (model, .opt, .dict, BPE files beside it) whose weights file also holds
    a payload that creates ``marker`` when unpickled."""
    folder = tmp_path / "ckpt"
    encoder, _ = fx.gpt2_bpe(str(folder))
    path = fx.parlai_trio_by_hand(str(folder / "model"), encoder)
    marker = str(tmp_path / "code_ran")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["optimizer"] = {"state": _CreatesAFile(marker)}
    torch.save(checkpoint, path)
    return path, marker


def _refused(call, marker):
    with pytest.raises(pickles.UntrustedPickleError, match=r"would call (io|builtins)\.open.*trust_pickle"):
        call()
    assert not os.path.exists(marker), "code from the file ran"


def test_load_refuses_parlai_metaseq_and_bin_files_that_would_run_code(parlai_files, tmp_path):
    """bb3x_jax.load on a ParlAI file, a metaseq file and a transformers .bin that would call open():
    refused, nothing created; the message names the file and the way to opt in."""
    path, marker = parlai_files
    _refused(lambda: bb3x_jax.load(path), marker)
    try:
        bb3x_jax.load(path)
    except pickles.UntrustedPickleError as error:
        assert str(error).startswith(f"{path}: not loaded")

    hf = test_metaseq.tiny_hf_opt()
    metaseq_path = test_metaseq.write(tmp_path / "metaseq" / "consolidated.pt", test_metaseq.singleton_state(hf),
                                      extra_state={"hook": _CreatesAFile(marker)})
    _refused(lambda: bb3x_jax.load(metaseq_path), marker)

    _bin_directory(tmp_path / "bin", hook=_CreatesAFile(marker))
    _refused(lambda: bb3x_jax.load(str(tmp_path / "bin")), marker)


def _bin_directory(folder, **extra):
    """A transformers directory with pytorch_model.bin weights, as transformers 4 saved them
    (torch.save of the state dict; transformers 5 writes safetensors only)."""
    blenderbot, _ = hf_fixtures.tiny_blenderbot()
    blenderbot.save_pretrained(folder)
    os.remove(folder / "model.safetensors")
    torch.save({**blenderbot.state_dict(), **extra}, folder / "pytorch_model.bin")
    return folder


def test_real_formats_load_without_opting_in(tmp_path):
    """What real checkpoints hold needs no opt-in: transformers' own .bin weights and metaseq's
    Namespace options (ParlAI's agent.save() files: tests/model/test_parlai_checkpoints.py)."""
    bb3x_jax.load(str(_bin_directory(tmp_path / "bin")))
    hf = test_metaseq.tiny_hf_opt()
    bb3x_jax.load(test_metaseq.write(tmp_path / "old" / "checkpoint.pt", test_metaseq.singleton_state(hf),
                                     as_args=True))


def test_the_opt_in_reads_a_trusted_unusual_file(parlai_files, tmp_path):
    """A file holding an unusual but harmless type (a date) is refused naming the type; with
    trust_pickle it loads (and a trusted file's code does run: the opt-in is real)."""
    path, marker = parlai_files
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["optimizer"] = {"saved_on": datetime.date(2022, 8, 5)}
    unusual = str(tmp_path / "unusual" / "model")
    os.makedirs(os.path.dirname(unusual))
    torch.save(checkpoint, unusual)
    for suffix in (".opt", ".dict"):
        os.link(path + suffix, unusual + suffix)
    for name in ("encoder.json", "vocab.bpe"):
        os.link(os.path.join(os.path.dirname(path), name), os.path.join(os.path.dirname(unusual), name))
    os.remove(marker)
    with pytest.raises(pickles.UntrustedPickleError, match="datetime.date"):
        bb3x_jax.load(unusual)
    assert bb3x_jax.load(unusual, trust_pickle=True).config.vocab_size > 0
    bb3x_jax.load(path, trust_pickle=True)
    assert os.path.exists(marker)


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def test_command_lines_refuse_in_one_line(parlai_files, tmp_path):
    """convert, generate and training from the file (train.init_from) refuse it with one line naming
    the file and the opt-in, exit non-zero, and create nothing."""
    path, marker = parlai_files
    convert = subprocess.run([sys.executable, "-m", "bb3x_jax.cli.convert", path, str(tmp_path / "out"), "--to", "orbax"],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert convert.returncode == 2 and "Traceback" not in convert.stderr
    assert f"{path}: not loaded" in convert.stderr and "--trust_pickle" in convert.stderr
    generate = subprocess.run([sys.executable, "-m", "bb3x_jax.cli.generate", path], cwd=REPO, env=_env(),
                              input=json.dumps({"context": "hi"}) + "\n", capture_output=True, text=True, timeout=600)
    assert generate.returncode != 0 and "Traceback" not in generate.stderr and "not loaded" in generate.stderr
    train = subprocess.run([sys.executable, "main.py", "--config", "configs/cringe.py", f"--workdir={tmp_path / 'run'}",
                            f"--config.train.init_from={path}", "--config.data.synthetic.conversations=300",
                            "--config.train.steps=2", "--config.data.num_workers=0"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "error: config.train.init_from" in train.stderr and "train.trust_pickle" in train.stderr
    assert not os.path.exists(marker)
