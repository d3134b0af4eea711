"""The six reference streams: hand-counted examples, framing and metadata."""

from __future__ import annotations

import collections
import copy
import json

import pytest

from bb3x_jax.data import extract, release, schema, streams
from bb3x_jax.data.feedback import DEFAULT_POLICY
from tests.data import release_fixtures as fx


def _examples(convo, stream):
    parsed = release.parse_conversation(json.dumps(convo).encode(), "test:1")
    dropped = collections.Counter()
    return list(streams.examples_from_conversation(parsed, streams.stream_spec(stream), DEFAULT_POLICY, dropped)), dropped


@pytest.mark.parametrize("stream", schema.STREAMS)
def test_hand_counted_examples_per_stream(stream):
    """Each stream yields exactly the hand-worked number of examples per conversation."""
    totals = {split: 0 for split in schema.SPLITS}
    split_of_chunk = {c: s for s, chunks in schema.SPLIT_CHUNKS.items() for c in chunks}
    for convo in (fx.CONVO_A, fx.CONVO_B, fx.CONVO_C, fx.CONVO_D):
        examples, _ = _examples(copy.deepcopy(convo), stream)
        totals[split_of_chunk[fx.CHUNK_OF[convo["chat_id"]]]] += len(examples)
    assert totals == fx.EXPECTED[stream]


def test_context_is_previous_texts_joined_by_newline():
    """Context = every previous message's text joined with '\\n', odd line-end characters kept."""
    examples, _ = _examples(copy.deepcopy(fx.CONVO_A), "bot")
    assert [e["message_index"] for e in examples] == [1, 3]
    assert examples[0]["context"] == "hello there\u2028friend"
    assert examples[1]["context"] == "hello there\u2028friend\nhi! how are you?\r\nI like cooking pasta"
    assert examples[1]["label"] == "the moon is made of rock"


def test_label_info_and_metadata_fields():
    """Examples carry the conversation ids, the adversarial flag and the whole label message."""
    examples, _ = _examples(copy.deepcopy(fx.CONVO_B), "bot")
    first = examples[0]
    assert first["chat_id"] == "chat-b" and first["user_pseudo_id"] == "user-b"
    assert first["adversarial_human"] is True
    info = json.loads(first["label_info"])
    assert info["isSafetyControlledResponse"] is True and info["bot_message_id"].startswith("b-")
    fields = streams.label_fields(first["label_info"])
    assert fields["is_disliked"] and fields["dislike_type"] == "disagree_sensitive" and fields["canned"]
    assert fields["reward_class"] == "__ok__" and fields["reward_probability"] == pytest.approx(0.91)


def test_data_card_sender_spellings_are_accepted():
    """'Chatbot'/'Human' count as bot/human, so conversation C gives bot and human examples."""
    bots, _ = _examples(copy.deepcopy(fx.CONVO_C), "bot")
    humans, _ = _examples(copy.deepcopy(fx.CONVO_C), "human")
    assert [e["label"] for e in bots] == ["try Dune", "you are welcome"]
    assert [e["label"] for e in humans] == ["thanks"]
    assert all(json.loads(e["label_info"])["sender"] == "bot" for e in bots)


def test_drops_are_counted_by_reason():
    """Label-agent messages that give no example are counted: no context, adversarial, not annotated."""
    _, dropped = _examples(copy.deepcopy(fx.CONVO_B), "filter_adversarial_humans_human")
    assert dropped == {"adversarial_conversation": 3}
    _, dropped = _examples(copy.deepcopy(fx.CONVO_B), "crowdworkers_human")
    assert dropped == {"not_crowdworker_annotated": 3}
    _, dropped = _examples(copy.deepcopy(fx.CONVO_B), "bot")
    assert dropped == {"no_context": 1}


def test_adversarial_flag_uses_either_safety_check():
    """A human message failing duo_safety OR string_matcher makes the conversation adversarial."""
    for key in schema.SAFETY_KEYS:
        convo = copy.deepcopy(fx.CONVO_A)
        convo["message_history"][2]["safety"][key] = "__notok__"
        examples, _ = _examples(convo, "filter_adversarial_humans_bot")
        assert examples == []
    # An unsafe *bot* message does not make the human adversarial.
    convo = copy.deepcopy(fx.CONVO_A)
    convo["message_history"][1]["safety"]["duo_safety"] = "__notok__"
    assert len(_examples(convo, "filter_adversarial_humans_bot")[0]) == 2


def test_unknown_stream_is_named():
    """A misspelt stream fails with the list of valid names."""
    with pytest.raises(ValueError, match="unknown stream 'bots'"):
        streams.stream_spec("bots")


def test_release_order_and_counts_do_not_depend_on_workers(tmp_path):
    """Spawned parser workers give the same examples, in the same order, as inline parsing."""
    folder = fx.write_release(str(tmp_path / "rel"))
    location = release.locate_release(folder)
    results = []
    for workers in (0, 2):
        report = extract.SplitReport()
        keys = [k for k, _ in extract.iter_examples(location, "train", "bot", DEFAULT_POLICY, report, num_workers=workers)]
        results.append((keys, report.to_dict()))
    assert results[0] == results[1]
    assert len(results[0][0]) == fx.EXPECTED["bot"]["train"]
