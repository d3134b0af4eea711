"""The six example streams of the reference loader (ParlAI ``projects/bb3x/tasks``).

For every message sent by the stream's *label agent*, one example: the context
is every previous message's text joined with ``"\\n"``, the label is that
message's text. A label message with no previous message is skipped. The
``filter_adversarial_humans_*`` streams drop every example of a conversation in
which any human message is unsafe; the ``crowdworkers_*`` streams keep only
label messages whose ``mturk`` key is present and not null (``{}`` counts).
The semantics, including what is counted as dropped, match the reference
exactly; every drop is counted by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Iterator

from bb3x_jax.data import release, schema
from bb3x_jax.data.feedback import FeedbackPolicy


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    name: str
    label_sender: str  # schema.BOT | schema.HUMAN
    filter_adversarial: bool = False
    crowdworkers_only: bool = False


STREAM_SPECS: dict[str, StreamSpec] = {
    "bot": StreamSpec("bot", schema.BOT),
    "human": StreamSpec("human", schema.HUMAN),
    "filter_adversarial_humans_bot": StreamSpec("filter_adversarial_humans_bot", schema.BOT, filter_adversarial=True),
    "filter_adversarial_humans_human": StreamSpec(
        "filter_adversarial_humans_human", schema.HUMAN, filter_adversarial=True
    ),
    "crowdworkers_bot": StreamSpec("crowdworkers_bot", schema.BOT, crowdworkers_only=True),
    "crowdworkers_human": StreamSpec("crowdworkers_human", schema.HUMAN, crowdworkers_only=True),
}
assert tuple(STREAM_SPECS) == schema.STREAMS


def stream_spec(name: str) -> StreamSpec:
    try:
        return STREAM_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown stream {name!r}; expected one of {', '.join(schema.STREAMS)}") from None


def is_adversarial(history: list[dict[str, Any]]) -> bool:
    """Any human message judged unsafe by either safety check (reference rule)."""
    return any(m["sender"] == schema.HUMAN and release.is_safe(m) is False for m in history)


def examples_from_conversation(
    convo: dict[str, Any],
    spec: StreamSpec,
    policy: FeedbackPolicy,
    dropped: collections.Counter | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields the stream's examples of one (validated) conversation.

    ``dropped`` counts label-agent messages that gave no example, by reason:
    ``no_context`` (first message), ``adversarial_conversation``,
    ``not_crowdworker_annotated``.
    """
    history = convo["message_history"]
    adversarial = is_adversarial(history)
    texts = [m["text"] for m in history]
    for index, message in enumerate(history):
        if message["sender"] != spec.label_sender:
            continue
        # The reference applies its filter before the no-context check.
        reason = None
        if spec.filter_adversarial and adversarial:
            reason = "adversarial_conversation"
        elif spec.crowdworkers_only and message.get("mturk") is None:
            reason = "not_crowdworker_annotated"
        elif index == 0:
            reason = "no_context"
        if reason is not None:
            if dropped is not None:
                dropped[reason] += 1
            continue
        yield make_example(convo, index, adversarial, "\n".join(texts[:index]), policy)


def make_example(
    convo: dict[str, Any], index: int, adversarial: bool, context: str, policy: FeedbackPolicy
) -> dict[str, Any]:
    """One prepared example (schema.EXAMPLE_KEYS) with plain Python values."""
    message = convo["message_history"][index]
    feedback, source = policy.classify(message)
    return {
        "context": context,
        "label": message["text"],
        "feedback": feedback,
        "feedback_source": source,
        "chat_id": convo["chat_id"],
        "user_pseudo_id": convo["user_pseudo_id"],
        "message_index": index,
        "adversarial_human": adversarial,
        "label_info": json.dumps(message, ensure_ascii=False, sort_keys=True),
    }


def label_fields(label_info: str | bytes) -> dict[str, Any]:
    """Typed view of a prepared example's label message (likes, safety, reward, mturk)."""
    message = json.loads(label_info)
    safe = release.is_safe(message)
    reward_class, reward_probability = release.parse_reward(message.get("reward"))
    return {
        "sender": message.get("sender"),
        "is_liked": bool(message.get("isLiked")),
        "is_disliked": bool(message.get("isDisliked")),
        "dislike_type": message.get("dislike_type") or "",
        "safe": safe,
        "reward_class": reward_class,
        "reward_probability": reward_probability,
        "mturk_annotated": message.get("mturk") is not None,
        "mturk": message.get("mturk"),
        "canned": bool(message.get("isSafetyControlledResponse") or message.get("from_model_crash")),
    }
