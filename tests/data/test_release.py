"""Reading the release: layouts, line splitting, the tarball, and every bad-input case."""

from __future__ import annotations

import copy
import json
import os
import tarfile

import pytest

from bb3x_jax.data import extract, release, schema
from bb3x_jax.data.feedback import DEFAULT_POLICY
from tests.data import release_fixtures as fx


def _read_all(folder, split="train", skip=False, sha=schema.TARBALL_SHA256):
    location = release.locate_release(folder)
    report = release.ReadReport()
    convos = list(release.iter_conversations(location, schema.SPLIT_CHUNKS[split], report, skip_malformed=skip, tarball_sha256=sha))
    return convos, report


def test_split_chunks_match_the_reference():
    """test = chunks 0-2, valid = 3-5, train = 6-99, covering all 100 chunks once."""
    assert schema.SPLIT_CHUNKS["test"] == (0, 1, 2)
    assert schema.SPLIT_CHUNKS["valid"] == (3, 4, 5)
    assert schema.SPLIT_CHUNKS["train"] == tuple(range(6, 100))
    assert sorted(sum(schema.SPLIT_CHUNKS.values(), ())) == list(range(100))


def test_lines_split_on_newline_only(tmp_path):
    """Raw U+2028 / U+0085 / \\r inside a line do not split it (text-mode readers would)."""
    convo = copy.deepcopy(fx.CONVO_A)
    convo["message_history"][0]["text"] = "a\u2028b\u0085c\rd"
    raw = json.dumps(convo, ensure_ascii=False).encode("utf-8").replace(b"\\r", b"\r")
    assert b"\r" in raw and "\u2028".encode() in raw
    folder = fx.write_release(str(tmp_path / "rel"), convos=(), extra_lines={6: [raw]})
    convos, report = _read_all(folder)
    assert report.conversations_read == 1
    assert convos[0][2]["message_history"][0]["text"] == "a\u2028b\u0085c\rd"


@pytest.mark.parametrize("layout", ["flat", "release_data_chunks", "bb3_demo/release_data_chunks"])
def test_folder_layouts_are_found(tmp_path, layout):
    """The chunk folder itself and ParlAI's nested layouts are all accepted."""
    sub = "" if layout == "flat" else layout
    fx.write_release(str(tmp_path / sub))
    location = release.locate_release(str(tmp_path))
    assert location.kind == "folder" and len(location.chunk_files) == 100


def test_tarball_reads_the_same_as_the_folder(tmp_path):
    """A tarball (streamed, checksum checked) gives the same conversations as the unpacked folder."""
    folder = fx.write_release(str(tmp_path / "rel"))
    tarball = str(tmp_path / schema.TARBALL_NAME)
    sha = release.write_tarball(folder, tarball)
    for split in schema.SPLITS:
        from_folder, _ = _read_all(folder, split)
        from_tar, _ = _read_all(tarball, split, sha=sha)
        assert [c for _, _, c in from_folder] == [c for _, _, c in from_tar]
    # A folder holding only the tarball is found too.
    only = tmp_path / "only"
    only.mkdir()
    os.rename(tarball, only / schema.TARBALL_NAME)
    assert release.locate_release(str(only)).kind == "tarball"


def test_tarball_with_wrong_checksum_fails(tmp_path):
    """The default expected checksum is the published one, so another tarball is refused by name."""
    folder = fx.write_release(str(tmp_path / "rel"))
    tarball = str(tmp_path / schema.TARBALL_NAME)
    release.write_tarball(folder, tarball)
    with pytest.raises(release.ReleaseError, match="checksum_mismatch") as info:
        _read_all(tarball)
    assert tarball in str(info.value) and schema.TARBALL_SHA256 in str(info.value)


def test_missing_chunks_are_listed(tmp_path):
    """Missing chunk files fail with every missing chunk named (folder and tarball)."""
    folder = fx.write_release(str(tmp_path / "rel"))
    for chunk in (7, 42):
        os.remove(os.path.join(folder, schema.CHUNK_TEMPLATE.format(chunk)))
    with pytest.raises(release.ReleaseError, match=r"2 chunk file\(s\) missing: release_data_07.jsonl, release_data_42.jsonl"):
        _read_all(folder)
    tarball = str(tmp_path / "part.tgz")
    sha = release.write_tarball(folder, tarball)
    with pytest.raises(release.ReleaseError, match="release_data_07.jsonl, release_data_42.jsonl"):
        _read_all(tarball, sha=sha)


def test_missing_release_is_explained(tmp_path):
    """A folder with neither chunks nor the tarball says what it looked for."""
    with pytest.raises(release.ReleaseError, match="found neither release_data_XX.jsonl"):
        release.locate_release(str(tmp_path))


def _bad(mutate):
    convo = copy.deepcopy(fx.CONVO_A)
    mutate(convo)
    return json.dumps(convo).encode()


BAD_LINES = {
    "malformed_json": b'{"chat_id": "x", "message_history": [',
    "invalid_utf8": b'{"chat_id": "\xff\xfe"}',
    "not_an_object": b"[1, 2, 3]",
    "missing_field": _bad(lambda c: c.pop("chat_id")),
    "ill_typed_field": _bad(lambda c: c["message_history"][1].__setitem__("isLiked", "yes")),
    "unknown_sender": _bad(lambda c: c["message_history"][1].__setitem__("sender", "robot")),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_fails_with_file_and_line(tmp_path, reason):
    """By default a bad conversation stops the read with its reason, file and line number."""
    folder = fx.write_release(str(tmp_path / "rel"), extra_lines={50: [BAD_LINES[reason]]})
    with pytest.raises(release.ReleaseError) as info:
        _read_all(folder)
    assert info.value.reason == reason
    assert "release_data_50.jsonl:2" in str(info.value)  # line 1 is conversation C


def test_skip_malformed_counts_every_reason(tmp_path):
    """With skip_malformed every bad line is skipped and counted: read = used + skipped."""
    folder = fx.write_release(str(tmp_path / "rel"), extra_lines={60: list(BAD_LINES.values())})
    convos, report = _read_all(folder, skip=True)
    assert len(convos) == 2  # A and C
    assert report.skipped_by_reason == {reason: 1 for reason in BAD_LINES}
    assert report.conversations_read == report.conversations_used + report.skipped == 2 + len(BAD_LINES)
    assert all("release_data_60.jsonl:" in where for where in report.skipped_examples)


def test_skip_report_survives_worker_processes(tmp_path):
    """Skip counts and the first error are identical with parser workers (errors pickle)."""
    folder = fx.write_release(str(tmp_path / "rel"), extra_lines={60: list(BAD_LINES.values())})
    location = release.locate_release(folder)
    reports = []
    for workers in (0, 2):
        report = extract.SplitReport()
        list(extract.iter_examples(location, "train", "bot", DEFAULT_POLICY, report, skip_malformed=True, num_workers=workers))
        reports.append(report.to_dict())
    assert reports[0] == reports[1] and reports[0]["skipped"] == len(BAD_LINES)
    with pytest.raises(release.ReleaseError, match="release_data_60.jsonl:1: .*malformed_json|release_data_60.jsonl:1:"):
        list(extract.iter_examples(location, "train", "bot", DEFAULT_POLICY, extract.SplitReport(), num_workers=2))


def test_human_message_without_safety_is_rejected():
    """The reference reads both safety verdicts of every human message, so they are required."""
    convo = copy.deepcopy(fx.CONVO_A)
    convo["message_history"][0].pop("safety")
    with pytest.raises(release.ReleaseError, match=r"message_history\[0\] \(a human message\) has no 'safety'"):
        release.parse_conversation(json.dumps(convo).encode(), "f:1")


def test_nulls_and_integer_booleans_are_tolerated():
    """Optional fields may be null, and booleans may be 0/1; strings for booleans are not."""
    convo = copy.deepcopy(fx.CONVO_A)
    convo["message_history"][1].update(isLiked=1, dislike_type=None, memories=None)
    parsed = release.parse_conversation(json.dumps(convo).encode(), "f:1")
    assert parsed["message_history"][1]["isLiked"] is True


def test_reward_string_is_parsed():
    """The reward field's class and probability come out of its sentence form."""
    assert release.parse_reward("Predicted class: __not_ok__ with probability: 0.73") == ("__not_ok__", 0.73)
    assert release.parse_reward(None) == ("", -1.0)
    assert release.parse_reward("garbage") == ("", -1.0)


def test_tarball_is_read_as_a_stream(tmp_path, monkeypatch):
    """The archive is opened in streaming mode ('r|...'), never extracted to disk or memory whole."""
    folder = fx.write_release(str(tmp_path / "rel"))
    tarball = str(tmp_path / "t.tgz")
    sha = release.write_tarball(folder, tarball)
    modes = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode", args[1] if len(args) > 1 else "r"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(tarfile, "open", spy)
    _read_all(tarball, sha=sha)
    assert modes and all(m.startswith("r|") for m in modes)
