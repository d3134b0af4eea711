"""Where the train step's time goes, by phase and kind of op (a script, not a test).

    python benchmarks/step_profile.py [--model bench_small] [--steps 3] [--top 10] [--tiny]

Builds the same jitted CRINGE step as ``--mode=bench`` (``configs/cringe.py``,
the preset and the ``config.bench`` shapes), times ``--steps`` steps, then
runs them again under ``jax.profiler`` and adds up the executed XLA ops of the
trace. Each op is placed by the name JAX gave the HLO it came from:

* phase: ``forward`` (under ``jvp``), ``backward`` (under ``transpose(jvp)``),
  ``update`` (everything else: the optimizer, gradient clipping, metrics);
* kind: ``matmul`` (a dot, or a library fusion that holds one), ``dropout
  rng`` (random bits for dropout masks), ``copy/transpose`` (fusions whose
  root is a copy or transpose: layout changes), ``elementwise`` (the rest).

Prints one JSON line per (phase, kind) with milliseconds per step and the op
count, then the ``--top`` slowest single ops, then a total line with the
median step time measured without the profiler. Op names and their fusion
are XLA's, so the table is for the backend it runs on; on a CPU, ops that
XLA runs asynchronously (some plain dots) show only their dispatch time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402

from bb3x_jax.modes import bench  # noqa: E402
from configs import cringe as cringe_config  # noqa: E402

TINY = dict(model="tiny", steps=1, batch=2, context=16, label=8)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\(", re.M)


def hlo_index(hlo_text: str) -> dict[str, dict[str, str]]:
    """Per instruction name: its opcode, op_name and, for a fusion, the fused computation's text."""
    computations = {}
    for block in re.split(r"\n(?=%|ENTRY )", hlo_text):
        computations[block.split(" ", 1)[0].lstrip("%")] = block
    index = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        calls = re.search(r"calls=%([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        index[m.group(1)] = {"opcode": m.group(2), "op_name": op_name.group(1) if op_name else "",
                             "body": computations.get(calls.group(1), "") if calls else ""}
    return index


def classify(name: str, info: dict[str, str]) -> tuple[str, str]:
    """(phase, kind) of one executed op (``info``: its ``hlo_index`` entry)."""
    op_name = info["op_name"]
    phase = "backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else "update"
    if info["opcode"] == "dot" or " dot(" in info["body"]:
        kind = "matmul"
    elif "_bernoulli" in op_name or "_uniform" in op_name or "threefry" in op_name:
        kind = "dropout rng"
    elif re.match(r"(copy|transpose)", name) or re.search(r"ROOT \S+ = \S+ (copy|transpose)\(", info["body"]):
        kind = "copy/transpose"
    else:
        kind = "elementwise"
    return phase, kind


def op_times(trace_dir: str) -> dict[str, float]:
    """Microseconds per XLA op name, summed over the trace's complete events."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals: dict[str, float] = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and "dur" in event:
            totals[event["name"]] += event["dur"]
    return totals


def tally(totals: dict[str, float], index: dict, runs: int, place) -> tuple[dict, list]:
    """({group: [ms per run, op count]}, [(ms per run, op, group)]) over the XLA ops of a trace;
    ``place(name, info)`` names an op's group (``classify``, say)."""
    groups: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0.0, 0])
    singles = []
    for name, micros in totals.items():
        if name not in index:  # runtime and Python events, not XLA ops
            continue
        ms, group = micros / 1e3 / runs, place(name, index[name])
        groups[group][0] += ms
        groups[group][1] += 1
        singles.append((ms, name, group))
    return groups, singles


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bench_small")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="the tiny model and shapes (a smoke run)")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    config = cringe_config.get_config()
    config.model.preset = args.model
    if args.tiny:
        config.bench.batch, config.bench.context, config.bench.label = args.batch, args.context, args.label
    b = config.bench
    with tempfile.TemporaryDirectory() as workdir:
        setup, _, batch, compiled, _ = bench.compiled_step(config, workdir)
        index = hlo_index(compiled.as_text())
        state, _, times = bench.timed_steps(compiled, setup.state, batch, setup.anchor, 2, args.steps)
        trace_dir = os.path.join(workdir, "trace")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, _ = compiled(state, batch, setup.anchor)
            jax.block_until_ready(state)
        totals = op_times(trace_dir)
    groups, singles = tally(totals, index, args.steps, classify)
    records = [{"phase": phase, "kind": kind, "ms_per_step": round(ms, 2), "ops": count}
               for (phase, kind), (ms, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])]
    records += [{"op": name, "ms_per_step": round(ms, 2), "phase_kind": "/".join(place),
                 "op_name": index[name]["op_name"][:120]} for ms, name, place in sorted(singles, reverse=True)[:args.top]]
    records.append({"model": args.model, "batch": b.batch, "context": b.context, "label": b.label,
                    "step_s_median": round(statistics.median(times), 4),
                    "profiled_ms_per_step": round(sum(ms for ms, _, _ in singles), 1), "backend": jax.default_backend()})
    for record in records:
        print(json.dumps(record))
    return records


if __name__ == "__main__":
    main()
