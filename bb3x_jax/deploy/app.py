"""The chat server: the page, and the JSON API the page uses (documented in the README).

Why Starlette: a maintained ASGI toolkit gives routing, request parsing and
static files, and runs under uvicorn; the server's own job is only the API's
rules (ids, validation, ratings) and the order of writes. Every message and
rating is in the store's log (fsynced) before its response is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
import re
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from bb3x_jax.data import schema
from bb3x_jax.deploy import store as store_lib
from bb3x_jax.deploy.responder import BatchingResponder

PAGE_DIR = pathlib.Path(__file__).parent / "page"
# The page's scripts and styles come from this server only: a reply or a user's text can never run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_KIND_NAMES = {str: "string", bool: "boolean", dict: "object"}
_PSEUDO_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The API's rules, from ``config.serve`` (``modes.serve.settings``)."""

    max_chars: int = 1000
    notice: str = ""
    reasons: tuple[str, ...] = schema.MTURK_BAD  # the paper's categories of a bad response
    blocked_words: tuple[str, ...] = ()
    safety_response: str = ""
    compact_every_s: float = 2.0

    def flagged(self, text: str) -> bool:
        """The string matcher's verdict: a configured word or phrase appears in the text."""
        words = f" {' '.join(re.findall(r'[a-z0-9]+', text.lower()))} "
        return any(f" {phrase} " in words for phrase in self.blocked_words)


class _PageFiles(StaticFiles):
    """The page's script and style, with the page's security headers."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(SECURITY_HEADERS)
        return response


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def reason_label(reason: str) -> str:
    return reason.replace("_", " ").capitalize()


async def _body(request: Request, settings: ServeSettings) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 8 * settings.max_chars + 4096:  # any field over the limit: refused before parsing
        raise ApiError(413, f"body: {len(raw)} bytes, over what a message of serve.max_chars "
                            f"({settings.max_chars}) characters needs")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(422, "body: not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "body: must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = True):
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(422, f"{name}: required")
        return None
    if not isinstance(value, kind):
        raise ApiError(422, f"{name}: must be a {_KIND_NAMES.get(kind, kind.__name__)}")
    return value


def _text(body: dict[str, Any], name: str, settings: ServeSettings) -> str:
    text = _field(body, name, str).strip()
    if not text:
        raise ApiError(422, f"{name}: must not be empty")
    if len(text) > settings.max_chars:
        raise ApiError(413, f"{name}: {len(text)} characters, over the limit of {settings.max_chars} "
                            "(serve.max_chars)")
    return text


def make_app(store: store_lib.DeploymentStore, responder: BatchingResponder | None,
             settings: ServeSettings = ServeSettings()) -> Starlette:
    """The ASGI app over ``store`` and ``responder`` (None: the store is served, replies fail)."""
    locks: dict[str, asyncio.Lock] = {}

    def conversation_lock(cid: str) -> asyncio.Lock:
        return locks.setdefault(cid, asyncio.Lock())

    async def page(request: Request):
        return FileResponse(PAGE_DIR / "index.html", headers=SECURITY_HEADERS)

    async def page_settings(request: Request):
        return JSONResponse({
            "notice": settings.notice, "max_chars": settings.max_chars,
            "reasons": [{"value": r, "label": reason_label(r)} for r in settings.reasons],
        })

    async def start(request: Request):
        body = await _body(request, settings)
        user = _field(body, "user_pseudo_id", str, required=False)
        if user is not None and not _PSEUDO_ID.match(user):
            raise ApiError(422, "user_pseudo_id: 8-64 letters, digits, '-' or '_'")
        cid, user = await run_in_threadpool(store.start, user)
        return JSONResponse({"conversation_id": cid, "user_pseudo_id": user})

    async def message(request: Request):
        cid = request.path_params["cid"]
        body = await _body(request, settings)
        text = _text(body, "text", settings)
        store.open_conversation(cid)
        async with conversation_lock(cid):  # one turn at a time per conversation
            flagged = settings.flagged(text)
            await run_in_threadpool(store.add_message, cid, store_lib.human_message(text, flagged))
            if flagged and settings.safety_response:
                bot = store_lib.bot_message(settings.safety_response, False, safety_response=True)
            else:
                if responder is None:
                    raise ApiError(503, "no model is loaded")
                history = [m["text"] for m in store.history(cid)]
                reply = await responder.reply(history)
                bot = store_lib.bot_message(reply, settings.flagged(reply))
            await run_in_threadpool(store.add_message, cid, bot)
        return JSONResponse({"message_id": bot["bot_message_id"], "text": bot["text"]})

    async def feedback(request: Request):
        cid = request.path_params["cid"]
        body = await _body(request, settings)
        message_id = _field(body, "message_id", str)
        rating = _field(body, "rating", str)
        if rating not in (store_lib.LIKE, store_lib.DISLIKE):
            raise ApiError(422, f"rating: must be '{store_lib.LIKE}' or '{store_lib.DISLIKE}'")
        reason = _field(body, "reason", str, required=False)
        if reason is not None and rating == store_lib.LIKE:
            raise ApiError(422, "reason: only a dislike takes a reason")
        if reason is not None and reason not in settings.reasons:
            raise ApiError(422, f"reason: must be one of {', '.join(settings.reasons)} or null")
        comment = _field(body, "comment", str, required=False)
        if comment is not None and comment.strip():
            comment = _text(body, "comment", settings)
            if rating != store_lib.DISLIKE:
                raise ApiError(422, "comment: only a dislike takes a comment")
        else:
            comment = None  # a blank comment box adds no message
        async with conversation_lock(cid):
            await run_in_threadpool(store.rate, cid, message_id, rating, reason)
            if comment:  # the user's words on why: a human message marked as dislike feedback
                note = store_lib.human_message(comment, settings.flagged(comment), dislike_feedback=True)
                await run_in_threadpool(store.add_message, cid, note)
        return JSONResponse({"ok": True})

    async def end(request: Request):
        cid = request.path_params["cid"]
        async with conversation_lock(cid):
            await run_in_threadpool(store.end, cid)
        locks.pop(cid, None)
        return JSONResponse({"ok": True})

    async def api_error(request: Request, error: ApiError):
        return JSONResponse({"detail": error.detail}, status_code=error.status)

    async def unknown(request: Request, error: KeyError):
        what = "message" if isinstance(error, store_lib.UnknownMessage) else "conversation"
        return JSONResponse({"detail": f"{what}: no such {what}"}, status_code=404)

    async def ended(request: Request, error: store_lib.ConversationEnded):
        return JSONResponse({"detail": "conversation: it has ended; start a new one"}, status_code=409)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(_compact_periodically(store, settings.compact_every_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if responder is not None:
                await run_in_threadpool(responder.close)
            await run_in_threadpool(store.close)

    conversation = "/api/conversations/{cid:str}"
    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/settings", page_settings),
            Route("/api/conversations", start, methods=["POST"]),
            Route(f"{conversation}/messages", message, methods=["POST"]),
            Route(f"{conversation}/feedback", feedback, methods=["POST"]),
            Route(f"{conversation}/end", end, methods=["POST"]),
            Mount("/static", _PageFiles(directory=PAGE_DIR), name="static"),
        ],
        exception_handlers={ApiError: api_error, store_lib.UnknownConversation: unknown,
                            store_lib.UnknownMessage: unknown, store_lib.ConversationEnded: ended},
        lifespan=lifespan,
    )


async def _compact_periodically(store: store_lib.DeploymentStore, every_s: float) -> None:
    """The chunk files follow the log within ``every_s`` seconds (the log is what is durable)."""
    while True:
        await asyncio.sleep(every_s)
        await run_in_threadpool(store.compact)


def parse_words(text: str) -> tuple[str, ...]:
    """``serve.blocked_words``: comma-separated words or phrases, matched as whole words."""
    return tuple(" ".join(re.findall(r"[a-z0-9]+", w.lower())) for w in text.split(",") if w.strip())
