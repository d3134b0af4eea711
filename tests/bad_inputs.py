"""A corpus of bad inputs for the command lines, each a user mistake with its expected one-line error.

Each ``Case`` builds its input under a test's ``tmp_path`` and names the command
line, the text its one stderr line must hold, and the files that must come out
unchanged byte for byte. ``check`` runs it as a user would (a subprocess) and
asserts: exit status 2, exactly one non-empty stderr line, no traceback, the
files unchanged. A new mistake joins by adding a ``Case`` to ``CASES``.
``deadline`` turns a hang into a test failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from bb3x_jax.data import release, schema
from tests import REPO
from tests.data import release_fixtures as rfx

MODULES = {"data": "bb3x_jax.data", "generate": "bb3x_jax.cli.generate", "convert": "bb3x_jax.cli.convert"}


@dataclasses.dataclass(frozen=True)
class Built:
    args: list[str]  # after the module name
    expect: str | tuple[str, ...]  # held by the one stderr line
    keep: tuple[str, ...] = ()  # files that must be unchanged


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    command: str  # a key of MODULES
    build: Callable[[str, "Models"], Built]  # (tmp folder, shared models) -> what to run


class Models:
    """Tiny checkpoints made once per test session and shared (read-only) by the cases."""

    def __init__(self, root: str):
        self.root = root
        self._hf = self._parlai = None

    @property
    def hf_dir(self) -> str:
        """A tiny transformers Blenderbot directory (vocabulary of 67)."""
        if self._hf is None:
            from tests.model import hf_fixtures  # deferred: torch and transformers load only when needed

            hf, _ = hf_fixtures.chatty_blenderbot(end_bias=2.0)
            self._hf = os.path.join(self.root, "hf")
            hf.save_pretrained(self._hf)
        return self._hf

    @property
    def parlai_model(self) -> str:
        """A tiny ParlAI checkpoint (model, model.opt, model.dict, GPT-2's BPE files beside it)."""
        if self._parlai is None:
            from tests import checkpoint_fixtures as cfx  # deferred: torch loads only when needed

            folder = os.path.join(self.root, "parlai")
            encoder, _ = cfx.gpt2_bpe(folder)
            self._parlai = cfx.parlai_trio_by_hand(os.path.join(folder, "model"), encoder, text_truncate=16)
        return self._parlai


# ------------------------------------------------------------------ releases

def _deep_release(tmp: str, bad: bytes) -> str:
    """A release whose chunk 8 holds 300 good conversations, then ``bad`` (line 301, a later worker batch)."""
    good = json.dumps(rfx.CONVO_A).encode()
    empty = json.dumps({"user_pseudo_id": "u9", "chat_id": "empty", "message_history": []}).encode()
    return rfx.write_release(os.path.join(tmp, "rel"), extra_lines={8: [good, empty] * 150 + [bad]})


def _deep_malformed(tmp, models):
    folder = _deep_release(tmp, b"{oops")
    return Built(["stats", "--manual_dir", folder, "--workers", "2"], "release_data_08.jsonl:301: malformed_json")


def _deep_truncated(tmp, models):
    folder = _deep_release(tmp, json.dumps(rfx.CONVO_B).encode()[:40])
    return Built(["stats", "--manual_dir", folder, "--workers", "2"], "release_data_08.jsonl:301: malformed_json")


def _chunk_is_a_folder(tmp, models):
    folder = rfx.write_release(os.path.join(tmp, "rel"))
    chunk = os.path.join(folder, "release_data_07.jsonl")
    os.remove(chunk)
    os.mkdir(chunk)
    return Built(["stats", "--manual_dir", folder, "--workers", "0"],
                 "release_data_07.jsonl: unreadable_file: a folder, not a chunk file")


def _truncated_tarball(tmp, models):
    folder = rfx.write_release(os.path.join(tmp, "rel"))
    tarball = os.path.join(tmp, schema.TARBALL_NAME)
    release.write_tarball(folder, tarball)
    with open(tarball, "rb") as f:
        data = f.read()
    with open(tarball, "wb") as f:
        f.write(data[: len(data) // 2])
    return Built(["stats", "--manual_dir", tarball, "--sha256", "none", "--workers", "0"],
                 (f"error: {tarball}", "unreadable_file: not a readable tar archive (truncated or corrupt?)"),
                 keep=(tarball,))


# ------------------------------------------------------------------ generation

def _ids_input(tmp: str, bad_ids: list[int]) -> str:
    path = os.path.join(tmp, "contexts.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"context_ids": [5, 6, 7]}) + "\n" + json.dumps({"context_ids": bad_ids}) + "\n")
    return path


def _id_case(bad_ids: list[int], bad: int):
    def build(tmp, models):
        path = _ids_input(tmp, bad_ids)
        return Built([models.hf_dir, "--input", path, "--max_len=4"],
                     f"generate: {path}:2: id {bad} is outside the vocabulary [0, 67)")
    return build


def _generate_missing_model(tmp, models):
    path = _ids_input(tmp, [5])
    missing = os.path.join(tmp, "no_such_model")
    return Built([missing, "--input", path], f"generate: {missing}")


# ------------------------------------------------------------------ conversion

def _existing_parlai_destination(tmp, models):
    dst = os.path.join(tmp, "out", "model")
    os.makedirs(os.path.dirname(dst))
    with open(dst, "wb") as f:
        f.write(b"an earlier export")
    return Built([models.parlai_model, dst, "--to", "parlai"], f"convert: {dst}", keep=(dst,))


def _existing_parlai_opt(tmp, models):
    dst = os.path.join(tmp, "out", "model")
    os.makedirs(os.path.dirname(dst))
    with open(dst + ".opt", "w") as f:
        f.write('{"model": "an earlier export"}')
    return Built([models.parlai_model, dst, "--to", "parlai"], f"convert: {dst}.opt", keep=(dst + ".opt",))


def _existing_hf_destination(tmp, models):
    dst = os.path.join(tmp, "hf_out")
    os.makedirs(dst)
    weights = os.path.join(dst, "model.safetensors")
    with open(weights, "wb") as f:
        f.write(b"earlier weights")
    return Built([models.hf_dir, dst, "--to", "hf"], f"convert: {dst}", keep=(weights,))


def _missing_source(tmp, models):
    src = os.path.join(tmp, "no_such_checkpoint.pt")
    return Built([src, os.path.join(tmp, "out"), "--to", "hf"], f"convert: {src}")


def _text_renamed_pt(tmp, models):
    src = os.path.join(tmp, "notes.pt")
    with open(src, "w") as f:
        f.write("hello, these are notes, not a checkpoint\n")
    return Built([src, os.path.join(tmp, "out"), "--to", "hf"], f"convert: {src}", keep=(src,))


CASES = [
    Case("deep_malformed_line_with_workers", "data", _deep_malformed),
    Case("deep_truncated_line_with_workers", "data", _deep_truncated),
    Case("chunk_path_is_a_folder", "data", _chunk_is_a_folder),
    Case("truncated_tarball", "data", _truncated_tarball),
    Case("id_past_the_vocabulary", "generate", _id_case([5, 1000000000], 1000000000)),
    Case("id_equal_to_vocab_size", "generate", _id_case([5, 67], 67)),
    Case("negative_id", "generate", _id_case([5, -3, 7], -3)),
    Case("missing_model", "generate", _generate_missing_model),
    Case("existing_parlai_destination", "convert", _existing_parlai_destination),
    Case("existing_parlai_opt", "convert", _existing_parlai_opt),
    Case("existing_hf_destination", "convert", _existing_hf_destination),
    Case("missing_source", "convert", _missing_source),
    Case("text_file_renamed_pt", "convert", _text_renamed_pt),
]


def cases(command: str) -> list[Case]:
    return [case for case in CASES if case.command == command]


def run(command: str, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", MODULES[command], *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check(case: Case, tmp: str, models: Models) -> str:
    """Runs the case; asserts status 2, one stderr line holding the expected text, kept files unchanged.

    Returns the stderr line."""
    built = case.build(tmp, models)
    before = {path: open(path, "rb").read() for path in built.keep}
    out = run(case.command, built.args)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert len(lines) == 1, out.stderr
    for expected in (built.expect,) if isinstance(built.expect, str) else built.expect:
        assert expected in lines[0], (expected, lines[0])
    for path, data in before.items():
        with open(path, "rb") as f:
            assert f.read() == data, f"{path} changed"
    return lines[0]


@contextlib.contextmanager
def deadline(seconds: int):
    """Raises TimeoutError in the main thread after ``seconds``: a hang fails the test instead of the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
