"""The data command line: stats prints one JSON object, display is readable, synthesize packs a tarball;
bad releases (tests/bad_inputs.py) end in one line and status 2, with or without workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bb3x_jax.data import __main__ as data_main
from bb3x_jax.data import schema
from tests import REPO, bad_inputs
from tests.data import release_fixtures as fx


def run_cli(*args, check=True):
    return subprocess.run(
        [sys.executable, "-m", "bb3x_jax.data", *args], cwd=REPO, capture_output=True, text=True, check=check
    )


@pytest.mark.parametrize("stream, split", [("bot", "train"), ("human", "test"), ("crowdworkers_human", "train")])
def test_stats_prints_one_json_object_with_hand_counts(tmp_path, stream, split):
    """stdout is exactly one JSON object whose counts equal the hand-worked ones."""
    folder = fx.write_release(str(tmp_path / "rel"))
    out = run_cli("stats", "--manual_dir", folder, "--stream", stream, "--split", split, "--workers", "0")
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    stats = json.loads(lines[0])
    assert stats["examples"] == fx.EXPECTED[stream][split]
    assert stats["examples"] == stats["positive"] + stats["negative"] + stats["unlabeled"]
    assert stats["conversations"] == {"train": 2, "valid": 1, "test": 1}[split]
    assert stats["skipped"] == 0
    assert stats["reference_examples"] == schema.REFERENCE_COUNTS[stream][schema.SPLITS.index(split)]


def test_stats_skip_malformed_and_error_exit(tmp_path):
    """A bad line exits 2 with file:line on stderr; --skip_malformed counts it instead."""
    folder = fx.write_release(str(tmp_path / "rel"), extra_lines={8: [b"{oops"]})
    failed = run_cli("stats", "--manual_dir", folder, "--workers", "0", check=False)
    assert failed.returncode == 2 and "release_data_08.jsonl:1: malformed_json" in failed.stderr
    stats = json.loads(run_cli("stats", "--manual_dir", folder, "--skip_malformed", "--workers", "0").stdout)
    assert stats["skipped"] == 1 and stats["skipped_by_reason"] == {"malformed_json": 1}
    assert stats["conversations_read"] == stats["conversations_used"] + stats["skipped"]


def test_empty_conversation_is_valid_and_counted(tmp_path):
    """A conversation with an empty message_history is read as ParlAI reads it (no examples, no
    error) and counted in empty_conversations, by default and with --skip_malformed."""
    empty = json.dumps({"user_pseudo_id": "u9", "chat_id": "empty", "message_history": []}).encode()
    folder = fx.write_release(str(tmp_path / "rel"), extra_lines={8: [empty, empty]})
    plain = json.loads(run_cli("stats", "--manual_dir", folder, "--workers", "0").stdout)
    baseline = json.loads(run_cli("stats", "--manual_dir", fx.write_release(str(tmp_path / "base")),
                                  "--workers", "0").stdout)
    assert plain["empty_conversations"] == 2 and baseline["empty_conversations"] == 0
    assert plain["examples"] == baseline["examples"] and plain["skipped"] == 0
    assert plain["conversations_used"] == baseline["conversations_used"] + 2
    skipping = json.loads(run_cli("stats", "--manual_dir", folder, "--skip_malformed", "--workers", "0").stdout)
    assert skipping["empty_conversations"] == 2 and skipping["skipped"] == 0


def test_display_shows_context_label_and_feedback(tmp_path):
    """display prints each example's ids, feedback verdict, context turns and label."""
    folder = fx.write_release(str(tmp_path / "rel"))
    out = run_cli("display", "--manual_dir", folder, "--stream", "bot", "--split", "train", "-n", "5").stdout
    assert out.count("=== chat") == 4
    assert "feedback: positive (rule: like)" in out
    assert "> bot: the moon is made of rock" in out and "| I like cooking pasta" in out


def test_synthesize_then_stats_on_the_tarball(tmp_path):
    """A synthesized release packed as a tarball reads back through stats with --sha256."""
    out_dir = str(tmp_path / "syn")
    summary = json.loads(run_cli("synthesize", "--out", out_dir, "--conversations", "150", "--seed", "3", "--tarball").stdout)
    assert sorted(f for f in os.listdir(out_dir) if f.endswith(".jsonl") and f.startswith("release_data")) == [
        schema.CHUNK_TEMPLATE.format(c) for c in range(100)
    ]
    folder_stats = json.loads(run_cli("stats", "--manual_dir", out_dir, "--workers", "0").stdout)
    tar_stats = json.loads(
        run_cli("stats", "--manual_dir", summary["tarball"], "--sha256", summary["tarball_sha256"], "--workers", "0").stdout
    )
    for key in ("examples", "positive", "negative", "unlabeled", "conversations"):
        assert folder_stats[key] == tar_stats[key]
    assert folder_stats["examples"] > 0


def test_train_tokenizer_command_is_deterministic(tmp_path):
    """train_tokenizer prepares the data, writes a model, and the same input gives the same bytes."""
    folder = str(tmp_path / "syn")
    run_cli("synthesize", "--out", folder, "--conversations", "200", "--seed", "1")
    models = []
    for name in ("a", "b"):
        out = json.loads(run_cli(
            "train_tokenizer", "--manual_dir", folder, "--data_dir", str(tmp_path / "tfds"),
            "--out", str(tmp_path / f"{name}.model"), "--vocab_size", "1000", "--workers", "0",
        ).stdout)
        assert 300 < out["vocab_size"] <= 1000
        models.append(open(out["model"], "rb").read())
    assert models[0] == models[1]


def test_prepare_command_prints_split_sizes(tmp_path):
    """prepare prints JSON with each split's examples (0 for an empty split) and its report."""
    folder = fx.write_release(str(tmp_path / "rel"))
    out = json.loads(run_cli("prepare", "--manual_dir", folder, "--stream", "crowdworkers_human",
                             "--data_dir", str(tmp_path / "tfds"), "--workers", "0").stdout)
    assert out["splits"] == fx.EXPECTED["crowdworkers_human"]
    assert out["reports"]["valid"]["examples"] == 0


@pytest.mark.parametrize("case", bad_inputs.cases("data"), ids=lambda case: case.name)
def test_bad_release_is_one_line_and_status_2(case, tmp_path, bad_input_models):
    """Each bad release in the corpus ends the command with one stderr line naming the file, status 2."""
    bad_inputs.check(case, str(tmp_path), bad_input_models)


def test_worker_error_deep_in_a_file_never_hangs(tmp_path, capsys):
    """With worker processes, an error deep in a chunk ends the command every time with the error the
    inline path gives (file and line), status 2; a hang fails the deadline."""
    case = {case.name: case for case in bad_inputs.cases("data")}["deep_malformed_line_with_workers"]
    built = case.build(str(tmp_path), None)
    with bad_inputs.deadline(600):
        for _ in range(10):
            with pytest.raises(SystemExit) as exited:
                data_main.main(built.args)
            assert exited.value.code == 2
            assert built.expect in capsys.readouterr().err
        inline = [*built.args[:-1], "0"]
        with pytest.raises(SystemExit):
            data_main.main(inline)
        assert built.expect in capsys.readouterr().err


def test_empty_chunk_file_is_counted(tmp_path):
    """A 0-byte chunk file is named in the report (empty_chunk_files), not lost silently."""
    folder = fx.write_release(str(tmp_path / "rel"))
    stats = json.loads(run_cli("stats", "--manual_dir", folder, "--split", "test", "--workers", "0").stdout)
    sizes = {c: os.path.getsize(os.path.join(folder, f"release_data_{c:02d}.jsonl")) for c in range(3)}
    assert stats["empty_chunk_files"] == sum(size == 0 for size in sizes.values()) > 0
    assert all(name.endswith(".jsonl") for name in stats["empty_chunk_examples"])
