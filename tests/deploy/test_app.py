"""The chat server's JSON API in process (Starlette's TestClient / httpx's ASGITransport), over a real store.

Protects the README's API contract: what each endpoint answers and writes, that
conversation ids cannot be guessed, that every refused request names the field
(422 / 413), the conversation or message (404) or the end (409) and writes
nothing, that ratings replace each other and comments become dislike-feedback
messages, that the page and its files carry the Content-Security-Policy, and
that concurrent requests of several conversations are decoded in one batch with
the same replies as alone. The API-rule tests use ``EchoResponder`` (a stand-in
that replies at once); the batching test uses the real ``Responder`` over the
tiny trained model of ``trained_workdir``.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import os

import httpx
import pytest
from starlette.testclient import TestClient

from bb3x_jax.data import release, schema
from bb3x_jax.deploy import app as app_lib
from bb3x_jax.deploy import store as store_lib
from bb3x_jax.deploy.responder import BatchingResponder
from tests.deploy.conftest import SERVE_FLAGS
from tests.modes.test_train import RUN_FLAGS

MAX_CHARS = 50
SETTINGS = app_lib.ServeSettings(max_chars=MAX_CHARS, compact_every_s=0.05)


class EchoResponder:
    """A stand-in for BatchingResponder: replies "echo: <last turn>" at once and records the histories."""

    def __init__(self):
        self.histories: list[list[str]] = []
        self.closed = False

    async def reply(self, history):
        self.histories.append(list(history))
        return f"echo: {history[-1]}"

    def close(self):
        self.closed = True


@pytest.fixture
def api(tmp_path):
    """(client, store, responder) of an app over a fresh store in tmp_path and an EchoResponder."""
    store = store_lib.DeploymentStore(str(tmp_path / "deployment"))
    responder = EchoResponder()
    with TestClient(app_lib.make_app(store, responder, SETTINGS)) as client:
        yield client, store, responder
    assert responder.closed  # the lifespan closes the responder and the store on the way out


def chat_line(store: store_lib.DeploymentStore, cid: str, chat_id: str | None = None) -> dict:
    """The conversation's line in its chunk file, read by the release reader: the only line there, or
    the one of ``chat_id`` (conversations may share a chunk)."""
    path = store.chunk_path(store_lib.chunk_of(cid))
    with open(path, "rb") as f:
        lines = [release.parse_conversation(line, path) for line in f.read().split(b"\n") if line]
    if chat_id is not None:
        lines = [line for line in lines if line["chat_id"] == chat_id]
    assert len(lines) == 1, lines
    return lines[0]


def start(client, **body) -> str:
    response = client.post("/api/conversations", json=body or None)
    assert response.status_code == 200, response.text
    return response.json()["conversation_id"]


def say(client, cid: str, text: str) -> dict:
    response = client.post(f"/api/conversations/{cid}/messages", json={"text": text})
    assert response.status_code == 200, response.text
    return response.json()


def test_happy_path_writes_the_release_line_on_end(api):
    """settings -> start -> messages (the responder sees the whole history) -> like -> end: each answers
    as documented, and after end the conversation's chunk line holds every message and the rating."""
    client, store, responder = api
    settings = client.get("/api/settings").json()
    assert settings["max_chars"] == MAX_CHARS and settings["notice"] == SETTINGS.notice
    assert [r["value"] for r in settings["reasons"]] == list(SETTINGS.reasons)
    assert {"value": "off_topic", "label": "Off topic"} in settings["reasons"]

    response = client.post("/api/conversations", json={"user_pseudo_id": "tester_0001"})
    assert response.status_code == 200
    cid = response.json()["conversation_id"]
    assert response.json() == {"conversation_id": cid, "user_pseudo_id": "tester_0001"}
    first = say(client, cid, "  Hello there  ")
    assert first["text"] == "echo: Hello there" and set(first) == {"message_id", "text"}
    second = say(client, cid, "How are you?")
    assert responder.histories == [["Hello there"], ["Hello there", "echo: Hello there", "How are you?"]]
    liked = client.post(f"/api/conversations/{cid}/feedback",
                        json={"message_id": first["message_id"], "rating": "like", "reason": None})
    assert liked.json() == {"ok": True}
    assert client.post(f"/api/conversations/{cid}/end").json() == {"ok": True}

    convo = chat_line(store, cid)
    assert convo["user_pseudo_id"] == "tester_0001"
    history = convo["message_history"]
    assert [(m["sender"], m["text"]) for m in history] == [
        ("human", "Hello there"), ("bot", "echo: Hello there"), ("human", "How are you?"),
        ("bot", "echo: How are you?")]
    assert [m.get("bot_message_id") for m in history[1::2]] == [first["message_id"], second["message_id"]]
    assert (history[1]["isLiked"], history[3]["isLiked"], history[3]["isDisliked"]) == (True, False, False)
    assert client.post(f"/api/conversations/{cid}/messages", json={"text": "still there?"}).status_code == 409

    anonymous = client.post("/api/conversations")  # no body: the server picks the pseudo id
    assert anonymous.status_code == 200 and len(anonymous.json()["user_pseudo_id"]) >= 16


def test_conversation_ids_are_unguessable(api):
    """A conversation id is the only secret guarding a conversation: 1000 starts give 1000 distinct
    URL-safe ids, each decoding to at least 128 random bits."""
    client, _, _ = api
    ids = [client.post("/api/conversations").json()["conversation_id"] for _ in range(1000)]
    assert len(set(ids)) == 1000
    for cid in ids:
        assert set(cid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert len(base64.urlsafe_b64decode(cid + "=" * (-len(cid) % 4))) * 8 >= 128
    # 32 random characters over 1000 ids: every position takes many values (no counter, no timestamp)
    assert all(len({cid[i] for cid in ids}) > 40 for i in range(len(ids[0]) - 1))


def test_every_refusal_names_its_field_and_writes_nothing(api):
    """Bad JSON, a non-object body, missing or ill-typed fields, an unknown rating or reason, a reason or
    comment on a like, empty text: 422 naming the field; text, comment or body over serve.max_chars:
    413; an unknown conversation or message: 404; an ended conversation: 409. None of them logs an event."""
    client, store, _ = api
    cid = start(client)
    mid = say(client, cid, "hello")["message_id"]
    ended = start(client)
    say(client, ended, "bye")
    assert client.post(f"/api/conversations/{ended}/end").status_code == 200
    messages, feedback = f"/api/conversations/{cid}/messages", f"/api/conversations/{cid}/feedback"
    cases = [
        ("/api/conversations", b"{not json", 422, "body: not valid JSON"),
        ("/api/conversations", b"[]", 422, "body: must be a JSON object"),
        ("/api/conversations", {"user_pseudo_id": 5}, 422, "user_pseudo_id: must be a string"),
        ("/api/conversations", {"user_pseudo_id": "has spaces in it"}, 422, "user_pseudo_id:"),
        ("/api/conversations", {"user_pseudo_id": "short"}, 422, "user_pseudo_id:"),
        (messages, b"{not json", 422, "body: not valid JSON"),
        (messages, b'{"text": "\xff\xfe"}', 422, "body: not valid JSON"),
        (messages, b'"hello"', 422, "body: must be a JSON object"),
        (messages, b"[1, 2]", 422, "body: must be a JSON object"),
        (messages, b"", 422, "text: required"),
        (messages, {}, 422, "text: required"),
        (messages, {"text": None}, 422, "text: required"),
        (messages, {"txt": "hello"}, 422, "text: required"),
        (messages, {"text": 5}, 422, "text: must be a string"),
        (messages, {"text": ["hello"]}, 422, "text: must be a string"),
        (messages, {"text": "  \n "}, 422, "text: must not be empty"),
        (messages, {"text": "x" * (MAX_CHARS + 1)}, 413, f"text: {MAX_CHARS + 1} characters"),
        (messages, {"text": "x" * (20 * MAX_CHARS + 4096)}, 413, "body:"),
        (feedback, {}, 422, "message_id: required"),
        (feedback, {"message_id": 7, "rating": "like"}, 422, "message_id: must be a string"),
        (feedback, {"message_id": mid}, 422, "rating: required"),
        (feedback, {"message_id": mid, "rating": True}, 422, "rating: must be a string"),
        (feedback, {"message_id": mid, "rating": "love"}, 422, "rating: must be 'like' or 'dislike'"),
        (feedback, {"message_id": mid, "rating": "like", "reason": "other"}, 422, "reason: only a dislike"),
        (feedback, {"message_id": mid, "rating": "dislike", "reason": "boring"}, 422, "reason: must be one of"),
        (feedback, {"message_id": mid, "rating": "dislike", "reason": 3}, 422, "reason: must be a string"),
        (feedback, {"message_id": mid, "rating": "dislike", "comment": 3}, 422, "comment: must be a string"),
        (feedback, {"message_id": mid, "rating": "like", "comment": "nice"}, 422, "comment: only a dislike"),
        (feedback, {"message_id": mid, "rating": "dislike", "comment": "y" * (MAX_CHARS + 1)}, 413, "comment:"),
        (feedback, {"message_id": "no-such-message", "rating": "like"}, 404, "message:"),
        (feedback, {"message_id": say(client, cid, "hi")["message_id"][::-1], "rating": "like"}, 404, "message:"),
        ("/api/conversations/no-such-conversation/messages", {"text": "hi"}, 404, "conversation:"),
        ("/api/conversations/no-such-conversation/feedback", {"message_id": mid, "rating": "like"}, 404,
         "conversation:"),
        ("/api/conversations/no-such-conversation/end", None, 404, "conversation:"),
        (f"/api/conversations/{ended}/messages", {"text": "hi"}, 409, "conversation: it has ended"),
        (f"/api/conversations/{ended}/feedback", {"message_id": mid, "rating": "like"}, 409, "conversation:"),
        (f"/api/conversations/{ended}/end", None, 409, "conversation: it has ended"),
    ]
    logged = os.path.getsize(store.wal_path)
    history = store.history(cid)
    wrong = []
    for path, body, status, detail in cases:
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = client.post(path, json=body)
        got = (response.status_code, response.json().get("detail", ""))
        if got[0] != status or not got[1].startswith(detail):
            wrong.append(f"{path} {str(body)[:60]}: expected {status} {detail!r}, got {got}")
    assert not wrong, "\n".join(wrong)
    assert os.path.getsize(store.wal_path) == logged and store.history(cid) == history


def test_a_later_rating_replaces_the_earlier_one(api):
    """like, then dislike with a reason, then dislike without one: the line holds only the last rating;
    the other bot message keeps its own."""
    client, store, _ = api
    cid = start(client)
    first, second = say(client, cid, "one")["message_id"], say(client, cid, "two")["message_id"]

    def rate(mid, rating, reason=None):
        response = client.post(f"/api/conversations/{cid}/feedback",
                               json={"message_id": mid, "rating": rating, "reason": reason})
        assert response.json() == {"ok": True}, response.text

    rate(first, "like")
    rate(second, "dislike", "repeating")
    rate(first, "dislike", "nonsensical")
    bot = [m for m in store.history(cid) if m["sender"] == "bot"]
    assert [(m["isLiked"], m["isDisliked"], m["dislike_type"]) for m in bot] == [
        (False, True, "nonsensical"), (False, True, "repeating")]
    rate(second, "like")
    rate(first, "dislike")
    client.post(f"/api/conversations/{cid}/end")
    bot = [m for m in chat_line(store, cid)["message_history"] if m["sender"] == "bot"]
    assert [(m["isLiked"], m["isDisliked"], m["dislike_type"]) for m in bot] == [(False, True, ""), (True, False, "")]


def test_a_comment_becomes_a_dislike_feedback_message(api):
    """A dislike's comment is stored as a human message with isDislikeFeedback=true after the history so
    far (the rated message keeps its reason); a blank comment adds nothing."""
    client, store, _ = api
    cid = start(client)
    mid = say(client, cid, "tell me a joke")["message_id"]
    response = client.post(f"/api/conversations/{cid}/feedback",
                           json={"message_id": mid, "rating": "dislike", "reason": "other",
                                 "comment": "  That was not a joke.  "})
    assert response.json() == {"ok": True}
    blank = client.post(f"/api/conversations/{cid}/feedback",
                        json={"message_id": mid, "rating": "dislike", "reason": "other", "comment": "   "})
    assert blank.json() == {"ok": True}
    client.post(f"/api/conversations/{cid}/end")
    history = chat_line(store, cid)["message_history"]
    assert [(m["sender"], m["text"]) for m in history] == [
        ("human", "tell me a joke"), ("bot", "echo: tell me a joke"), ("human", "That was not a joke.")]
    assert [m.get("isDislikeFeedback") for m in history[::2]] == [False, True]
    assert (history[1]["isDisliked"], history[1]["dislike_type"]) == (True, "other")
    assert history[2]["safety"] == {"duo_safety": schema.SAFETY_OK, "string_matcher": schema.SAFETY_OK}


def test_blocked_words_flag_safety_and_get_the_canned_reply(tmp_path):
    """serve.blocked_words is the server's string matcher: a message with a listed word or phrase (as
    whole words, any case) is flagged unsafe in both verdicts, and with serve.safety_response the bot
    answers with the canned text, marked as BB3 marked its safety deflections, without the model."""
    store = store_lib.DeploymentStore(str(tmp_path / "deployment"))
    responder = EchoResponder()
    settings = app_lib.ServeSettings(blocked_words=app_lib.parse_words("darn, shut up"),
                                     safety_response="Let's talk about something else.")
    with TestClient(app_lib.make_app(store, responder, settings)) as client:
        cid = start(client)
        assert say(client, cid, "Oh DARN it!")["text"] == "Let's talk about something else."
        assert say(client, cid, "darning socks is fun")["text"] == "echo: darning socks is fun"  # not a whole word
        assert say(client, cid, "please Shut  up")["text"] == "Let's talk about something else."
        assert client.post(f"/api/conversations/{cid}/end").status_code == 200
    assert len(responder.histories) == 1  # the model saw only the unflagged message
    history = chat_line(store, cid)["message_history"]
    flagged = [m["safety"]["duo_safety"] != "__ok__" for m in history]
    assert flagged == [True, False, False, False, True, False]
    canned = [history[1], history[5]]
    assert all(m["isSafetyControlledResponse"] and m["previous_interaction_failure"] == "unsafe_Human"
               for m in canned)
    assert not history[3]["isSafetyControlledResponse"] and history[3]["previous_interaction_failure"] == ""


def test_the_page_and_its_files_carry_the_content_security_policy(api):
    """The page, its script and its style are served, each with the Content-Security-Policy (and the
    other security headers), so no text shown on the page can run as code."""
    client, _, _ = api
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for src in ("/static/app.js", "/static/style.css"):
        assert f'"{src}"' in page.text
    for path in ("/", "/static/app.js", "/static/style.css"):
        response = client.get(path)
        assert response.status_code == 200 and response.content, path
        for header, value in app_lib.SECURITY_HEADERS.items():
            assert response.headers.get(header) == value, (path, header)
    assert client.get("/static/missing.js").status_code == 404


# ------------------------------------------------------------------ the real model


def override(config, flag: str) -> None:
    """``--config.a.b=value`` applied as main.py would, the value read in the type of the default."""
    key, value = flag.removeprefix("--config.").split("=", 1)
    *path, name = key.split(".")
    node = config
    for part in path:
        node = node[part]
    default = node[name]
    if isinstance(default, bool):
        node[name] = {"true": True, "false": False}[value.lower()]
    elif isinstance(default, (int, float)):
        node[name] = type(default)(value)
    elif isinstance(default, (tuple, list)):
        node[name] = type(default)(ast.literal_eval(value))
    else:
        node[name] = value


@pytest.fixture(scope="module")
def responder(trained_workdir):
    """The tiny trained model as ``--mode=serve`` loads it (greedy, at most 8 tokens, batches up to 4)."""
    from bb3x_jax import config as config_lib
    from bb3x_jax.modes import serve
    from configs import cringe

    config = cringe.get_config()
    for flag in (*RUN_FLAGS, "--config.train.objective=mle", *SERVE_FLAGS):
        override(config, flag)
    responder, source = serve.load_responder(config_lib.validate(config), trained_workdir)
    assert source.startswith(os.path.join(trained_workdir, "checkpoints"))
    return responder


def test_concurrent_conversations_are_decoded_together_with_the_replies_of_alone(responder, tmp_path):
    """Four conversations' messages sent at once are decoded in one batch (not four), each request gets
    its own reply, and those replies are exactly (greedy) what the same histories get decoded alone."""
    texts = ["hello, how are you?", "what is your favourite food?", "i like to play chess", "tell me about cats"]
    store = store_lib.DeploymentStore(str(tmp_path / "deployment"))
    batching = BatchingResponder(responder, wait_s=0.5)
    app = app_lib.make_app(store, batching, app_lib.ServeSettings(max_chars=200))

    chat_ids: dict[str, str] = {}

    async def session():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=120) as client:
            async def start_and_say(text):
                cid = (await client.post("/api/conversations")).json()["conversation_id"]
                response = await client.post(f"/api/conversations/{cid}/messages", json={"text": text})
                assert response.status_code == 200, response.text
                return cid, response.json()["text"]

            together = await asyncio.gather(*(start_and_say(text) for text in texts))
            counts = list(batching.batch_counts)
            chat_ids.update({cid: store.open_conversation(cid).record["chat_id"] for cid, _ in together})
            alone = [await start_and_say(text) for text in texts]
            for cid, _ in together:
                assert (await client.post(f"/api/conversations/{cid}/end")).status_code == 200
            return together, counts, alone

    try:
        together, counts, alone = asyncio.run(session())
    finally:
        batching.close()
    assert max(counts) > 1 and sum(counts) == len(texts), counts
    assert batching.batch_counts[len(counts):] == [1] * len(texts)
    assert [reply for _, reply in together] == [reply for _, reply in alone]
    assert len({reply for _, reply in together}) > 1  # distinct replies: a mix-up between requests would show
    for (cid, reply), text in zip(together, texts):
        history = chat_line(store, cid, chat_ids[cid])["message_history"]
        assert [m["text"] for m in history] == [text, reply]
    assert store.open_count == len(texts)  # the ones decoded alone are still open
    store.close()
