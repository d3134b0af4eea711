"""Benchmark of the data path (a script, not a test): prepare and pipeline throughput.

    python benchmarks/data_throughput.py [--conversations 50000] [--workdir /tmp/bb3x_bench]

1. Synthesizes a release (cached in the workdir) of N conversations.
2. Prepares the TFDS dataset of the `bot` stream from scratch and reports
   conversations/s and examples/s (goal: the real release, 261k conversations,
   in under 5 minutes on 2 cores -> about 870 conversations/s).
3. Trains (once) the sentencepiece tokenizer and runs the input pipeline over
   the prepared train split, reporting tokenized examples/s (goal: >= 20,000),
   and over a token cache of that split (``measure_throughput``: the pipeline
   alone, read + tokenize + pad, numpy batches, no device).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from bb3x_jax.data import builder, parallel, pipeline, records, synthetic, token_cache
from bb3x_jax.data.framing import Framing
from bb3x_jax.data.tokenizers import base as tokenizer_lib
from bb3x_jax.train import inputs as dataset


def measure_throughput(source, tokenizer: tokenizer_lib.Tokenizer, config: pipeline.PipelineConfig, num_batches: int,
                       *, warmup_batches: int = 1, **iterator_kwargs) -> dict:
    """Examples/s of the pipeline alone (read + tokenize + pad) over ``num_batches``
    (after ``warmup_batches``), single process."""
    kwargs = {"process_index": 0, "process_count": 1, **iterator_kwargs}
    it = pipeline.BatchIterator(source, tokenizer, config, **kwargs)
    try:
        for _ in range(warmup_batches):
            next(it)
        examples = tokens = batches = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in it:
            examples += int(batch["valid"].sum())
            tokens += int((batch["context_ids"] != 0).sum() + (batch["label_ids"] != 0).sum())
            batches += 1
            if batches >= num_batches:
                break
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    finally:
        it.close()
    return {
        "examples_per_s": examples / seconds if seconds > 0 else float("inf"),
        "tokens_per_s": tokens / seconds if seconds > 0 else float("inf"),
        "batches_per_s": batches / seconds if seconds > 0 else float("inf"),
        "examples": examples,
        "batches": batches,
        "seconds": seconds,
        # CPU time of this process (all its threads, not worker processes): on a
        # shared, busy host examples per CPU-second is the stabler number.
        "cpu_seconds": cpu_seconds,
        "examples_per_cpu_s": examples / cpu_seconds if cpu_seconds > 0 else float("inf"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=50_000)
    parser.add_argument("--workdir", default="/tmp/bb3x_bench")
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args()
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()

    release_dir = os.path.join(args.workdir, f"release-{args.conversations}")
    if not os.path.exists(os.path.join(release_dir, "DONE")):
        start = time.perf_counter()
        synthetic.synthesize(release_dir, args.conversations, seed=0)
        open(os.path.join(release_dir, "DONE"), "w").close()
        print(f"synthesized {args.conversations} conversations in {time.perf_counter() - start:.1f}s", flush=True)
    release_bytes = sum(os.path.getsize(os.path.join(release_dir, f)) for f in os.listdir(release_dir) if f.endswith(".jsonl"))

    data_dir = os.path.join(args.workdir, "tfds")
    shutil.rmtree(data_dir, ignore_errors=True)
    workers = parallel.resolve_workers(args.workers)
    start = time.perf_counter()
    built = builder.prepare(release_dir, "bot", data_dir=data_dir, num_workers=workers)
    prepare_s = time.perf_counter() - start
    examples = sum(builder.num_examples(built, s) for s in ("train", "valid", "test"))
    conversations = sum(builder.split_report(built, s)["conversations_read"] for s in ("train", "valid", "test"))

    model = os.path.join(args.workdir, "bench.model")
    source = dataset.source(built, "train")
    start = time.perf_counter()
    tok = tokenizer_lib.train_sentencepiece(
        records.tokenizer_texts(source, 200_000), model, vocab_size=8000, extra_options={"hard_vocab_limit": False}
    )
    tokenizer_s = time.perf_counter() - start
    results = {}
    for workers in (0, 2):  # tokenizing on the fly, in-process and in 2 worker processes
        config = pipeline.PipelineConfig(global_batch_size=args.batch_size, prefetch=2, workers=workers)
        results[f"on_the_fly_workers{workers}"] = measure_throughput(source, tok, config, args.batches, warmup_batches=4)
    cache_path = token_cache.cache_dir(args.workdir, "bench-train", tok, Framing(128, 32))
    shutil.rmtree(cache_path, ignore_errors=True)
    start = time.perf_counter()
    cached = token_cache.build(source, tok, Framing(128, 32), cache_path, workers=workers)
    cache_s = time.perf_counter() - start
    config = pipeline.PipelineConfig(global_batch_size=args.batch_size, prefetch=2)
    results["token_cache"] = measure_throughput(cached, tok, config, args.batches, warmup_batches=4)

    print(json.dumps({
        "conversations": conversations,
        "release_mb": round(release_bytes / 2**20, 1),
        "prepare_workers": workers,
        "prepare_s": round(prepare_s, 1),
        "prepare_conversations_per_s": round(conversations / prepare_s, 1),
        "prepare_examples_per_s": round(examples / prepare_s, 1),
        "examples": examples,
        "projected_real_release_prepare_min": round(261_000 / (conversations / prepare_s) / 60, 1),
        # The real release's bot stream has 2,851,540 examples in all splits (reference counts).
        "projected_real_bot_stream_prepare_min": round(2_851_540 / (examples / prepare_s) / 60, 1),
        "tokenizer_train_s": round(tokenizer_s, 1),
        "tokenizer_vocab": tok.vocab_size,
        "token_cache_build_s": round(cache_s, 1),
        "token_cache_build_examples_per_s": round(len(cached) / cache_s, 1),
        "pipeline_examples_per_s": {k: round(v["examples_per_s"], 1) for k, v in results.items()},
        "pipeline": results,
    }))


if __name__ == "__main__":
    main()
