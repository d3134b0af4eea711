"""Reading the deployment release: chunk files or the tarball, validated.

The release is 100 JSON Lines chunks, either unpacked in a folder or inside
``bb3_demo_chunks.tgz``. Lines are split on ``\\n`` only (texts may hold ``\\r``
or U+2028, which text-mode readers and ``str.splitlines`` treat as line ends),
the tarball is read as a stream and never unpacked, and every conversation is
checked against the data card so a bad line fails with its file and line
number — or, with ``skip_malformed``, is skipped and counted by reason. A file
that cannot be read (a folder where a chunk should be, a truncated or corrupt
tarball) fails naming it; a 0-byte chunk file holds no conversations and is
counted in the report (``empty_chunk_files``), so a chunk lost in a copy shows.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from bb3x_jax.data import schema
from bb3x_jax.errors import UserError

_CHUNK_RE = re.compile(schema.CHUNK_PATTERN)
_HASH_BLOCK = 1 << 20


class ReleaseError(UserError, ValueError):
    """A release file, line or field that does not match the data card."""

    def __init__(self, reason: str, where: str, detail: str):
        self.reason = reason
        self.where = where
        self.detail = detail
        super().__init__(f"{where}: {reason}: {detail}")

    def __reduce__(self):  # survives the trip back from a worker process
        return (ReleaseError, (self.reason, self.where, self.detail))


@dataclasses.dataclass
class ReadReport:
    """What a pass over the release read, used and skipped (by reason).

    Invariant: ``conversations_read == conversations_used + skipped``. A
    conversation with an empty ``message_history`` is valid (ParlAI reads it and
    gets no examples): it is used, and counted in ``empty_conversations``.
    A 0-byte chunk file holds no conversations; its name goes to
    ``empty_chunk_files`` (a synthetic release with fewer than 100
    conversations has such files; a real release has none).
    """

    conversations_read: int = 0
    conversations_used: int = 0
    empty_conversations: int = 0
    empty_chunk_files: list[str] = dataclasses.field(default_factory=list)  # 0-byte chunk files read
    skipped_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped_examples: list[str] = dataclasses.field(default_factory=list)  # first few locations

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def record_skip(self, error: ReleaseError, keep: int = 20) -> None:
        self.skipped_by_reason[error.reason] += 1
        if len(self.skipped_examples) < keep:
            self.skipped_examples.append(str(error))

    def merge(self, other: "ReadReport") -> None:
        self.conversations_read += other.conversations_read
        self.conversations_used += other.conversations_used
        self.empty_conversations += other.empty_conversations
        self.empty_chunk_files.extend(other.empty_chunk_files)
        self.skipped_by_reason.update(other.skipped_by_reason)
        room = 20 - len(self.skipped_examples)
        self.skipped_examples.extend(other.skipped_examples[: max(room, 0)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "conversations_read": self.conversations_read,
            "conversations_used": self.conversations_used,
            "empty_conversations": self.empty_conversations,
            "empty_chunk_files": len(self.empty_chunk_files),
            "empty_chunk_examples": self.empty_chunk_files[:20],
            "skipped": self.skipped,
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
            "skipped_examples": list(self.skipped_examples),
        }


# --------------------------------------------------------------------------------
# Locating the release
# --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReleaseLocation:
    """Where the chunks are: a folder of ``release_data_XX.jsonl`` or a tarball."""

    kind: str  # "folder" | "tarball"
    path: str
    chunk_files: tuple[tuple[int, str], ...] = ()  # folder mode: (chunk id, file path)

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


def locate_release(manual_dir: str | os.PathLike) -> ReleaseLocation:
    """Finds the release under ``manual_dir`` (a folder, or the tarball itself).

    Accepted: the chunk folder itself, a folder holding ``release_data_chunks/``
    or ``bb3_demo/release_data_chunks/`` (ParlAI's layout), a folder holding the
    tarball, or the tarball's path.
    """
    path = os.fspath(manual_dir)
    if os.path.isfile(path):
        if not _looks_like_tarball(path):
            raise ReleaseError("not_a_release", path, "a file that is not a tar archive")
        return ReleaseLocation("tarball", path)
    if not os.path.isdir(path):
        raise ReleaseError("missing_release", path, "no such file or folder")
    for sub in ("", "release_data_chunks", os.path.join("bb3_demo", "release_data_chunks")):
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            continue
        files = []
        for name in sorted(os.listdir(folder)):
            match = _CHUNK_RE.search(name)
            if match:
                files.append((int(match.group(1)), os.path.join(folder, name)))
        if files:
            return ReleaseLocation("folder", folder, tuple(files))
    for candidate in (os.path.join(path, schema.TARBALL_NAME), os.path.join(path, "bb3_demo", schema.TARBALL_NAME)):
        if os.path.isfile(candidate):
            return ReleaseLocation("tarball", candidate)
    raise ReleaseError(
        "missing_release",
        path,
        f"found neither release_data_XX.jsonl chunk files nor {schema.TARBALL_NAME}",
    )


def _looks_like_tarball(path: str) -> bool:
    """Magic bytes of gzip/bzip2/xz or a plain tar header (no archive scan)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as error:
        raise ReleaseError("unreadable_file", path, error.strerror or str(error)) from None
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00" or head[257:262] == b"ustar"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_tarball(path: str, expected_sha256: str | None) -> str:
    """Streams the tarball through sha256; raises if it is not the expected file.

    ``expected_sha256=None`` disables the check (for self-made tarballs).
    """
    try:
        actual = sha256_file(path)
    except OSError as error:
        raise ReleaseError("unreadable_file", path, error.strerror or str(error)) from None
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise ReleaseError(
            "checksum_mismatch",
            path,
            f"sha256 is {actual}, expected {expected_sha256} (a corrupt or different file; "
            "pass the right expected checksum, or None for a tarball you made yourself)",
        )
    return actual


def release_fingerprint(location: ReleaseLocation, tarball_sha256: str | None = None) -> str:
    """A short id of the release contents, so prepared data is never reused for another release.

    Folders: names, sizes and modification times of the chunk files (cheap);
    tarballs: their sha256.
    """
    digest = hashlib.sha256()
    if location.kind == "tarball":
        digest.update((tarball_sha256 or sha256_file(location.path)).encode())
    else:
        for chunk, file in location.chunk_files:
            st = os.stat(file)
            digest.update(f"{chunk}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------
# Lines
# --------------------------------------------------------------------------------


def _split_lines(stream) -> Iterator[tuple[int, bytes]]:
    """Yields (1-based line number, bytes) splitting on b"\\n" only.

    A binary file's iteration splits on b"\\n" alone, unlike text mode. A final
    empty line (the file's trailing newline) is not a line.
    """
    for lineno, raw in enumerate(stream, start=1):
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        yield lineno, raw


def iter_chunk_lines(
    location: ReleaseLocation,
    chunks: Sequence[int],
    *,
    tarball_sha256: str | None = schema.TARBALL_SHA256,
    require_all: bool = True,
    report: ReadReport | None = None,
) -> Iterator[tuple[int, str, int, bytes]]:
    """Yields (chunk id, file name, line number, raw line) for the given chunks.

    Missing chunk files raise one error listing every missing chunk; in tarball
    mode that is known only at the end of the stream, after the present chunks
    were read. A chunk that cannot be read (a folder, no permission, a
    truncated or corrupt tarball) raises ``unreadable_file`` naming it; 0-byte
    chunk files are listed in ``report.empty_chunk_files``.
    """
    wanted = set(chunks)
    if location.kind == "folder":
        present = dict(location.chunk_files)
        missing = sorted(wanted - present.keys())
        if missing and require_all:
            raise ReleaseError("missing_chunks", location.path, _missing_message(missing))
        for chunk in sorted(wanted & present.keys()):
            yield from _read_chunk_file(chunk, present[chunk], report)
        return

    check_tarball(location.path, tarball_sha256)
    seen: set[int] = set()
    name = location.path
    try:
        with tarfile.open(location.path, mode="r|*") as archive:
            for member in archive:
                match = _CHUNK_RE.search(member.name)
                if not match or not member.isfile():
                    continue
                chunk = int(match.group(1))
                if chunk not in wanted:
                    continue
                name = f"{location.path}:{member.name}"
                if chunk in seen:
                    raise ReleaseError("duplicate_chunk", name, "chunk appears twice in the archive")
                seen.add(chunk)
                if member.size == 0 and report is not None:
                    report.empty_chunk_files.append(name)
                handle = archive.extractfile(member)
                for lineno, raw in _split_lines(handle):
                    yield chunk, name, lineno, raw
                name = location.path
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        detail = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise ReleaseError("unreadable_file", name, f"not a readable tar archive (truncated or corrupt?): {detail}") from None
    missing = sorted(wanted - seen)
    if missing and require_all:
        raise ReleaseError("missing_chunks", location.path, _missing_message(missing))


def _read_chunk_file(chunk: int, path: str, report: ReadReport | None) -> Iterator[tuple[int, str, int, bytes]]:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0 and report is not None:
                report.empty_chunk_files.append(path)
            for lineno, raw in _split_lines(f):
                yield chunk, path, lineno, raw
    except OSError as error:
        kind = "a folder, not a chunk file" if isinstance(error, IsADirectoryError) else error.strerror or str(error)
        raise ReleaseError("unreadable_file", path, kind) from None


def _missing_message(missing: list[int]) -> str:
    names = ", ".join(schema.CHUNK_TEMPLATE.format(c) for c in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return f"{len(missing)} chunk file(s) missing: {names}{more}"


# --------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------

_TYPE_NAMES = {str: "string", bool: "boolean", list: "list", dict: "object", int: "integer", float: "number"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _check_type(value: Any, expected: type, where: str, key: str) -> Any:
    """Returns the value normalised to ``expected`` or raises ``ill_typed_field``.

    Booleans also accept the integers 0 and 1 (a harmless encoding difference
    some JSON exporters make); nothing else is coerced.
    """
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif expected is list:
        if isinstance(value, list):
            return value
    elif isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ReleaseError("ill_typed_field", where, f"{key} should be a {_TYPE_NAMES.get(expected, expected)}, got {_type_name(value)}")


def parse_conversation(raw: bytes, where: str) -> dict[str, Any]:
    """Decodes and validates one JSON line; returns the conversation normalised.

    Normalised: ``sender`` is ``"bot"`` or ``"human"``; optional fields with
    null values are kept as None (treated as absent downstream). Raises
    ReleaseError(reason, where, detail) with one of the reasons: invalid_utf8,
    malformed_json, not_an_object, missing_field, ill_typed_field,
    unknown_sender. An empty ``message_history`` is valid.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReleaseError("invalid_utf8", where, f"byte {e.start}: {e.reason}") from None
    try:
        # strict=False admits raw control characters (a raw \r) inside strings,
        # which some exporters write; they are text, not structure.
        convo = json.loads(text, strict=False)
    except json.JSONDecodeError as e:
        raise ReleaseError("malformed_json", where, f"column {e.colno}: {e.msg}") from None
    if not isinstance(convo, dict):
        raise ReleaseError("not_an_object", where, f"a conversation must be a JSON object, got {_type_name(convo)}")
    for key in schema.CONVERSATION_KEYS:
        if key not in convo:
            raise ReleaseError("missing_field", where, f"conversation has no '{key}'")
    for key in ("user_pseudo_id", "chat_id"):
        if not isinstance(convo[key], (str, int)) or isinstance(convo[key], bool):
            raise ReleaseError("ill_typed_field", where, f"{key} should be a string, got {_type_name(convo[key])}")
        convo[key] = str(convo[key])
    history = convo["message_history"]
    if not isinstance(history, list):
        raise ReleaseError("ill_typed_field", where, f"message_history should be a list, got {_type_name(history)}")
    for index, message in enumerate(history):
        history[index] = _parse_message(message, f"message_history[{index}]", where)
    return convo


def _parse_message(message: Any, key: str, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ReleaseError("ill_typed_field", where, f"{key} should be an object, got {_type_name(message)}")
    for field in ("text", "sender"):
        if field not in message:
            raise ReleaseError("missing_field", where, f"{key} has no '{field}'")
        if not isinstance(message[field], str):
            raise ReleaseError("ill_typed_field", where, f"{key}.{field} should be a string, got {_type_name(message[field])}")
    sender = schema.SENDER_ALIASES.get(message["sender"].strip().lower())
    if sender is None:
        raise ReleaseError(
            "unknown_sender", where, f"{key}.sender is {message['sender']!r}; expected bot/Chatbot or human/Human"
        )
    message["sender"] = sender
    specific = schema.BOT_MESSAGE_FIELDS if sender == schema.BOT else schema.HUMAN_MESSAGE_FIELDS
    for fields in (schema.COMMON_MESSAGE_FIELDS, specific):
        for field, expected in fields.items():
            if field in ("text", "sender") or field not in message or message[field] is None:
                continue
            if field == "reward" and isinstance(message[field], dict):
                continue  # the data card lists "Dict" for reward too; kept as-is in label_info
            message[field] = _check_type(message[field], expected, where, f"{key}.{field}")
    safety = message.get("safety")
    if safety is not None:
        for field in schema.SAFETY_KEYS:
            if field in safety and safety[field] is not None and not isinstance(safety[field], str):
                raise ReleaseError(
                    "ill_typed_field", where, f"{key}.safety.{field} should be a string, got {_type_name(safety[field])}"
                )
    if sender == schema.HUMAN:
        # The reference loader reads both safety verdicts of every human message.
        if safety is None:
            raise ReleaseError("missing_field", where, f"{key} (a human message) has no 'safety'")
        for field in schema.SAFETY_KEYS:
            if safety.get(field) is None:
                raise ReleaseError("missing_field", where, f"{key}.safety has no '{field}'")
    mturk = message.get("mturk")
    if mturk is not None:
        for name, value in mturk.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ReleaseError(
                    "ill_typed_field", where, f"{key}.mturk.{name} should be a number, got {_type_name(value)}"
                )
    return message


def is_safe(message: dict[str, Any]) -> bool | None:
    """Both safety verdicts are ``__ok__``; None when the message carries none."""
    safety = message.get("safety")
    if not safety:
        return None
    values = [safety.get(k) for k in schema.SAFETY_KEYS]
    if all(v is None for v in values):
        return None
    return all(v == schema.SAFETY_OK for v in values)


_REWARD_RE = re.compile(schema.REWARD_PATTERN)


def parse_reward(value: Any) -> tuple[str, float]:
    """("__ok__" | "__not_ok__" | "", probability or -1) from the reward field."""
    if isinstance(value, str):
        match = _REWARD_RE.match(value)
        if match:
            try:
                return match.group(1), float(match.group(2))
            except ValueError:
                pass
    return "", -1.0


def iter_conversations(
    location: ReleaseLocation,
    chunks: Sequence[int],
    report: ReadReport,
    *,
    skip_malformed: bool = False,
    tarball_sha256: str | None = schema.TARBALL_SHA256,
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yields (chunk id, line number, conversation) for every valid line.

    A bad line raises ReleaseError naming the file and line; with
    ``skip_malformed`` it is counted in ``report`` by reason instead.
    """
    lines = iter_chunk_lines(location, chunks, tarball_sha256=tarball_sha256, report=report)
    for chunk, name, lineno, raw in lines:
        convo = parse_counted(raw, f"{name}:{lineno}", report, skip_malformed)
        if convo is not None:
            yield chunk, lineno, convo


def parse_counted(raw: bytes, where: str, report: ReadReport, skip_malformed: bool) -> dict[str, Any] | None:
    """parse_conversation that counts the line in ``report``; None when skipped."""
    report.conversations_read += 1
    try:
        convo = parse_conversation(raw, where)
    except ReleaseError as error:
        if not skip_malformed:
            raise
        report.record_skip(error)
        return None
    report.conversations_used += 1
    report.empty_conversations += not convo["message_history"]
    return convo


def write_tarball(release_dir: str, tarball_path: str) -> str:
    """Packs a chunk folder as ParlAI publishes it (``release_data_chunks/*.jsonl``); returns sha256."""
    location = locate_release(release_dir)
    if location.kind != "folder":
        raise ReleaseError("not_a_release", release_dir, "expected a folder of chunk files")
    with tarfile.open(tarball_path, "w:gz") as archive:
        for chunk, file in location.chunk_files:
            info = archive.gettarinfo(file, arcname=f"release_data_chunks/{schema.CHUNK_TEMPLATE.format(chunk)}")
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(file, "rb") as f:
                archive.addfile(info, f)
    return sha256_file(tarball_path)


def chunks_of_splits(splits: Iterable[str]) -> list[int]:
    out: list[int] = []
    for split in splits:
        if split not in schema.SPLIT_CHUNKS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(schema.SPLITS)}")
        out.extend(schema.SPLIT_CHUNKS[split])
    return out
