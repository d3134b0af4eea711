"""Deployment conversations on disk, in the release's own format, durable per event.

Why a write-ahead log: the release stores one JSON line per *conversation*,
which grows message by message and whose ratings change, so it cannot be
appended to in place. Every event (a conversation started, a message, a
rating, an end) is appended to ``deployment.wal`` and fsynced before the
server answers; the chunk files ``release_data_NN.jsonl`` are a view rebuilt
from it (``compact``): each touched chunk is written to a temporary file,
fsynced and renamed over the old one, so a reader never sees half a file and
a killed server loses nothing it acknowledged. On start the log is replayed,
the chunks are brought up to date, and the log is rewritten to hold only the
conversations still open, which then continue where they stopped.

Chunks keep the release's split convention (test 0-2, valid 3-5, train 6-99):
a conversation's chunk is a hash of its id. All 100 chunk files exist, empty
ones included, as in the release.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import threading
import uuid
from typing import Any

from bb3x_jax.data import schema

WAL_NAME = "deployment.wal"
LIKE, DISLIKE = "like", "dislike"


class UnknownConversation(KeyError):
    """No open conversation has this id (never created, or ended and written out)."""


class UnknownMessage(KeyError):
    """The conversation has no bot message with this id."""


class ConversationEnded(ValueError):
    """The conversation was ended; it takes no more messages or ratings."""


def chunk_of(conversation_id: str) -> int:
    """The release chunk (0-99) a conversation lands in: stable, and uniform over ids."""
    return int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") % schema.NUM_CHUNKS


def safety_verdicts(flagged: bool) -> dict[str, str]:
    verdict = "__notok__" if flagged else schema.SAFETY_OK
    return {"duo_safety": verdict, "string_matcher": verdict}


def human_message(text: str, flagged: bool, *, dislike_feedback: bool = False) -> dict[str, Any]:
    return {"text": text, "sender": schema.HUMAN, "safety": safety_verdicts(flagged),
            "human_message_id": uuid.uuid4().hex, "isDislikeFeedback": dislike_feedback}


def bot_message(text: str, flagged: bool, *, safety_response: bool = False) -> dict[str, Any]:
    """A bot message with every field of the release: what this server does not compute (memories,
    search) is present and empty, as the release writes a message that used none."""
    return {
        "text": text, "sender": schema.BOT, "safety": safety_verdicts(flagged),
        "bot_message_id": uuid.uuid4().hex, "isLiked": False, "isDisliked": False, "dislike_type": "",
        "memories": [], "memory_decision": "", "memory_knowledge": "", "search_decision": "",
        "search_query": "", "search_knowledge": "", "search_knowledge_doc_titles": [],
        "search_knowledge_doc_content": [], "search_knowledge_doc_urls": [],
        "isSafetyControlledResponse": safety_response,
        "previous_interaction_failure": "unsafe_Human" if safety_response else "",
        "from_model_crash": False,
    }


@dataclasses.dataclass
class Conversation:
    conversation_id: str  # the secret the client holds; never written to the chunk files
    record: dict[str, Any]  # {"user_pseudo_id", "chat_id", "message_history"}: the release's line
    ended: bool = False

    @property
    def chunk(self) -> int:
        return chunk_of(self.conversation_id)

    def bot_message(self, message_id: str) -> dict[str, Any]:
        for message in self.record["message_history"]:
            if message["sender"] == schema.BOT and message["bot_message_id"] == message_id:
                return message
        raise UnknownMessage(message_id)


@dataclasses.dataclass
class ReplayReport:
    events: int = 0
    torn_tail_bytes: int = 0  # an unacknowledged event cut short by a kill: dropped
    conversations: int = 0
    open: int = 0


def _apply(conversations: dict[str, Conversation], event: dict[str, Any]) -> None:
    """One logged event applied to the in-memory state (replay and live use share it)."""
    op, cid = event["op"], event["conversation_id"]
    if op == "start":
        conversations[cid] = Conversation(cid, event["record"])
        return
    conversation = conversations[cid]
    if op == "message":
        conversation.record["message_history"].append(event["message"])
    elif op == "rate":
        message = conversation.bot_message(event["message_id"])
        liked = event["rating"] == LIKE
        message["isLiked"], message["isDisliked"] = liked, not liked
        message["dislike_type"] = "" if liked else (event["reason"] or "")
    elif op == "end":
        conversation.ended = True
    else:
        raise ValueError(f"unknown event {op!r}")


class DeploymentStore:
    """The conversations of one deployment folder; thread-safe, one writer process per folder."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.wal_path = os.path.join(folder, WAL_NAME)
        self._lock = threading.RLock()
        self._conversations: dict[str, Conversation] = {}
        self._ended_ids: set[str] = set()
        self._dirty: set[int] = set()
        self.replay_report = self._replay()
        self._dirty.update(c.chunk for c in self._conversations.values())
        self.compact(all_chunks=True)
        self._rewrite_log()
        self._wal = open(self.wal_path, "ab")

    # ------------------------------------------------------------------ events

    def start(self, user_pseudo_id: str | None = None) -> tuple[str, str]:
        """A new conversation: (conversation id, user pseudo id). The id carries 192 random bits."""
        cid = secrets.token_urlsafe(24)
        user = user_pseudo_id or uuid.uuid4().hex
        record = {"user_pseudo_id": user, "chat_id": uuid.uuid4().hex, "message_history": []}
        self._log({"op": "start", "conversation_id": cid, "record": record})
        return cid, user

    def add_message(self, conversation_id: str, message: dict[str, Any]) -> None:
        self._log({"op": "message", "conversation_id": conversation_id, "message": message})

    def rate(self, conversation_id: str, message_id: str, rating: str, reason: str | None) -> None:
        """Records a like or a dislike (with its reason); a later rating replaces the earlier one."""
        with self._lock:
            self.open_conversation(conversation_id).bot_message(message_id)  # raises before logging
            self._log({"op": "rate", "conversation_id": conversation_id, "message_id": message_id,
                       "rating": rating, "reason": reason})

    def end(self, conversation_id: str) -> None:
        with self._lock:
            self._log({"op": "end", "conversation_id": conversation_id})
            self.compact()

    def open_conversation(self, conversation_id: str) -> Conversation:
        with self._lock:
            if conversation_id in self._ended_ids:
                raise ConversationEnded(conversation_id)
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                raise UnknownConversation(conversation_id)
            if conversation.ended:
                raise ConversationEnded(conversation_id)
            return conversation

    def history(self, conversation_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.open_conversation(conversation_id).record["message_history"])

    def _log(self, event: dict[str, Any]) -> None:
        """Durable first, then applied: a crash between the two replays the event on restart."""
        line = (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if event["op"] != "start":
                self.open_conversation(event["conversation_id"])
            self._wal.write(line)
            self._wal.flush()
            os.fsync(self._wal.fileno())
            _apply(self._conversations, event)
            self._dirty.add(chunk_of(event["conversation_id"]))

    # ------------------------------------------------------------ chunk files

    def compact(self, all_chunks: bool = False) -> int:
        """Brings the touched chunk files up to date from the state; returns how many were written.

        Ended conversations, once written, leave memory (their ids are kept, so a late request
        is told the conversation ended rather than that it never existed).
        """
        with self._lock:
            chunks = range(schema.NUM_CHUNKS) if all_chunks else sorted(self._dirty)
            for chunk in chunks:
                self._write_chunk(chunk)
            self._dirty.clear()
            for cid in [cid for cid, c in self._conversations.items() if c.ended]:
                del self._conversations[cid]
                self._ended_ids.add(cid)
            return len(chunks)

    def chunk_path(self, chunk: int) -> str:
        return os.path.join(self.folder, schema.CHUNK_TEMPLATE.format(chunk))

    def _write_chunk(self, chunk: int) -> None:
        """Lines already in the file stay in order, a conversation in memory replaces its own line
        (matched by chat_id), new conversations follow; written aside, fsynced, renamed over."""
        path = self.chunk_path(chunk)
        mine = {c.record["chat_id"]: c.record for c in self._conversations.values()
                if c.chunk == chunk and c.record["message_history"]}
        lines = []
        if os.path.exists(path):
            with open(path, "rb") as f:
                for number, raw in enumerate(f.read().split(b"\n"), start=1):
                    if raw.strip():
                        try:
                            chat_id = json.loads(raw)["chat_id"]
                        except (ValueError, KeyError, TypeError):
                            raise ValueError(f"{path}: line {number} is not a conversation with a chat_id; "
                                             "move the file aside or fix the line") from None
                        lines.append(_encode(mine.pop(chat_id)) if chat_id in mine else raw)
        lines.extend(_encode(record) for record in mine.values())
        _write_atomically(path, b"".join(line + b"\n" for line in lines))

    # ------------------------------------------------------------------ the log

    def _replay(self) -> ReplayReport:
        report = ReplayReport()
        if not os.path.exists(self.wal_path):
            return report
        with open(self.wal_path, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        report.torn_tail_bytes = len(data) - len(complete)
        for number, raw in enumerate(complete.split(b"\n")[:-1], start=1):
            try:
                event = json.loads(raw)
                if event["op"] == "snapshot":
                    event = {**event, "op": "start"}
                _apply(self._conversations, event)
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{self.wal_path}: line {number} is not a valid event ({error!r}); "
                                 "the log was written by another program or edited") from None
            report.events += 1
        report.conversations = len(self._conversations)
        report.open = sum(not c.ended for c in self._conversations.values())
        return report

    def _rewrite_log(self) -> None:
        """The log reduced to one snapshot per open conversation (ended ones are in the chunks now)."""
        events = [{"op": "snapshot", "conversation_id": c.conversation_id, "record": c.record}
                  for c in self._conversations.values() if not c.ended]
        _write_atomically(self.wal_path, b"".join((json.dumps(e, ensure_ascii=False) + "\n").encode() for e in events))

    def close(self) -> None:
        with self._lock:
            self.compact()
            self._wal.close()

    @property
    def open_count(self) -> int:
        with self._lock:
            return sum(not c.ended for c in self._conversations.values())


def _encode(record: dict[str, Any]) -> bytes:
    # ensure_ascii=False keeps U+2028 and friends raw, as the release does; the reader splits on "\n" only.
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def _write_atomically(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
