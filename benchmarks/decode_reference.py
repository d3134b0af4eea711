"""Decoding speed against transformers' ``generate`` on the same weights (a script, not a test).

    python benchmarks/decode_reference.py [--model bench_small] [--batch 8 --context 128 --new_tokens 32]
        [--beams 4 --runs 5 --threads 2 [1 ...]] [--scan_layers] [--tiny]

Builds the preset with random weights, exports it with the project's own
transformers exporter (``bb3x_jax.model.formats.hf.save_hf``) and loads the
directory back with ``from_pretrained``, so both frameworks decode the very
same float32 weights. Then, back to back in one process, it times greedy
search and beam search (``--beams``) for:

* bb3x-jax: ``bb3x_jax.decoding.compiled_search``, the jitted search behind
  ``decoding.generate`` and every generation of the project (one compiling run
  first);
* transformers: ``model.generate`` under ``torch.no_grad`` for each
  ``--threads`` count (one untimed run first).

Every row is a full-length random context without padding, and the end token
is banned until ``--new_tokens`` tokens (``min_len`` / ``min_new_tokens``), so
every row of every method generates exactly that many tokens. The runs of the
frameworks alternate, so a change in the machine's load hits both alike.

Prints one JSON line per (framework, method, threads) with the median seconds
per batch, new tokens/s and ``bb3x_jax_speedup`` (a transformers line: its
median over bb3x-jax's; a bb3x-jax line: against the first ``--threads``
count), then one line per method with the fraction of generated tokens that
agree between the two frameworks (greedy should agree fully in float32; near
ties can flip a beam).
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from bb3x_jax import decoding  # noqa: E402
from bb3x_jax.model import build  # noqa: E402
from bb3x_jax.model.config import PRESETS  # noqa: E402
from bb3x_jax.model.formats import hf  # noqa: E402

TINY = dict(model="tiny", batch=2, context=12, new_tokens=6, beams=2, runs=1)


def contexts(cfg, batch: int, length: int, seed: int) -> np.ndarray:
    """Full-length rows of random ids that avoid the special tokens."""
    low = max(cfg.pad_id, cfg.start_id, cfg.end_id) + 2
    return np.random.default_rng(seed).integers(low, cfg.vocab_size, (batch, length), dtype=np.int32)


def export_to_transformers(network, cfg):
    """transformers' model of ``network``'s weights, through the project's exporter and ``from_pretrained``."""
    import transformers

    with tempfile.TemporaryDirectory() as path:
        hf.save_hf(network, cfg, path)
        cls = (transformers.BlenderbotForConditionalGeneration if cfg.arch == "encoder_decoder"
               else transformers.OPTForCausalLM)
        return cls.from_pretrained(path).eval()


def jax_runner(network, context_ids: np.ndarray, settings: decoding.Settings):
    """A call that decodes the batch with bb3x-jax and returns the new tokens [B, new]."""
    graphdef, state = nnx.split(network)
    search = decoding.compiled_search(graphdef, settings)
    ids, key = jax.numpy.asarray(context_ids), jax.random.key(0)
    return lambda: np.asarray(search(state, ids, key)[0])


def torch_runner(model, context_ids: np.ndarray, new_tokens: int, beams: int):
    """A call that decodes the batch with transformers' ``generate`` and returns the new tokens [B, new]."""
    ids = torch.from_numpy(context_ids.astype(np.int64))
    mask = torch.ones_like(ids)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams, do_sample=False,
                    early_stopping=False, length_penalty=1.0, no_repeat_ngram_size=0)
    if model.config.is_encoder_decoder:
        settings.update(forced_eos_token_id=None, forced_bos_token_id=None)
    skip = 1 if model.config.is_encoder_decoder else ids.shape[1]  # the decoder start / the prompt

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, **settings)[:, skip:].numpy()

    return run


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(runners: dict, runs: int) -> dict:
    """Median seconds of each runner; runners take turns, after one untimed (compiling) call each."""
    for name, (fn, threads) in runners.items():
        torch.set_num_threads(threads or 1)
        fn()
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, (fn, threads) in runners.items():
            if threads:
                torch.set_num_threads(threads)
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Fraction of positions, and of whole rows, where the two generations hold the same token."""
    width = min(ours.shape[1], ref.shape[1])
    same = ours[:, :width] == ref[:, :width]
    return {"token_match": float(same.mean()), "rows_equal": int(same.all(axis=1).sum()), "rows": len(same)}


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def bench_method(network, model, context_ids, args, beams: int) -> list[dict]:
    """JSON records of one search method for bb3x-jax and each transformers thread count."""
    method = "beam" if beams > 1 else "greedy"
    settings = decoding.Settings(method=method, beam_size=beams, max_len=args.new_tokens, min_len=args.new_tokens)
    runners = {"bb3x-jax": (jax_runner(network, context_ids, settings), None)}
    for threads in args.threads:
        runners[f"transformers/{threads}"] = (torch_runner(model, context_ids, args.new_tokens, beams), threads)
    medians = measure(runners, args.runs)
    torch.set_num_threads(args.threads[0])
    check = agreement(runners["bb3x-jax"][0](), runners[f"transformers/{args.threads[0]}"][0]())
    new = len(context_ids) * args.new_tokens
    jax_s = medians["bb3x-jax"]
    common = dict(method=method, beams=beams, batch=len(context_ids), context=context_ids.shape[1],
                  new_tokens=args.new_tokens, model=args.model)
    records = []
    for name, seconds in medians.items():
        framework, _, threads = name.partition("/")
        speedup = (medians[f"transformers/{args.threads[0]}"] if framework == "bb3x-jax" else seconds) / jax_s
        records.append(dict(framework=framework, threads=int(threads) if threads else None, **common,
                            s_median=significant(seconds), new_tokens_per_s=significant(new / seconds),
                            bb3x_jax_speedup=significant(speedup, 3)))
    records.append(dict(check="agreement", reference_threads=args.threads[0], **common, **check))
    return records


def run(args) -> list[dict]:
    cfg = PRESETS[args.model].replace(scan_layers=args.scan_layers)
    network = build.build(cfg, seed=args.seed)
    model = export_to_transformers(network, cfg)
    context_ids = contexts(cfg, args.batch, args.context, args.seed)
    records = []
    for beams in (1, args.beams):
        for record in bench_method(network, model, context_ids, args, beams):
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench_small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per framework and method")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch thread counts; the first is "
                        "the reference of bb3x-jax's speedup and of the agreement check")
    parser.add_argument("--scan_layers", action="store_true", help="bb3x-jax's scanned layer stack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run on the tiny preset (a smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    if args.beams < 2 or args.runs < 1 or args.new_tokens < 1:
        parser.error("--beams must be >= 2, --runs and --new_tokens >= 1")
    return args


def main(argv=None) -> list[dict]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
