"""Turning the release into one stream's examples, on all cores, in a fixed order.

Why a module of its own: the TFDS builder and the ``stats`` command must see the
same examples and the same skip counts, and the real release (millions of
examples) only prepares in minutes when JSON parsing and example building run
in worker processes while the caller (TFDS's writer) serialises. Worker results
come back in input order, so the output is identical for any worker count.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from bb3x_jax.data import parallel, records, release, schema, streams
from bb3x_jax.data.feedback import FeedbackPolicy

_LINES_PER_TASK = 64


@dataclasses.dataclass
class SplitReport:
    """Everything a pass over one split read, skipped, dropped and labelled."""

    read: release.ReadReport = dataclasses.field(default_factory=release.ReadReport)
    dropped_labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    feedback: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    feedback_source: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: int = 0
    conversations_with_examples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            **{name: self.feedback.get(name, 0) for name in ("positive", "negative", "unlabeled")},
            "conversations": self.read.conversations_used,
            "conversations_with_examples": self.conversations_with_examples,
            **self.read.to_dict(),
            "dropped_labels": dict(sorted(self.dropped_labels.items())),
            "feedback_source": dict(sorted(self.feedback_source.items())),
        }


def example_key(chunk: int, lineno: int, message_index: int) -> int:
    """A unique integer key that sorts like (chunk, line, message)."""
    return (chunk * 10**9 + lineno) * 10**5 + message_index


# Worker state: set once per process by the initializer instead of pickled per task.
_WORKER: dict[str, Any] = {}


def _init_worker(stream: str, policy: FeedbackPolicy, skip_malformed: bool, serialized: bool = False) -> None:
    _WORKER.update(
        spec=streams.stream_spec(stream), policy=policy, skip_malformed=skip_malformed, serialized=serialized
    )


def _process_lines(lines: Sequence[tuple[int, str, int, bytes]]):
    """Parses and expands a batch of raw lines; returns examples plus count deltas."""
    spec, policy, skip = _WORKER["spec"], _WORKER["policy"], _WORKER["skip_malformed"]
    serialize = records.serialize if _WORKER["serialized"] else None
    read = release.ReadReport()
    dropped: collections.Counter = collections.Counter()
    out = []
    for chunk, name, lineno, raw in lines:
        convo = release.parse_counted(raw, f"{name}:{lineno}", read, skip)
        if convo is None:
            continue
        for example in streams.examples_from_conversation(convo, spec, policy, dropped):
            key = example_key(chunk, lineno, example["message_index"])
            payload = serialize(example) if serialize else example
            out.append((key, payload, example["feedback"], example["feedback_source"]))
    return out, read, dropped


def _batched(iterable, size):
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def iter_examples(
    location: release.ReleaseLocation,
    split: str,
    stream: str,
    policy: FeedbackPolicy,
    report: SplitReport,
    *,
    skip_malformed: bool = False,
    num_workers: int = 0,
    tarball_sha256: str | None = schema.TARBALL_SHA256,
    serialized: bool = False,
) -> Iterator[tuple[int, dict[str, Any] | bytes]]:
    """Yields (key, example) of ``stream`` for ``split``, filling ``report`` as it goes.

    ``serialized=True`` yields the stored record bytes (``records.serialize``)
    instead of the example dict, made in the workers.

    ``num_workers=0`` runs inline (small releases, tests); otherwise a spawn
    pool parses while the caller consumes. The order and the counts do not
    depend on ``num_workers``.
    """
    streams.stream_spec(stream)  # fail early on a bad name
    lines = release.iter_chunk_lines(
        location, schema.SPLIT_CHUNKS[split], tarball_sha256=tarball_sha256, report=report.read
    )
    batches = _batched(lines, _LINES_PER_TASK)
    results = parallel.ordered_map(
        _process_lines,
        batches,
        workers=num_workers,
        initializer=_init_worker,
        initargs=(stream, policy, skip_malformed, serialized),
    )
    yield from _consume(results, report)


def _consume(results, report: SplitReport):
    for examples, read, dropped in results:
        report.read.merge(read)
        report.dropped_labels.update(dropped)
        last_chat = None
        for key, payload, feedback, source in examples:
            report.examples += 1
            report.feedback[schema.FEEDBACK_NAMES[feedback]] += 1
            report.feedback_source[source] += 1
            if key // 10**5 != last_chat:
                report.conversations_with_examples += 1
                last_chat = key // 10**5
            yield key, payload
