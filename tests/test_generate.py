"""``python -m bb3x_jax.generate``: JSONL in, the API's generations out; bad lines named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from bb3x_jax import decoding
from bb3x_jax.model import convert
from tests.model import hf_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, stdin: str):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "bb3x_jax.generate", *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_cli_generates_what_the_api_generates(tmp_path):
    """Each JSONL context gets the beam-search ids that ``decoding.generate`` gives (end token kept),
    and a malformed line stops the run with its line number."""
    hf, cfg = hf_fixtures.chatty_blenderbot(end_bias=2.0)
    hf.save_pretrained(tmp_path / "model")
    model = hf_fixtures.new_model(cfg)
    convert.load_state_dict(model, hf.state_dict(), *convert.hf_blenderbot_table(cfg))
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
