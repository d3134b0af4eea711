"""Training examples from a deployment folder's rated bot messages (``iterate.deployment``).

Why: people who chat with the newest model and rate its replies produce what
the generate and judge stages of ``--mode=iterate`` make, the current model's
own responses labelled good or bad, so the chat server's folder (the release's
format, ``release_data_00.jsonl`` .. ``release_data_99.jsonl``) stands in for
both. Examples are made as the reference loader makes the ``bot`` stream's
(``streams``): context = every previous message's text joined with ``"\\n"``,
label = the bot message's text, class from the feedback policy. Only the train
chunks are trained on (the test and valid chunks stay held out, as in the
release), and every bot message that gives no example is counted by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from typing import Any

from bb3x_jax.data import release, schema, streams
from bb3x_jax.data.feedback import FeedbackPolicy
from bb3x_jax.errors import ConfigError

KEY = "iterate.deployment"
LABELS = "deployment feedback"  # recorded instead of a judge's name
_TRAIN_CHUNKS = frozenset(schema.SPLIT_CHUNKS["train"])
_DROPPED_FIELDS = ("label_info",)  # the whole message: the split keeps what training and audit need


@dataclasses.dataclass
class Feedback:
    """A deployment folder read: its examples (rated train-chunk bot messages) and what was left out."""

    folder: str
    fingerprint: str
    examples: list[dict[str, Any]]
    counts: dict[str, int]


def fingerprint(location: release.ReleaseLocation) -> str:
    """A hash of the chunk files' contents: the same feedback copied or rewritten unchanged keeps it,
    any changed line changes it, so one folder's feedback is trained on once."""
    digest = hashlib.sha256()
    if location.kind == "tarball":
        digest.update(release.sha256_file(location.path).encode())
    for chunk, path in location.chunk_files:
        digest.update(f"{chunk}:{release.sha256_file(path)};".encode())
    return digest.hexdigest()[:16]


def locate(folder: str) -> release.ReleaseLocation:
    """The folder's chunk files; a missing folder or one without chunk files names the key."""
    try:
        return release.locate_release(os.path.expanduser(folder))
    except release.ReleaseError as error:
        raise ConfigError(KEY, f"{folder} is not a deployment folder: {error.detail}") from None


def read(folder: str, policy: FeedbackPolicy, *, skip_malformed: bool = False) -> Feedback:
    """The examples of ``folder``'s rated train-chunk bot messages; fails naming the key and the
    folder when it cannot be read or holds no rated train message."""
    location = locate(folder)
    report = release.ReadReport()
    counts: collections.Counter = collections.Counter()
    examples = []
    try:
        for chunk, _, convo in release.iter_conversations(location, range(schema.NUM_CHUNKS), report,
                                                          skip_malformed=skip_malformed, tarball_sha256=None):
            examples.extend(_conversation_examples(convo, chunk, policy, counts))
        digest = fingerprint(location)
    except (release.ReleaseError, OSError) as error:
        raise ConfigError(KEY, f"{folder}: {error}") from None
    summary = {"conversations": report.conversations_read, "rated_positive": counts["positive"],
               "rated_negative": counts["negative"], "unlabeled_skipped": counts["unlabeled"],
               "held_out_skipped": counts["held_out"], "no_context_skipped": counts["no_context"],
               "malformed_skipped": report.skipped, "empty_chunk_files": len(report.empty_chunk_files)}
    if not examples:
        raise ConfigError(KEY, f"{folder} has no rated bot message in its train chunks "
                               f"({_chunk_range()}): {summary}")
    return Feedback(os.path.abspath(os.path.expanduser(folder)), digest, examples, summary)


def _conversation_examples(convo: dict[str, Any], chunk: int, policy: FeedbackPolicy,
                           counts: collections.Counter) -> list[dict[str, Any]]:
    """The rated examples of one conversation; every other bot message counted in ``counts``."""
    made = list(streams.examples_from_conversation(convo, streams.stream_spec("bot"), policy, counts))
    if chunk not in _TRAIN_CHUNKS:
        counts["held_out"] += len(made)
        return []
    kept = []
    for example in made:
        counts[schema.FEEDBACK_NAMES[example["feedback"]]] += 1
        if example["feedback"] != schema.UNLABELED:
            kept.append({k: v for k, v in example.items() if k not in _DROPPED_FIELDS})
    return kept


def _chunk_range() -> str:
    chunks = sorted(_TRAIN_CHUNKS)
    return f"{schema.CHUNK_TEMPLATE.format(chunks[0])} .. {schema.CHUNK_TEMPLATE.format(chunks[-1])}"
