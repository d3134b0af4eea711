"""DeploymentStore alone (no model, no server): the deployment folder as the release reader sees it.

Protects the on-disk contract of ``--mode=serve``: every acknowledged event is in
the write-ahead log and, after compaction, in the chunk file its conversation id
hashes to, in exactly the release's schema; a restart after an unclean stop (the
object dropped without ``close()``, or a kill that tore the log's last line)
reproduces the acknowledged state and lets open conversations continue on the
same chunk line; lines of other runs stay byte for byte; corrupt input fails
naming its file and line; and the chunk hash keeps the release's split sizes.
"""

from __future__ import annotations

import base64
import collections
import copy
import json
import os
import random
import re

import pytest

from bb3x_jax.data import release, schema
from bb3x_jax.deploy import store as store_lib
from bb3x_jax.deploy.store import DeploymentStore

HUMAN_KEYS = {"text", "sender", "safety", "human_message_id", "isDislikeFeedback"}
BOT_KEYS = {"text", "sender", "safety", *schema.BOT_MESSAGE_FIELDS}


def chunk_lines(store: DeploymentStore, chunk: int) -> list[bytes]:
    with open(store.chunk_path(chunk), "rb") as f:
        return [line for line in f.read().split(b"\n") if line]


def all_conversations(folder: str) -> dict[str, tuple[int, dict]]:
    """chat_id -> (chunk, conversation) for every line of the folder, read by the release reader."""
    report = release.ReadReport()
    found = {}
    for chunk, _, convo in release.iter_conversations(release.locate_release(folder), range(schema.NUM_CHUNKS),
                                                      report, tarball_sha256=None):
        assert convo["chat_id"] not in found, f"chat {convo['chat_id']} has two lines"
        found[convo["chat_id"]] = (chunk, convo)
    assert report.skipped == 0
    return found


def talk(store: DeploymentStore, cid: str, text: str, reply: str) -> str:
    """One turn (a human message, the bot's reply); returns the reply's message id."""
    store.add_message(cid, store_lib.human_message(text, False))
    bot = store_lib.bot_message(reply, False)
    store.add_message(cid, bot)
    return bot["bot_message_id"]


def rated(store: DeploymentStore, cid: str) -> tuple[bool, bool, str]:
    """(isLiked, isDisliked, dislike_type) of the conversation's first bot message."""
    message = [m for m in store.history(cid) if m["sender"] == "bot"][0]
    return message["isLiked"], message["isDisliked"], message["dislike_type"]


def wal_events(store: DeploymentStore) -> list[dict]:
    with open(store.wal_path, "rb") as f:
        return [json.loads(line) for line in f.read().split(b"\n") if line]


def test_events_land_in_their_chunk_in_the_release_schema(tmp_path):
    """A conversation's line is in chunk ``chunk_of(id)``, parses with the release reader, and holds
    exactly the release's keys: the conversation's three, every bot field, the human fields, both
    safety verdicts; the secret conversation id itself is never written to a chunk."""
    store = DeploymentStore(str(tmp_path))
    cid, user = store.start()
    first = talk(store, cid, "hi there", "hello!")
    talk(store, cid, "how are you?", "fine, thanks")
    store.rate(cid, first, store_lib.LIKE, None)
    store.add_message(cid, store_lib.human_message("that was odd", True, dislike_feedback=True))
    store.compact()

    chunk = store_lib.chunk_of(cid)
    lines = chunk_lines(store, chunk)
    assert len(lines) == 1
    for other in range(schema.NUM_CHUNKS):  # all 100 files exist, as in the release; only one is written
        assert os.path.exists(store.chunk_path(other))
        if other != chunk:
            assert chunk_lines(store, other) == []
    convo = release.parse_conversation(lines[0], f"chunk {chunk}:1")
    assert set(convo) == set(schema.CONVERSATION_KEYS) and convo["user_pseudo_id"] == user
    assert cid.encode() not in b"".join(line for c in range(schema.NUM_CHUNKS) for line in chunk_lines(store, c))
    history = convo["message_history"]
    assert [(m["sender"], m["text"]) for m in history] == [
        ("human", "hi there"), ("bot", "hello!"), ("human", "how are you?"), ("bot", "fine, thanks"),
        ("human", "that was odd")]
    for message in history:
        assert set(message["safety"]) == set(schema.SAFETY_KEYS)
        if message["sender"] == schema.BOT:
            assert set(message) == BOT_KEYS
            for field, kind in schema.BOT_MESSAGE_FIELDS.items():
                assert isinstance(message[field], kind), field
        else:
            assert set(message) == HUMAN_KEYS
            assert isinstance(message["human_message_id"], str) and isinstance(message["isDislikeFeedback"], bool)
    assert history[0]["safety"] == {"duo_safety": schema.SAFETY_OK, "string_matcher": schema.SAFETY_OK}
    assert history[4]["isDislikeFeedback"] is True and history[0]["isDislikeFeedback"] is False
    assert history[4]["safety"]["string_matcher"] != schema.SAFETY_OK
    assert history[1]["isLiked"] is True and history[1]["isDisliked"] is False
    assert history[3]["isLiked"] is False and history[3]["isDisliked"] is False
    store.close()


def test_a_later_rating_replaces_the_earlier_one(tmp_path):
    """like -> dislike (with its reason) -> dislike (no reason) -> like: only the last counts, in memory,
    in the chunk, and after a replay of the log; a rating of an unknown message is refused unlogged."""
    store = DeploymentStore(str(tmp_path))
    cid, _ = store.start()
    mid = talk(store, cid, "hi", "hello")

    store.rate(cid, mid, store_lib.LIKE, None)
    assert rated(store, cid) == (True, False, "")
    store.rate(cid, mid, store_lib.DISLIKE, "nonsensical")
    assert rated(store, cid) == (False, True, "nonsensical")
    store.rate(cid, mid, store_lib.DISLIKE, None)
    assert rated(store, cid) == (False, True, "")
    store.rate(cid, mid, store_lib.DISLIKE, "repeating")
    store.compact()
    _, convo = all_conversations(str(tmp_path))[store.open_conversation(cid).record["chat_id"]]
    assert convo["message_history"][1]["dislike_type"] == "repeating"

    size = os.path.getsize(store.wal_path)
    with pytest.raises(store_lib.UnknownMessage):
        store.rate(cid, "no-such-message", store_lib.LIKE, None)
    human_id = store.history(cid)[0]["human_message_id"]
    with pytest.raises(store_lib.UnknownMessage):  # only bot messages take ratings
        store.rate(cid, human_id, store_lib.LIKE, None)
    assert os.path.getsize(store.wal_path) == size
    del store

    replayed = DeploymentStore(str(tmp_path))
    assert rated(replayed, cid) == (False, True, "repeating")
    replayed.rate(cid, mid, store_lib.LIKE, None)
    assert rated(replayed, cid) == (True, False, "")
    replayed.close()


def test_replay_after_an_unclean_stop_restores_the_acknowledged_state(tmp_path):
    """The store dropped without close() (nothing compacted), then a kill mid-write (a torn last log
    line): each restart reproduces exactly what was acknowledged, drops and counts the torn bytes, and the
    open conversation continues on the same chunk line (no duplicate line); an ended one stays ended."""
    folder = str(tmp_path)
    store = DeploymentStore(folder)
    ended_cid, _ = store.start()
    talk(store, ended_cid, "bye", "goodbye")
    store.end(ended_cid)
    open_cid, _ = store.start()
    liked = talk(store, open_cid, "hello", "hi, who are you?")
    disliked = talk(store, open_cid, "a person", "I like trains")
    store.rate(open_cid, liked, store_lib.LIKE, None)
    store.rate(open_cid, disliked, store_lib.DISLIKE, "off_topic")
    unused_cid, _ = store.start()  # no message: a conversation without a line
    acknowledged = copy.deepcopy(store.history(open_cid))
    chat_id = store.open_conversation(open_cid).record["chat_id"]
    assert chat_id not in all_conversations(folder)  # only in the log so far
    del store  # no close(): the log is all there is

    store = DeploymentStore(folder)
    report = store.replay_report
    assert report.torn_tail_bytes == 0 and report.open == 2
    assert store.history(open_cid) == acknowledged
    assert store.history(unused_cid) == []
    with pytest.raises(store_lib.ConversationEnded):  # its end is in the log: still refused as ended
        store.history(ended_cid)
    assert store.open_count == 2 and ended_cid not in store._conversations
    found = all_conversations(folder)
    assert found[chat_id] == (store_lib.chunk_of(open_cid), {**found[chat_id][1], "message_history": acknowledged})
    assert len(found) == 2  # the open and the ended conversation; the unused one has no line

    talk(store, open_cid, "trains?", "yes, trains")
    acknowledged = copy.deepcopy(store.history(open_cid))
    with open(store.wal_path, "ab") as wal:  # a kill while an unacknowledged event was being written
        torn = json.dumps({"op": "message", "conversation_id": open_cid,
                           "message": store_lib.human_message("never acknowledged", False)}).encode()[:37]
        wal.write(torn)
    del store

    store = DeploymentStore(folder)
    assert store.replay_report.torn_tail_bytes == len(torn)
    assert store.history(open_cid) == acknowledged
    talk(store, open_cid, "and boats?", "boats too")
    store.rate(open_cid, disliked, store_lib.LIKE, None)
    store.compact()
    lines = [line for c in range(schema.NUM_CHUNKS) for line in chunk_lines(store, c)]
    assert len(lines) == 2 and len(set(lines)) == 2
    convo = all_conversations(folder)[chat_id][1]
    assert [m["text"] for m in convo["message_history"]] == [
        "hello", "hi, who are you?", "a person", "I like trains", "trains?", "yes, trains", "and boats?", "boats too"]
    assert convo["message_history"][3]["isLiked"] is True
    store.close()
    assert DeploymentStore(folder).replay_report.torn_tail_bytes == 0  # the log was rewritten whole


def test_ended_conversations_are_refused_and_leave_memory(tmp_path):
    """After end(): messages, ratings and a second end are refused with ConversationEnded (nothing is
    logged), the conversation is out of memory, and its line is in its chunk."""
    store = DeploymentStore(str(tmp_path))
    cid, _ = store.start()
    mid = talk(store, cid, "hi", "hello")
    kept, _ = store.start()
    assert store.open_count == 2
    store.end(cid)
    size = os.path.getsize(store.wal_path)
    for refused in (lambda: store.add_message(cid, store_lib.human_message("again", False)),
                    lambda: store.rate(cid, mid, store_lib.LIKE, None), lambda: store.end(cid),
                    lambda: store.history(cid)):
        with pytest.raises(store_lib.ConversationEnded):
            refused()
    assert os.path.getsize(store.wal_path) == size
    assert store.open_count == 1 and set(store._conversations) == {kept}
    assert len(chunk_lines(store, store_lib.chunk_of(cid))) == 1
    with pytest.raises(store_lib.UnknownConversation):
        store.add_message("never-started", store_lib.human_message("hi", False))
    store.close()


def test_the_log_after_a_restart_holds_only_open_conversations(tmp_path):
    """A restart rewrites the log to one snapshot per open conversation: ended ones (in the chunks now)
    are gone from it, so the log does not grow with the deployment's history."""
    store = DeploymentStore(str(tmp_path))
    open_ids = set()
    for index in range(6):
        cid, _ = store.start()
        talk(store, cid, f"message {index}", f"reply {index}")
        if index % 2:
            store.end(cid)
        else:
            open_ids.add(cid)
    del store

    store = DeploymentStore(str(tmp_path))
    assert store.replay_report.events == 6 * 3 + 3 and store.replay_report.conversations == 6
    events = wal_events(store)
    assert [e["op"] for e in events] == ["snapshot"] * 3
    assert {e["conversation_id"] for e in events} == open_ids
    store.close()
    again = DeploymentStore(str(tmp_path))
    assert (again.replay_report.events, again.replay_report.open) == (3, 3)
    assert len(all_conversations(str(tmp_path))) == 6
    again.close()


def other_run_line(index: int) -> bytes:
    """A conversation line of another run, spelled unlike this store would write it."""
    message = {"sender": "Human", "text": f"old {index}", "safety": {"string_matcher": "__ok__",
                                                                     "duo_safety": "__ok__"}}
    return json.dumps({"message_history": [message], "chat_id": f"other-{index}",
                       "user_pseudo_id": "someone"}, indent=None, separators=(", ", " : ")).encode()


def test_lines_of_another_run_stay_untouched_and_in_order(tmp_path):
    """Chunk files that already hold lines keep them byte for byte and in order; this run's conversation
    follows them in its chunk, and a later compaction replaces its own line in place."""
    folder = str(tmp_path)
    before = {}
    for chunk in range(schema.NUM_CHUNKS):
        lines = [other_run_line(2 * chunk), other_run_line(2 * chunk + 1)]
        before[chunk] = lines
        with open(os.path.join(folder, schema.CHUNK_TEMPLATE.format(chunk)), "wb") as f:
            f.write(b"\n".join(lines) + b"\n")

    store = DeploymentStore(folder)
    cid, _ = store.start()
    talk(store, cid, "hello", "hi")
    store.compact()
    mine = store_lib.chunk_of(cid)
    for chunk in range(schema.NUM_CHUNKS):
        lines = chunk_lines(store, chunk)
        assert lines[:2] == before[chunk]
        assert len(lines) == (3 if chunk == mine else 2)
    talk(store, cid, "again", "yes")
    store.close()
    lines = chunk_lines(store, mine)
    assert lines[:2] == before[mine] and len(lines) == 3
    assert len(json.loads(lines[2])["message_history"]) == 4
    assert len(all_conversations(folder)) == 2 * schema.NUM_CHUNKS + 1


def test_a_corrupted_chunk_line_fails_naming_the_file_and_line(tmp_path):
    """A chunk line that is not a conversation with a chat_id stops the store from starting (it would
    otherwise be lost on the next rewrite of that chunk), naming the file and the line."""
    for bad in (b"{not json", b"[1, 2]", b'{"user_pseudo_id": "x"}', b'"text"'):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        path = folder / schema.CHUNK_TEMPLATE.format(7)
        path.write_bytes(other_run_line(0) + b"\n" + bad + b"\n")
        with pytest.raises(ValueError, match=re.escape(f"{path}: line 2 ")):
            DeploymentStore(str(folder))
        assert path.read_bytes() == other_run_line(0) + b"\n" + bad + b"\n"


def test_a_corrupted_log_line_fails_naming_the_file_and_line(tmp_path):
    """A log line that is not a valid event (not JSON, not an object, an event for an unknown
    conversation or message) fails naming the log and the line; only a torn LAST line is dropped."""
    store = DeploymentStore(str(tmp_path / "origin"))
    cid, _ = store.start()
    talk(store, cid, "hi", "hello")
    del store
    good = (tmp_path / "origin" / store_lib.WAL_NAME).read_bytes()
    assert good.count(b"\n") == 3
    bad_lines = (b"{torn in the middle", b"[1, 2]", b"7",
                 json.dumps({"op": "message", "conversation_id": "unknown", "message": {}}).encode(),
                 json.dumps({"op": "rate", "conversation_id": cid, "message_id": "nope", "rating": "like",
                             "reason": None}).encode(),
                 json.dumps({"op": "explode", "conversation_id": cid}).encode())
    for index, bad in enumerate(bad_lines):
        folder = tmp_path / f"case{index}"
        folder.mkdir()
        wal = folder / store_lib.WAL_NAME
        wal.write_bytes(good + bad + b"\n")
        with pytest.raises(ValueError, match=re.escape(f"{wal}: line 4 ")):
            DeploymentStore(str(folder))


def test_chunk_of_keeps_the_release_split_sizes():
    """Over 20000 ids of the store's shape the hash puts about 3 % in test (chunks 0-2), 3 % in valid
    (3-5) and 94 % in train (6-99), and reaches every chunk about equally; it is a pure function."""
    rng = random.Random(0)
    ids = [base64.urlsafe_b64encode(rng.randbytes(24)).decode() for _ in range(20000)]
    counts = collections.Counter(store_lib.chunk_of(cid) for cid in ids)
    split = {name: sum(counts[c] for c in chunks) / len(ids) for name, chunks in schema.SPLIT_CHUNKS.items()}
    assert 0.025 < split["test"] < 0.035 and 0.025 < split["valid"] < 0.035 and 0.93 < split["train"] < 0.95
    assert set(counts) == set(range(schema.NUM_CHUNKS)) and max(counts.values()) < 2 * min(counts.values())
    assert [store_lib.chunk_of(cid) for cid in ids[:50]] == [store_lib.chunk_of(cid) for cid in ids[:50]]
