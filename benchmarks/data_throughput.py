"""Benchmark of the data path (a script, not a test): prepare and pipeline throughput.

    python benchmarks/data_throughput.py [--conversations 50000] [--workdir /tmp/bb3x_bench]

1. Synthesizes a release (cached in the workdir) of N conversations.
2. Prepares the TFDS dataset of the `bot` stream from scratch and reports
   conversations/s and examples/s (goal: the real release, 261k conversations,
   in under 5 minutes on 2 cores -> about 870 conversations/s).
3. Trains (once) the sentencepiece tokenizer and runs the input pipeline over
   the prepared train split, reporting tokenized examples/s (goal: >= 20,000).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from bb3x_jax.data import builder, dataset, extract, pipeline, synthetic
from bb3x_jax.data import tokenizer as tokenizer_lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=50_000)
    parser.add_argument("--workdir", default="/tmp/bb3x_bench")
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
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
    workers = extract.default_workers() if args.workers < 0 else args.workers
    start = time.perf_counter()
    built = builder.prepare(release_dir, "bot", data_dir=data_dir, num_workers=workers)
    prepare_s = time.perf_counter() - start
    examples = sum(builder.num_examples(built, s) for s in ("train", "valid", "test"))
    conversations = sum(builder.split_report(built, s)["conversations_read"] for s in ("train", "valid", "test"))

    model = os.path.join(args.workdir, "bench.model")
    source = built.as_data_source("train")
    start = time.perf_counter()
    tok = tokenizer_lib.train_sentencepiece(
        dataset.tokenizer_texts(source, 200_000), model, vocab_size=8000, extra_options={"hard_vocab_limit": False}
    )
    tokenizer_s = time.perf_counter() - start
    config = pipeline.PipelineConfig(global_batch_size=args.batch_size, text_truncate=128, label_truncate=32, prefetch=0)
    throughput = pipeline.measure_throughput(source, tok, config, args.batches)

    print(json.dumps({
        "conversations": conversations,
        "release_mb": round(release_bytes / 2**20, 1),
        "prepare_workers": workers,
        "prepare_s": round(prepare_s, 1),
        "prepare_conversations_per_s": round(conversations / prepare_s, 1),
        "prepare_examples_per_s": round(examples / prepare_s, 1),
        "examples": examples,
        "projected_real_release_prepare_min": round(261_000 / (conversations / prepare_s) / 60, 1),
        "tokenizer_train_s": round(tokenizer_s, 1),
        "tokenizer_vocab": tok.vocab_size,
        "pipeline": throughput,
    }))


if __name__ == "__main__":
    main()
