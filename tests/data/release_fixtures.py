"""Hand-written conversations whose per-stream example counts are worked out by hand.

Conversation A (chunk 6, train), standard, reference spellings:
    H0, B1 (liked), H2, B3 (disliked: off_topic), H4
    bot: B1, B3 -> 2          human: H2, H4 -> 2 (H0 has no context)
Conversation B (chunk 0, test), adversarial (H1 fails string_matcher), starts with the bot:
    B0, H1 (unsafe), B2 (canned), H3, B4 (mturk {}), H5 (mturk null)
    bot: B2, B4 -> 2 (B0 has no context)    human: H1, H3, H5 -> 3
    filter_adversarial_*: 0             crowdworkers_bot: B4 -> 1 ({} counts)
    crowdworkers_human: 0 (null does not count)
Conversation C (chunk 50, train), the data card's "Chatbot"/"Human" spellings:
    Human0, Chatbot1 (mturk good), Human2 (mturk good), Chatbot3 (disliked + liked)
    bot: 2, human: 1 (Human2); crowdworkers_bot: 1, crowdworkers_human: 1
Conversation D (chunk 3, valid): a lone human message -> no example in any stream.
"""

from __future__ import annotations

import json
import os

OK = {"duo_safety": "__ok__", "string_matcher": "__ok__"}
UNSAFE = {"duo_safety": "__ok__", "string_matcher": "__notok__"}


def human(text, safety=OK, **extra):
    return {"text": text, "sender": "human", "safety": dict(safety), "human_message_id": "h-" + text[:4], **extra}


def bot(text, **extra):
    base = {
        "text": text,
        "sender": "bot",
        "safety": dict(OK),
        "bot_message_id": "b-" + text[:4],
        "isLiked": False,
        "isDisliked": False,
        "reward": "Predicted class: __ok__ with probability: 0.91",
    }
    base.update(extra)
    return base


CONVO_A = {
    "user_pseudo_id": "user-a",
    "chat_id": "chat-a",
    "message_history": [
        human("hello there\u2028friend"),
        bot("hi! how are you?\r", isLiked=True),
        human("I like cooking pasta"),
        bot("the moon is made of rock", isDisliked=True, dislike_type="off_topic"),
        human("that is off topic"),
    ],
}
CONVO_B = {
    "user_pseudo_id": "user-b",
    "chat_id": "chat-b",
    "message_history": [
        bot("welcome! what shall we talk about?"),
        human("you are a flarnhead", safety=UNSAFE),
        bot(
            "Hey do you want to talk about something else?",
            isSafetyControlledResponse=True,
            previous_interaction_failure="unsafe_Human",
            isDisliked=True,
            dislike_type="disagree_sensitive",
        ),
        human("fine, music then"),
        bot("I love jazz", mturk={}),
        human("me too", mturk=None),
    ],
}
CONVO_C = {
    "user_pseudo_id": "user-c",
    "chat_id": "chat-c",
    "message_history": [
        {"text": "any book tips?", "sender": "Human", "safety": dict(OK)},
        {
            "text": "try Dune",
            "sender": "Chatbot",
            "safety": dict(OK),
            "mturk": {"good": 1, "off_topic": 0},
        },
        {"text": "thanks", "sender": "Human", "safety": dict(OK), "mturk": {"good": 1}},
        {"text": "you are welcome", "sender": "Chatbot", "safety": dict(OK), "isLiked": True, "isDisliked": True},
    ],
}
CONVO_D = {"user_pseudo_id": "user-d", "chat_id": "chat-d", "message_history": [human("anyone there?")]}

CHUNK_OF = {"chat-a": 6, "chat-b": 0, "chat-c": 50, "chat-d": 3}

# Expected examples per stream and split (train, valid, test).
EXPECTED = {
    "bot": {"train": 4, "valid": 0, "test": 2},
    "human": {"train": 3, "valid": 0, "test": 3},
    "filter_adversarial_humans_bot": {"train": 4, "valid": 0, "test": 0},
    "filter_adversarial_humans_human": {"train": 3, "valid": 0, "test": 0},
    "crowdworkers_bot": {"train": 1, "valid": 0, "test": 1},
    "crowdworkers_human": {"train": 1, "valid": 0, "test": 0},
}


def write_release(folder: str, convos=(CONVO_A, CONVO_B, CONVO_C, CONVO_D), extra_lines=None) -> str:
    """Writes all 100 chunk files; ``extra_lines`` maps chunk -> raw bytes lines appended."""
    os.makedirs(folder, exist_ok=True)
    lines: dict[int, list[bytes]] = {c: [] for c in range(100)}
    for convo in convos:
        lines[CHUNK_OF[convo["chat_id"]]].append(json.dumps(convo, ensure_ascii=False).encode("utf-8"))
    for chunk, raws in (extra_lines or {}).items():
        lines[chunk].extend(raws)
    for chunk, raws in lines.items():
        with open(os.path.join(folder, f"release_data_{chunk:02d}.jsonl"), "wb") as f:
            f.write(b"".join(raw + b"\n" for raw in raws))
    return folder
