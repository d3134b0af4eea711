"""Reply latency and throughput of the chat server (a script, not a test).

    python benchmarks/serve_latency.py [--users 1,8,32] [--messages 8] [--max-batch 32] [--preset small]
                                       [--method beam --beam-size 10 --max-len 32] [--tiny]

Why: the server batches concurrent users' requests into one jitted search
(``bb3x_jax.deploy.responder``); this measures what a user waits for a reply
and how many replies per second the server gives as users are added.

What runs: the real app (``bb3x_jax.deploy.app.make_app``) under uvicorn in a
thread on 127.0.0.1 (a free port), over a ``BatchingResponder`` and a
``DeploymentStore`` in a temporary folder, so each reply's latency includes
its two fsynced log writes. Every batch size is compiled before the first
user arrives. Each simulated user (one ``httpx.AsyncClient``) starts a
conversation, then sends ``--messages`` messages one after another, timing
each reply; all users of a level start together.

Model: the ``--preset`` architecture with random weights (``build.build``,
seed 0), with the tokenizer's vocabulary and special ids, as training sets
them (``config.model_config``). Random weights seldom produce the end token,
so nearly every reply runs the full ``max_len``: the numbers are those of the
longest replies.

Tokenizer: a sentencepiece model trained the way the project trains its own
(``train_sentencepiece``, ``hard_vocab_limit`` off, at most
``config.data.tokenizer.vocab_size`` pieces) on the turns of the train chunks
of a synthetic release (``synthetic.synthesize``, seed 0), both cached under
``--workdir``. The users' messages are that release's human turns. Contexts
are framed with ``config.data``'s truncation (128 context tokens).

Generation: ``config.generation`` of configs/cringe.py (beam 10, max_len 32,
3-gram blocking) unless --method / --beam-size / --max-len say otherwise;
each line says which. The batch window is ``config.serve.batch_wait_ms``
unless --batch-wait-ms says otherwise. ``--tiny`` is a smoke run of under a
minute (mostly compiling): preset tiny, greedy replies of 8 tokens, users 1
and 4, 2 messages, batches up to 4.

Prints one JSON line per concurrency level.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ and bb3x_jax/ from this checkout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a latency some request actually had."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def release_texts(workdir: str, conversations: int) -> tuple[list[str], list[str]]:
    """(every turn of the train chunks, the human turns): from a synthetic release cached in ``workdir``."""
    from bb3x_jax.data import schema, synthetic

    release = os.path.join(workdir, f"release-{conversations}")
    if not os.path.exists(os.path.join(release, "DONE")):
        synthetic.synthesize(release, conversations, seed=0)
        open(os.path.join(release, "DONE"), "w").close()
    turns, human = [], []
    for chunk in schema.SPLIT_CHUNKS["train"]:
        with open(os.path.join(release, schema.CHUNK_TEMPLATE.format(chunk)), encoding="utf-8") as f:
            for line in f:
                for message in json.loads(line)["message_history"]:
                    text = " ".join(message["text"].split())
                    if text:
                        turns.append(text)
                        if message["sender"] == schema.HUMAN:
                            human.append(text)
    return turns, human


def load_tokenizer(workdir: str, conversations: int, vocab_size: int, turns: list[str]):
    from bb3x_jax.data.tokenizers import base as tokenizer_lib

    path = os.path.join(workdir, f"sentencepiece-c{conversations}-v{vocab_size}.model")
    if os.path.exists(path):
        return tokenizer_lib.SentencePieceTokenizer.load(path)
    return tokenizer_lib.train_sentencepiece(turns, path, vocab_size=vocab_size, seed=0,
                                             extra_options={"hard_vocab_limit": False})


class ThreadedServer:
    """uvicorn serving ``app`` on 127.0.0.1 from a thread; ``stop`` runs the app's shutdown."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


async def simulate(url: str, users: int, messages: list[list[str]]) -> tuple[list[float], float]:
    """(every reply's latency in s, wall time in s from the first message sent to the last reply)."""
    import httpx

    clients = [httpx.AsyncClient(base_url=url, timeout=600) for _ in range(users)]
    try:
        started = await asyncio.gather(*(c.post("/api/conversations", json={}) for c in clients))
        ids = [r.raise_for_status().json()["conversation_id"] for r in started]

        async def user(client, cid, texts):
            latencies = []
            for text in texts:
                t0 = time.perf_counter()
                response = await client.post(f"/api/conversations/{cid}/messages", json={"text": text})
                response.raise_for_status()
                latencies.append(time.perf_counter() - t0)
            await client.post(f"/api/conversations/{cid}/end")
            return latencies

        t0 = time.perf_counter()
        per_user = await asyncio.gather(*(user(c, cid, texts) for c, cid, texts in zip(clients, ids, messages)))
        wall = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return [x for latencies in per_user for x in latencies], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", default=None, help="comma-separated concurrency levels (default 1,8,32)")
    parser.add_argument("--messages", type=int, default=None, help="messages per user (default 8)")
    parser.add_argument("--max-batch", type=int, default=None, help="serve.max_batch (default 32)")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="default: config.serve.batch_wait_ms")
    parser.add_argument("--method", default=None, help="default: config.generation.method")
    parser.add_argument("--beam-size", type=int, default=None, help="default: config.generation.beam_size")
    parser.add_argument("--max-len", type=int, default=None, help="default: config.generation.max_len")
    parser.add_argument("--preset", default=None, help="model preset (default small)")
    parser.add_argument("--conversations", type=int, default=None,
                        help="size of the synthetic release for the tokenizer and messages (default 2000)")
    parser.add_argument("--workdir", default="/tmp/bb3x_serve_bench", help="where the release and tokenizer are cached")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (see the docstring)")
    args = parser.parse_args()

    smoke = dict(users="1,4", messages=2, max_batch=4, method="greedy", beam_size=1, max_len=8, preset="tiny",
                 conversations=200)
    full = dict(users="1,8,32", messages=8, max_batch=32, preset="small", conversations=2000)
    for name, value in (smoke if args.tiny else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    levels = [int(u) for u in args.users.split(",")]

    import jax
    from flax import nnx

    from bb3x_jax import config as config_lib
    from bb3x_jax.data import framing as framing_lib
    from bb3x_jax.deploy import app as app_lib
    from bb3x_jax.deploy import store as store_lib
    from bb3x_jax.deploy.responder import BatchingResponder, Responder
    from bb3x_jax.model import build
    from configs import cringe

    config = cringe.get_config()
    for flag, key in (("method", "method"), ("beam_size", "beam_size"), ("max_len", "max_len")):
        if getattr(args, flag) is not None:
            config.generation[key] = getattr(args, flag)
    if config.generation.method != "beam":
        config.generation.beam_size = 1
    generation = config_lib.generation_settings(config)
    batch_wait_ms = config.serve.batch_wait_ms if args.batch_wait_ms is None else args.batch_wait_ms

    os.makedirs(args.workdir, exist_ok=True)
    turns, human = release_texts(args.workdir, args.conversations)
    tokenizer = load_tokenizer(args.workdir, args.conversations, config.data.tokenizer.vocab_size, turns)
    config.model.preset = args.preset
    cfg = config_lib.model_config(config, tokenizer)
    network = build.build(cfg, seed=0)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(network, nnx.Param)))
    framing = framing_lib.Framing(config.data.text_truncate, config.data.label_truncate)
    responder = Responder(network, tokenizer, framing, generation, max_batch=args.max_batch, seed=0)
    t0 = time.perf_counter()
    responder.warm_up()
    warm_up_s = time.perf_counter() - t0
    search_s = {}  # one search per batch size, with no server around it: what batching can gain here
    for size in responder.sizes:
        t0 = time.perf_counter()
        responder.reply([[text] for text in human[:size]])
        search_s[size] = round(time.perf_counter() - t0, 4)

    batching = BatchingResponder(responder, wait_s=batch_wait_ms / 1000)
    with tempfile.TemporaryDirectory() as folder:
        store = store_lib.DeploymentStore(folder)
        server = ThreadedServer(app_lib.make_app(store, batching, app_lib.ServeSettings()))
        try:
            offset = 0
            for users in levels:
                messages = [[human[(offset + u * args.messages + m) % len(human)] for m in range(args.messages)]
                            for u in range(users)]
                offset += users * args.messages
                seen = len(batching.batch_counts)
                latencies, wall = asyncio.run(simulate(server.url, users, messages))
                counts = batching.batch_counts[seen:]
                print(json.dumps({
                    "users": users,
                    "messages_per_user": args.messages,
                    "replies": len(latencies),
                    "p50_s": round(percentile(latencies, 50), 4),
                    "p95_s": round(percentile(latencies, 95), 4),
                    "mean_s": round(sum(latencies) / len(latencies), 4),
                    "wall_s": round(wall, 4),
                    "replies_per_s": round(len(latencies) / wall, 3),
                    "batches": len(counts),
                    "mean_batch": round(sum(counts) / len(counts), 3),
                    "max_batch": responder.max_batch,
                    "batch_wait_ms": batch_wait_ms,
                    "generation": dataclasses.asdict(generation),
                    "preset": args.preset,
                    "params": int(params),
                    "tokenizer_vocab": tokenizer.vocab_size,
                    "warm_up_s": round(warm_up_s, 1),
                    "search_s_by_batch": search_s,
                    "backend": jax.default_backend(),
                }), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
