"""``main.py --mode=serve`` as a real process over the tiny trained workdir: durability, shutdown, start-up.

Protects what an operator relies on: every message and rating the server
acknowledged survives a SIGKILL (the restart replays the log into the chunk
files, and open conversations continue on their own line while ended ones stay
ended); a SIGTERM brings the chunk files up to date on the way out, and the
data command reads them as a release with the right feedback counts; a taken
port or a missing model fails in one line naming the key, exit status 2,
before any model is loaded; and ``train.init_from`` serves from an empty
workdir. The kill/restart/stop sequence runs once per module (server starts
dominate the time); the servers skip the warm-up compilation except the
restarted one, which runs with the default (warm-up on).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from bb3x_jax.data import release, schema
from bb3x_jax.deploy import store as store_lib
from tests import REPO
from tests.deploy.conftest import Server
from tests.modes.test_train import environment, run_main

NO_WARM_UP = "--config.serve.warm_up=False"
UNRATED = (False, False, "")


@dataclasses.dataclass
class Chat:
    """What the server acknowledged of one conversation (what the chunk files must hold)."""

    cid: str
    user: str
    messages: list[tuple[str, str, bool]] = dataclasses.field(default_factory=list)  # sender, text, feedback
    bot_ids: list[str] = dataclasses.field(default_factory=list)
    ratings: dict[str, tuple[bool, bool, str]] = dataclasses.field(default_factory=dict)

    @property
    def split(self) -> str:
        chunk = store_lib.chunk_of(self.cid)
        return next(name for name, chunks in schema.SPLIT_CHUNKS.items() if chunk in chunks)


def start(client: httpx.Client, user: str) -> Chat:
    response = client.post("/api/conversations", json={"user_pseudo_id": user})
    assert response.status_code == 200, response.text
    return Chat(response.json()["conversation_id"], user)


def say(client: httpx.Client, chat: Chat, text: str) -> str:
    response = client.post(f"/api/conversations/{chat.cid}/messages", json={"text": text})
    assert response.status_code == 200, response.text
    reply = response.json()
    chat.messages += [("human", text, False), ("bot", reply["text"], False)]
    chat.bot_ids.append(reply["message_id"])
    return reply["message_id"]


def rate(client: httpx.Client, chat: Chat, mid: str, rating: str, reason=None, comment=None) -> None:
    body = {"message_id": mid, "rating": rating, "reason": reason, **({"comment": comment} if comment else {})}
    response = client.post(f"/api/conversations/{chat.cid}/feedback", json=body)
    assert response.json() == {"ok": True}, response.text
    chat.ratings[mid] = (rating == "like", rating == "dislike", reason or "")
    if comment:
        chat.messages.append(("human", comment, True))


def read_folder(folder: str) -> dict[str, tuple[int, dict]]:
    """user_pseudo_id -> (chunk, conversation) over every chunk file, read by the release reader;
    each conversation must have exactly one line."""
    report = release.ReadReport()
    found: dict[str, list] = collections.defaultdict(list)
    location = release.locate_release(folder)
    for chunk, _, convo in release.iter_conversations(location, range(schema.NUM_CHUNKS), report):
        found[convo["user_pseudo_id"]].append((chunk, convo))
    assert report.skipped == 0
    duplicated = {user: len(lines) for user, lines in found.items() if len(lines) > 1}
    assert not duplicated, f"conversations with more than one line: {duplicated}"
    return {user: lines[0] for user, lines in found.items()}


def assert_holds(lines: dict[str, tuple[int, dict]], chat: Chat) -> None:
    """The conversation's line is in its chunk and holds exactly the acknowledged messages and ratings."""
    assert chat.user in lines, f"{chat.user} has no line"
    chunk, convo = lines[chat.user]
    assert chunk == store_lib.chunk_of(chat.cid)
    history = convo["message_history"]
    assert [(m["sender"], m["text"], m.get("isDislikeFeedback", False)) for m in history] == chat.messages
    bots = [m for m in history if m["sender"] == "bot"]
    assert [m["bot_message_id"] for m in bots] == chat.bot_ids
    assert [(m["isLiked"], m["isDisliked"], m["dislike_type"]) for m in bots] == [
        chat.ratings.get(mid, UNRATED) for mid in chat.bot_ids]


@dataclasses.dataclass
class Lifecycle:
    folder: str
    chats: dict[str, Chat]
    kill_status: int
    after_restart: dict  # the chunk files once the restarted server answers
    ended_after_restart: httpx.Response  # a message to the conversation ended before the kill
    before_stop: dict  # the chunk files just before SIGTERM (no periodic compaction on the restart)
    stop_status: int
    after_stop: dict
    restart_log: str


@pytest.fixture(scope="module")
def lifecycle(trained_workdir, tmp_path_factory):
    """Talk and rate, SIGKILL, restart on the same folder, talk on, SIGTERM; the folder at each stage."""
    folder = str(tmp_path_factory.mktemp("lifecycle") / "deployment")
    servers = []
    try:
        first = Server(trained_workdir, f"--config.serve.folder={folder}", NO_WARM_UP)
        servers.append(first)
        chats = {}
        with first.client() as client:
            alpha = chats["alpha"] = start(client, "durable_alpha")
            a1 = say(client, alpha, "hello there")
            a2 = say(client, alpha, "do you like music?")
            rate(client, alpha, a1, "like")
            rate(client, alpha, a2, "dislike", "nonsensical")
            rate(client, alpha, a1, "dislike", "repeating")  # replaces the like
            say(client, alpha, "ok then")
            bravo = chats["bravo"] = start(client, "durable_bravo")
            b1 = say(client, bravo, "hi")
            rate(client, bravo, b1, "dislike", "off_topic", comment="not what I asked")
            assert client.post(f"/api/conversations/{bravo.cid}/end").json() == {"ok": True}
            charlie = chats["charlie"] = start(client, "durable_charlie")
            c1 = say(client, charlie, "what is up")
            rate(client, charlie, c1, "like")
        kill_status = first.kill()

        second = Server(trained_workdir, f"--config.serve.folder={folder}", "--config.serve.compact_every_s=3600")
        servers.append(second)
        after_restart = read_folder(folder)
        with second.client() as client:
            ended = client.post(f"/api/conversations/{bravo.cid}/messages", json={"text": "back again"})
            a4 = say(client, alpha, "are you still there?")
            rate(client, alpha, a4, "like")
            delta = chats["delta"] = start(client, "durable_delta")
            d1 = say(client, delta, "good evening")
            rate(client, delta, d1, "dislike")
            say(client, delta, "never mind")
        before_stop = read_folder(folder)
        stop_status = second.stop(signal.SIGTERM)
        restart_log = open(second.log_path).read()
        return Lifecycle(folder, chats, kill_status, after_restart, ended, before_stop, stop_status,
                         read_folder(folder), restart_log)
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.kill()


def test_sigkill_loses_nothing_acknowledged_and_open_conversations_continue(lifecycle):
    """After a SIGKILL the restarted server's folder holds every acknowledged message, rating (the later
    one where a message was re-rated) and comment; the ended conversation stays ended (409), and the
    open one takes new messages on its own line (no second line for it)."""
    chats = lifecycle.chats
    assert lifecycle.kill_status == -signal.SIGKILL
    assert "Replayed" in lifecycle.restart_log
    after = lifecycle.after_restart
    assert set(after) == {"durable_alpha", "durable_bravo", "durable_charlie"}
    grown = chats["alpha"]
    before_restart = dataclasses.replace(grown, messages=grown.messages[:6], bot_ids=grown.bot_ids[:3],
                                         ratings={k: v for k, v in grown.ratings.items() if k in grown.bot_ids[:3]})
    assert_holds(after, before_restart)
    assert after["durable_alpha"][1]["message_history"][1]["dislike_type"] == "repeating"
    assert_holds(after, chats["bravo"])
    assert_holds(after, chats["charlie"])
    assert lifecycle.ended_after_restart.status_code == 409
    assert len(lifecycle.after_stop["durable_alpha"][1]["message_history"]) == 8  # the same line, grown
    assert_holds(lifecycle.after_stop, chats["alpha"])


def test_sigterm_compacts_and_the_data_command_reads_the_folder(lifecycle):
    """What was said after the restart is only in the log until SIGTERM; the graceful stop writes it to
    the chunk files, which `python -m bb3x_jax.data stats` reads as a release: nothing skipped, one
    example per bot message, and the positive / negative counts of the final ratings."""
    assert lifecycle.stop_status == -signal.SIGTERM
    assert "durable_delta" not in lifecycle.before_stop
    assert len(lifecycle.before_stop["durable_alpha"][1]["message_history"]) == 6
    for chat in lifecycle.chats.values():
        assert_holds(lifecycle.after_stop, chat)
    assert set(lifecycle.after_stop) == {chat.user for chat in lifecycle.chats.values()}
    assert not os.path.exists(os.path.join(lifecycle.folder, store_lib.WAL_NAME + ".tmp"))

    by_split = collections.defaultdict(list)
    for chat in lifecycle.chats.values():
        by_split[chat.split].append(chat)
    for split, chats in sorted(by_split.items()):
        result = subprocess.run([sys.executable, "-m", "bb3x_jax.data", "stats", "--manual_dir", lifecycle.folder,
                                 "--stream", "bot", "--split", split], cwd=REPO, env=environment(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        ratings = [chat.ratings.get(mid, UNRATED) for chat in chats for mid in chat.bot_ids]
        expected = {"skipped": 0, "conversations": len(chats), "examples": len(ratings),
                    "positive": sum(r[0] for r in ratings), "negative": sum(r[1] for r in ratings)}
        assert {key: stats[key] for key in expected} == expected, (split, stats)


def test_a_taken_port_fails_in_one_line_before_the_model(tmp_path):
    """A port in use gives one line `error: ... serve.port ...` and exit status 2; the workdir has no model
    and no init_from, so naming the port (not train.init_from) shows that nothing was loaded first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_main(str(tmp_path / "empty"), f"--config.serve.port={port}", mode="serve", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "serve.port" in lines[0], result.stderr
    assert f"127.0.0.1:{port} is in use" in lines[0]
    assert not os.path.exists(tmp_path / "empty" / "deployment")


def test_no_model_fails_naming_init_from(tmp_path):
    """A workdir with neither a checkpoint nor train.init_from fails in one line naming train.init_from,
    exit status 2, and writes no deployment folder."""
    result = run_main(str(tmp_path / "empty"), mode="serve", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.init_from" in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "empty" / "deployment")


def test_init_from_serves_from_an_empty_workdir(serve, trained_workdir, lifecycle, tmp_path):
    """With no checkpoint in the workdir, --config.train.init_from=<trained>/checkpoints is served: it
    answers (the same greedy reply as the trained workdir's own server) and records in the workdir."""
    workdir = str(tmp_path / "empty")
    os.makedirs(workdir)
    source = os.path.join(trained_workdir, "checkpoints")
    server = serve(workdir, f"--config.train.init_from={source}", NO_WARM_UP)
    assert f"Serving {source} at {server.url}/" in server.output()
    with server.client() as client:
        chat = start(client, "from_init_from")
        say(client, chat, "hello there")
    assert chat.messages[1] == lifecycle.chats["alpha"].messages[1]
    assert server.stop() == -signal.SIGTERM
    assert_holds(read_folder(os.path.join(workdir, "deployment")), chat)
