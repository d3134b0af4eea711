"""Where a search's time goes: the prompt or the token loop, and which kind of op (a script, not a test).

    python benchmarks/decode_profile.py [--model bench_small] [--method greedy|beam] [--beams 4]
        [--batch 8 --context 128 --new_tokens 32] [--runs 3] [--top 10] [--tiny]

Compiles the search ``decoding.compiled_search`` runs (the one behind every
generation of the project) for full-length random contexts, the end token
banned until ``--new_tokens`` so every row decodes that many tokens, as in
``decode_reference.py``. It times ``--runs`` searches, runs them again under
``jax.profiler`` and adds up the executed XLA ops of the trace by part and kind:

* part: ``loop`` (inside the ``while_loop``: one decoder step per token, the
  search's bookkeeping) or ``prompt`` (encoding the context, the first
  decoder pass, copying the prompt's cache to the beams);
* kind: as in ``step_profile.py`` (``matmul``, ``copy/transpose``,
  ``elementwise``; ``dropout rng`` never occurs, inference draws none).

Prints one JSON line per (part, kind) with milliseconds per search, the op
count and, for the loop, milliseconds per generated token step; then the
``--top`` slowest single ops; then a total line with the median search time
measured without the profiler. On a CPU, ops that XLA runs side by side are
each counted whole, so the groups can add up to more than the search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # step_profile, a sibling script
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import step_profile  # noqa: E402
from flax import nnx  # noqa: E402

from bb3x_jax import decoding  # noqa: E402
from bb3x_jax.model import build  # noqa: E402
from bb3x_jax.model.config import PRESETS  # noqa: E402

TINY = dict(model="tiny", batch=2, context=12, new_tokens=6, beams=2, runs=1)


def contexts(cfg, batch: int, length: int, seed: int) -> np.ndarray:
    """Full-length rows of random ids that avoid the special tokens (``decode_reference.py``'s contexts)."""
    low = max(cfg.pad_id, cfg.start_id, cfg.end_id) + 2
    return np.random.default_rng(seed).integers(low, cfg.vocab_size, (batch, length), dtype=np.int32)


def part_of(op_name: str) -> str:
    return "loop" if "while/body" in op_name or "while/cond" in op_name else "prompt"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench_small", choices=sorted(PRESETS))
    parser.add_argument("--method", default="greedy", choices=("greedy", "beam"))
    parser.add_argument("--beams", type=int, default=4, help="beam size with --method=beam")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="timed searches, then as many profiled ones")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run on the tiny preset (a smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    if args.runs < 1 or args.new_tokens < 1 or (args.method == "beam" and args.beams < 2):
        parser.error("--runs and --new_tokens must be >= 1, --beams >= 2 with --method=beam")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cfg = PRESETS[args.model]
    graphdef, state = nnx.split(build.build(cfg, seed=args.seed))
    beams = args.beams if args.method == "beam" else 1
    settings = decoding.Settings(method=args.method, beam_size=beams, max_len=args.new_tokens,
                                 min_len=args.new_tokens)
    ids, key = jax.numpy.asarray(contexts(cfg, args.batch, args.context, args.seed)), jax.random.key(0)
    compiled = decoding.compiled_search(graphdef, settings).lower(state, ids, key).compile()
    index = step_profile.hlo_index(compiled.as_text())
    jax.block_until_ready(compiled(state, ids, key))
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, ids, key))
        times.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.runs):
                jax.block_until_ready(compiled(state, ids, key))
        totals = step_profile.op_times(trace_dir)
    groups, singles = step_profile.tally(
        totals, index, args.runs, lambda name, info: (part_of(info["op_name"]), step_profile.classify(name, info)[1]))
    records = []
    for (part, kind), (ms, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        record = {"part": part, "kind": kind, "ms_per_search": round(ms, 2), "ops": count}
        if part == "loop":
            record["ms_per_token_step"] = round(ms / args.new_tokens, 3)
        records.append(record)
    records += [{"op": name, "ms_per_search": round(ms, 2), "part_kind": "/".join(place),
                 "op_name": index[name]["op_name"][:120]} for ms, name, place in sorted(singles, reverse=True)[:args.top]]
    median = statistics.median(times)
    records.append({"model": args.model, "method": args.method, "beams": beams, "batch": args.batch,
                    "context": args.context, "new_tokens": args.new_tokens, "search_s_median": round(median, 4),
                    "new_tokens_per_s": round(args.batch * args.new_tokens / median, 1),
                    "profiled_ms_per_search": round(sum(ms for ms, _, _ in singles), 1),
                    "backend": jax.default_backend()})
    for record in records:
        print(json.dumps(record))
    return records


if __name__ == "__main__":
    main()
