"""Command line for the data path: synthesize, prepare, stats, display, tokenizer.

    python -m bb3x_jax.data synthesize --out DIR --conversations N --seed S [--tarball]
    python -m bb3x_jax.data stats --manual_dir DIR --stream bot --split train
    python -m bb3x_jax.data display --manual_dir DIR --stream bot -n 5
    python -m bb3x_jax.data prepare --manual_dir DIR --stream bot --data_dir DIR
    python -m bb3x_jax.data train_tokenizer --manual_dir DIR --data_dir DIR --out FILE
    python -m bb3x_jax.data encode --tokenizer PATH --input pairs.jsonl [--text_truncate N --label_truncate N]

``stats`` prints exactly one JSON object on stdout (logs go to stderr), so it
can be piped into ``jq``. Every release command works on any release folder or
tarball. ``encode`` shows what a model sees: for each ``{"context", "label"}``
line, the encoder input and decoder target the train step gets under that
tokenizer and its framing (``bb3x_jax.data.framing``).

A bad release (a malformed line, an unreadable chunk file or tarball) ends a
command with one line on stderr naming the file and line, status 2, with or
without worker processes; a worker process that dies ends it with one line,
status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time

import tensorflow_datasets as tfds

from bb3x_jax.data import builder, extract, parallel, records, release, schema, streams, synthetic
from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data.feedback import DEFAULT_POLICY, FeedbackPolicy
from bb3x_jax.data.tokenizers import base as tokenizer
from bb3x_jax.data.tokenizers import files as tokenizer_files


def _add_release_args(parser: argparse.ArgumentParser, split: bool = True) -> None:
    parser.add_argument("--manual_dir", required=True, help="chunk folder, folder holding the tarball, or the tarball")
    parser.add_argument("--stream", default="bot", choices=schema.STREAMS)
    if split:
        parser.add_argument("--split", default="train", choices=schema.SPLITS)
    parser.add_argument("--skip_malformed", action="store_true", help="skip (and count) bad conversations")
    parser.add_argument(
        "--sha256",
        default=schema.TARBALL_SHA256,
        help="expected sha256 of a tarball ('none' to skip the check for a tarball you made)",
    )
    parser.add_argument("--policy", default="", help="feedback policy overrides as JSON, e.g. '{\"order\": [\"like\"]}'")
    parser.add_argument("--workers", type=int, default=-1, help="parser processes (-1: auto, 0: inline)")


def _policy(args) -> FeedbackPolicy:
    if not args.policy:
        return DEFAULT_POLICY
    return FeedbackPolicy.from_dict({**DEFAULT_POLICY.to_dict(), **json.loads(args.policy)})


def _sha(args) -> str | None:
    return None if str(args.sha256).lower() == "none" else args.sha256


def _workers(args) -> int:
    return parallel.resolve_workers(args.workers)


def cmd_synthesize(args) -> None:
    start = time.perf_counter()
    summary = synthetic.synthesize(args.out, args.conversations, args.seed)
    if args.tarball:
        path = os.path.join(args.out, schema.TARBALL_NAME)
        summary["tarball"] = path
        summary["tarball_sha256"] = release.write_tarball(args.out, path)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(summary, indent=1))


def compute_stats(manual_dir, stream, split, *, policy, skip_malformed, sha256, workers) -> dict:
    """One split's statistics straight from the release (no prepared data needed)."""
    location = release.locate_release(manual_dir)
    report = extract.SplitReport()
    start = time.perf_counter()
    for _ in extract.iter_examples(
        location, split, stream, policy, report, skip_malformed=skip_malformed, num_workers=workers, tarball_sha256=sha256
    ):
        pass
    out = {"stream": stream, "split": split, "release": location.describe(), **report.to_dict()}
    out["reference_examples"] = schema.REFERENCE_COUNTS[stream][schema.SPLITS.index(split)]
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def cmd_stats(args) -> None:
    stats = compute_stats(
        args.manual_dir,
        args.stream,
        args.split,
        policy=_policy(args),
        skip_malformed=args.skip_malformed,
        sha256=_sha(args),
        workers=_workers(args),
    )
    print(json.dumps(stats))


def format_example(example: dict, max_turns: int = 6, width: int = 100) -> str:
    """A readable block: ids, feedback, the last context turns and the label."""
    fields = streams.label_fields(example["label_info"])
    turns = example["context"].split("\n")
    shown = turns[-max_turns:]
    lines = [
        f"=== chat {example['chat_id']} message {example['message_index']} "
        f"(user {example['user_pseudo_id']}{', adversarial human' if example['adversarial_human'] else ''})",
        f"feedback: {schema.FEEDBACK_NAMES[example['feedback']]} (rule: {example['feedback_source']}); "
        f"liked={fields['is_liked']} disliked={fields['is_disliked']}"
        + (f" ({fields['dislike_type']})" if fields["dislike_type"] else "")
        + f" safe={fields['safe']} reward={fields['reward_class'] or '-'}"
        + (f" {fields['reward_probability']:.2f}" if fields["reward_class"] else "")
        + (f" mturk={json.dumps(fields['mturk'])}" if fields["mturk_annotated"] else ""),
    ]
    if len(turns) > len(shown):
        lines.append(f"  ... {len(turns) - len(shown)} earlier turn(s)")
    for turn in shown:
        lines.append(textwrap.shorten("  | " + turn.replace("\r", "\\r").replace("\u2028", "\\u2028"), width))
    lines.append(textwrap.shorten(f"  > {fields['sender']}: " + example["label"], width))
    return "\n".join(lines)


def cmd_display(args) -> None:
    location = release.locate_release(args.manual_dir)
    report = extract.SplitReport()
    shown = 0
    for _, example in extract.iter_examples(
        location,
        args.split,
        args.stream,
        _policy(args),
        report,
        skip_malformed=args.skip_malformed,
        num_workers=0,
        tarball_sha256=_sha(args),
    ):
        print(format_example(example))
        shown += 1
        if shown >= args.n:
            break
    print(f"--- {shown} example(s) of stream {args.stream}, split {args.split}; "
          f"{report.read.skipped} malformed conversation(s) skipped so far", file=sys.stderr)


def _prepare_quietly(args):
    """Prepares the dataset with TFDS's own messages sent to stderr (stdout carries our JSON)."""
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(sys.stderr):
        return builder.prepare(
            args.manual_dir,
            args.stream,
            data_dir=args.data_dir,
            policy=_policy(args),
            skip_malformed=args.skip_malformed,
            tarball_sha256=_sha(args),
            num_workers=_workers(args),
        )


def cmd_prepare(args) -> None:
    built = _prepare_quietly(args)
    out = {"data_dir": str(built.data_dir), "splits": {s: builder.num_examples(built, s) for s in schema.SPLITS}}
    out["reports"] = {s: builder.split_report(built, s) for s in schema.SPLITS}
    print(json.dumps(out, indent=1))


def cmd_train_tokenizer(args) -> None:
    built = _prepare_quietly(args)
    texts = records.tokenizer_texts(records.TrainingRecords.of(built, "train"), args.max_sentences)
    tok = tokenizer.train_sentencepiece(
        texts, args.out, vocab_size=args.vocab_size, seed=args.seed, extra_options={"hard_vocab_limit": False}
    )
    print(json.dumps({"model": args.out, "vocab_size": tok.vocab_size, "prepared_dir": str(built.data_dir)}))


def cmd_encode(args) -> None:
    try:
        spec = tokenizer_files.resolve(args.kind, args.tokenizer, bpe_dir=args.bpe_dir, trust_pickle=args.trust_pickle)
        tok = tokenizer_files.load(spec)
        text, label = tokenizer_files.recorded_truncation(spec)  # else configs/cringe.py's defaults
        framing = framing_lib.for_tokenizer(spec, args.text_truncate or text or 128, args.label_truncate or label or 32,
                                            context=args.context_framing, label=args.label_framing)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    pairs = []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("context"), str) \
                    or not isinstance(record.get("label"), str):
                raise ValueError('expected {"context": str, "label": str}')
        except ValueError as error:
            print(f"error: {args.input}:{number}: {error}", file=sys.stderr)
            sys.exit(2)
        pairs.append(record)
    for start in range(0, len(pairs), 256):
        chunk = pairs[start : start + 256]
        rows = framing_lib.frame_pairs([p["context"] for p in chunk], [p["label"] for p in chunk], tok, framing)
        for context_ids, label_ids in rows:
            print(json.dumps({"context_ids": context_ids, "label_ids": label_ids}))
    print(json.dumps({"framing": framing.to_dict(), "tokenizer": spec.kind, "pairs": len(pairs)}), file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bb3x_jax.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthesize", help="write a synthetic release in the exact format")
    p.add_argument("--out", required=True)
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tarball", action="store_true", help=f"also pack it as {schema.TARBALL_NAME}")
    p.set_defaults(fn=cmd_synthesize)

    p = sub.add_parser("stats", help="print one JSON object of a split's statistics")
    _add_release_args(p)
    p.set_defaults(fn=cmd_stats)

    p = sub.add_parser("display", help="print examples readably")
    _add_release_args(p)
    p.add_argument("-n", type=int, default=5)
    p.set_defaults(fn=cmd_display)

    p = sub.add_parser("prepare", help="prepare the TFDS dataset (array_record)")
    _add_release_args(p, split=False)
    p.add_argument("--data_dir", required=True)
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("train_tokenizer", help="train the sentencepiece model on the prepared train split")
    _add_release_args(p, split=False)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab_size", type=int, default=8000, help="upper bound (small corpora get fewer pieces)")
    p.add_argument("--max_sentences", type=int, default=200_000, help="first N examples of the train split")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_train_tokenizer)

    p = sub.add_parser("encode", help="print the encoder input and decoder target of context/label pairs")
    p.add_argument("--tokenizer", required=True, help="a sentencepiece model, a ParlAI model file, a transformers "
                   "or metaseq checkpoint, or a workdir of this project")
    p.add_argument("--kind", default="checkpoint", choices=("checkpoint", "sentencepiece", "parlai", "hf", "metaseq"),
                   help="what --tokenizer is (checkpoint: told from the path)")
    p.add_argument("--input", default="-", help='JSONL of {"context": str, "label": str} (-: stdin)')
    p.add_argument("--bpe_dir", default="", help="GPT-2's BPE files when not beside the checkpoint")
    p.add_argument("--text_truncate", type=int, default=0, help="0: what the checkpoint records, else 128")
    p.add_argument("--label_truncate", type=int, default=0, help="0: what the checkpoint records, else 32")
    p.add_argument("--context_framing", default="auto", help="auto | plain | bart | bb3_opt_prompt")
    p.add_argument("--label_framing", default="auto", help="auto | end_kept | parlai")
    p.add_argument("--trust_pickle", action="store_true", help="peek into a metaseq file with the full unpickler "
                   "(can run code from it: only for files you trust)")
    p.set_defaults(fn=cmd_encode)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except release.ReleaseError as error:  # bad input: one line naming the file (and line)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except parallel.WorkerDied as error:  # not the input's fault (killed, out of memory): one line, status 1
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
