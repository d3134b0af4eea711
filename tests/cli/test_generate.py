"""``python -m bb3x_jax.cli.generate``: JSONL in, the API's generations out; bad lines named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bb3x_jax import decoding
from bb3x_jax.model.formats import tables
from tests import REPO, bad_inputs
from tests.model import hf_fixtures


def _run(*args, stdin: str):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "bb3x_jax.cli.generate", *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_cli_generates_what_the_api_generates(tmp_path):
    """Each JSONL context gets the beam-search ids that ``decoding.generate`` gives (end token kept),
    and a malformed line stops the run with its line number."""
    hf, cfg = hf_fixtures.chatty_blenderbot(end_bias=2.0)
    hf.save_pretrained(tmp_path / "model")
    model = hf_fixtures.new_model(cfg)
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_blenderbot_table(cfg))
    contexts = [[5, 6, 7, 9, 11], [8, 9, 10], [3, 4, 5, 6, 7, 8, 9, 10]]
    lines = "".join(json.dumps({"id": i, "context_ids": c}) + "\n" for i, c in enumerate(contexts))
    out = _run(str(tmp_path / "model"), "--method=beam", "--beam_size=3", "--max_len=10", stdin=lines)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    padded = np.zeros((3, 8), np.int32)
    for i, c in enumerate(contexts):
        padded[i, : len(c)] = c
    expected = decoding.generate(model, padded, decoding.Settings(method="beam", beam_size=3, max_len=10))
    for i, result in enumerate(results):
        row = [int(t) for t in expected[i]]
        row = row[: row.index(2) + 1] if 2 in row else [t for t in row if t != 0]
        assert result["id"] == i and result["response_ids"] == row

    bad = _run(str(tmp_path / "model"), stdin=lines + '{"context": "text but no tokenizer"}\n')
    assert bad.returncode != 0 and "-:4:" in bad.stderr


def test_cli_speaks_text_with_the_models_own_tokenizer(tmp_path):
    """A ParlAI checkpoint carries its tokenizer: text contexts in, text out, no --tokenizer; the
    context ids are the checkpoint's framing (bart) of the text, and the response decodes the ids."""
    import bb3x_jax
    from bb3x_jax.data import framing as framing_lib
    from tests import checkpoint_fixtures as fx

    encoder, merges = fx.gpt2_bpe(str(tmp_path / "ckpt"))  # the BPE files beside the model file
    path = fx.parlai_trio_by_hand(str(tmp_path / "ckpt" / "model"), encoder, text_truncate=16)
    contexts = ["hello there\nhow are you?", "I like music"]
    lines = "".join(json.dumps({"context": c}) + "\n" for c in contexts)
    out = _run(path, "--max_len=6", stdin=lines)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    model = bb3x_jax.load(path)
    framing = model.framing()
    assert framing.context == "bart" and framing.text_truncate == 16
    ids = framing_lib.context_ids(contexts, model.tokenizer, framing)
    expected = decoding.generate(model.network, ids, decoding.Settings(max_len=6))
    for result, row in zip(results, expected):
        row = [int(t) for t in row]
        row = row[: row.index(2) + 1] if 2 in row else [t for t in row if t != 0]
        assert result["response_ids"] == row
        assert result["response"] == model.tokenizer.decode([t for t in row if t != 2]).strip()


@pytest.mark.parametrize("case", bad_inputs.cases("generate"), ids=lambda case: case.name)
def test_bad_generation_input_is_one_line_and_status_2(case, tmp_path, bad_input_models):
    """Ids outside [0, vocab) and a missing model end in one line naming the input line (or path), status 2."""
    bad_inputs.check(case, str(tmp_path), bad_input_models)
