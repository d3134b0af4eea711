"""Tests of the synthetic BB3 deployment release and its judge.

The format checks are written from ``schema.py`` and the data card, not from
``synthetic.py``'s internals, so they also document what a reader may assume.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re

import pytest

from bb3x_jax.data import schema, synthetic
from bb3x_jax.data.synthetic import BAD_REASONS, QUALITIES, is_good, judge, synthesize
from tests import bad_inputs

N_CONVERSATIONS = 2500
SEED = 11
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SAFETY_VALUES = {schema.SAFETY_OK, "__notok__"}
MTURK_KEYS = {schema.MTURK_GOOD, *schema.MTURK_BAD}
# The brief's mapping from a true bad reason to the dislike type users pick.
EXPECTED_DISLIKE = {
    "off_topic": "off_topic",
    "ignoring_last_turn": "off_topic",
    "nonsensical": "nonsensical",
    "inappropriate": "rude",
    "repeating": "looping",
}


def _read_release(out_dir):
    """Conversations per chunk, reading JSON Lines split on "\\n" only."""
    chunks = []
    for i in range(schema.NUM_CHUNKS):
        with open(os.path.join(out_dir, schema.CHUNK_TEMPLATE.format(i)), "rb") as f:
            raw = f.read().decode("utf-8")
        lines = raw.split("\n")
        assert lines[-1] == "", "every line ends with \\n"
        chunks.append([json.loads(line) for line in lines[:-1]])
    return chunks


def _read_ground_truth(out_dir):
    with open(os.path.join(out_dir, synthetic.GROUND_TRUTH_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_release")
    summary = synthesize(out, N_CONVERSATIONS, SEED)
    chunks = _read_release(out)
    gt = _read_ground_truth(out)
    by_id = {c["chat_id"]: c for chunk in chunks for c in chunk}
    gt_index = {(g["chat_id"], g["message_index"]): g for g in gt}
    return {"dir": out, "summary": summary, "chunks": chunks, "gt": gt, "by_id": by_id, "gt_index": gt_index}


def _conversations(release):
    return [c for chunk in release["chunks"] for c in chunk]


def _bot_messages_with_quality(release):
    for c in _conversations(release):
        for k, m in enumerate(c["message_history"]):
            if m["sender"] == schema.BOT:
                yield c, k, m, release["gt_index"][(c["chat_id"], k)]


# --------------------------------------------------------------------------- files


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    """Same (conversations, seed) gives byte-identical files; another seed differs."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sa, sb = synthesize(a, 300, 5), synthesize(b, 300, 5)
    synthesize(c, 300, 6)
    assert sa == sb
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in names)


def test_all_chunk_files_written_and_small_runs_reach_test_and_valid(tmp_path):
    """All 100 chunk files exist even when empty; conversation i lands in chunk i % 100."""
    synthesize(tmp_path, 7, 0)
    for i in range(schema.NUM_CHUNKS):
        path = tmp_path / schema.CHUNK_TEMPLATE.format(i)
        assert path.exists()
        n_lines = path.read_bytes().count(b"\n")
        assert n_lines == (1 if i < 7 else 0), (i, n_lines)
    assert (tmp_path / synthetic.GROUND_TRUTH_FILE).exists()


def test_conversation_order_maps_to_chunks(release):
    """The i-th conversation (ground-truth order) is line i // 100 of chunk i % 100."""
    order = list(dict.fromkeys(g["chat_id"] for g in release["gt"]))
    assert len(order) == N_CONVERSATIONS
    for i, chat_id in enumerate(order):
        assert release["chunks"][i % 100][i // 100]["chat_id"] == chat_id


def test_one_json_object_per_line_and_no_raw_newline_in_texts(release):
    """Lines split on "\\n" only; no text has a raw "\\n"; odd line breakers do occur."""
    texts = [m["text"] for c in _conversations(release) for m in c["message_history"]]
    assert sum(len(chunk) for chunk in release["chunks"]) == N_CONVERSATIONS
    assert not any("\n" in t for t in texts)
    for ch in ("\r", "\u2028", "\u0085"):
        assert any(ch in t for t in texts), repr(ch)
    raw = b"".join(
        (release["dir"] / schema.CHUNK_TEMPLATE.format(i)).read_bytes() for i in range(schema.NUM_CHUNKS)
    ).decode("utf-8")
    assert "\u2028" in raw and "\u0085" in raw and "\\r" in raw and "\r" not in raw


# --------------------------------------------------------------------------- format


def _check_type(value, expected, where):
    if expected is bool:
        assert type(value) is bool, where
    elif expected is not None:
        assert isinstance(value, expected) and type(value) is not bool, where


def test_every_message_has_every_field_with_the_right_type(release):
    """Each conversation and message carries every data-card field with its JSON type."""
    seen_ids = set()
    reward_re = re.compile(schema.REWARD_PATTERN)
    for c in _conversations(release):
        assert set(c) == set(schema.CONVERSATION_KEYS)
        assert UUID_RE.match(c["user_pseudo_id"]) and UUID_RE.match(c["chat_id"])
        history = c["message_history"]
        assert isinstance(history, list) and 2 <= len(history) <= 40
        prev_memories: list = []
        for k, m in enumerate(history):
            where = (c["chat_id"], k)
            assert m["sender"] in (schema.BOT, schema.HUMAN), where
            if k:
                assert m["sender"] != history[k - 1]["sender"], f"senders alternate {where}"
            for key, typ in schema.COMMON_MESSAGE_FIELDS.items():
                if key == "mturk":
                    continue
                assert key in m, (key, where)
                _check_type(m[key], typ, (key, where))
            assert set(m["safety"]) == set(schema.SAFETY_KEYS)
            assert all(v in SAFETY_VALUES for v in m["safety"].values()), where
            rm = reward_re.match(m["reward"])
            assert rm and rm.group(1) in (schema.REWARD_OK, schema.REWARD_NOT_OK), where
            assert 0.0 <= float(rm.group(2)) <= 1.0
            if m.get("mturk") is not None:
                assert isinstance(m["mturk"], dict)
                assert set(m["mturk"]) <= MTURK_KEYS
                assert all(type(v) in (int, float) for v in m["mturk"].values())
            own, other = (
                (schema.BOT_MESSAGE_FIELDS, schema.HUMAN_MESSAGE_FIELDS)
                if m["sender"] == schema.BOT
                else (schema.HUMAN_MESSAGE_FIELDS, schema.BOT_MESSAGE_FIELDS)
            )
            for key, typ in own.items():
                assert key in m, (key, where)
                _check_type(m[key], typ, (key, where))
            assert not set(other) & set(m), where
            msg_id = m.get("bot_message_id") or m.get("human_message_id")
            assert UUID_RE.match(msg_id) and msg_id not in seen_ids
            seen_ids.add(msg_id)
            if m["sender"] == schema.HUMAN:
                continue
            assert m["memory_decision"] in schema.MEMORY_DECISIONS
            assert m["search_decision"] in schema.SEARCH_DECISIONS
            n_docs = 5 if m["search_decision"] == "search" else 0
            for key in ("titles", "content", "urls"):
                docs = m["search_knowledge_doc_" + key]
                assert len(docs) == n_docs and all(isinstance(d, str) and d for d in docs)
            assert bool(m["search_query"]) == (n_docs == 5)
            assert all(
                isinstance(x, str) and x.startswith(("Person 1's Persona: ", "Person 2's Persona: "))
                for x in m["memories"]
            )
            assert m["memories"][: len(prev_memories)] == prev_memories, "memories only grow"
            prev_memories = m["memories"]
            if m["memory_decision"] == "access memory":
                assert m["memory_knowledge"] in m["memories"]
            failure = m["previous_interaction_failure"]
            assert failure in ("",) + schema.INTERACTION_FAILURES
            assert m["isSafetyControlledResponse"] == (failure in ("unsafe_Human", "unsafe_BlenderBot3"))
            assert m["from_model_crash"] == (failure == "unsafe_model_crash")
            assert not (m["isLiked"] and m["isDisliked"])
            if m["isDisliked"]:
                allowed = schema.SENSITIVE_DISLIKE_TYPES if m["isSafetyControlledResponse"] else schema.DISLIKE_TYPES
                assert m["dislike_type"] in allowed, where
            else:
                assert m["dislike_type"] == "", where


def test_conversation_shape(release):
    """Lengths 2..40 with mean near 20, mostly human-first, some bot-first, reused users."""
    convs = _conversations(release)
    lengths = [len(c["message_history"]) for c in convs]
    assert 17 <= sum(lengths) / len(lengths) <= 23
    bot_first = sum(c["message_history"][0]["sender"] == schema.BOT for c in convs) / len(convs)
    assert 0.02 <= bot_first <= 0.09
    assert len({c["user_pseudo_id"] for c in convs}) < 0.9 * len(convs)


def test_mturk_null_absent_empty_and_annotated_all_occur(release):
    """Unannotated messages omit mturk or write null (both); {} counts as annotated."""
    kinds = collections.Counter()
    annotated = {schema.BOT: 0, schema.HUMAN: 0}
    counts = {schema.BOT: 0, schema.HUMAN: 0}
    for c in _conversations(release):
        for m in c["message_history"]:
            counts[m["sender"]] += 1
            if "mturk" not in m:
                kinds["absent"] += 1
            elif m["mturk"] is None:
                kinds["null"] += 1
            else:
                annotated[m["sender"]] += 1
                kinds["empty" if m["mturk"] == {} else "dict"] += 1
    assert kinds["absent"] > 0 and kinds["null"] > 0 and kinds["empty"] > 0 and kinds["dict"] > 0
    assert 0.01 <= annotated[schema.BOT] / counts[schema.BOT] <= 0.04
    assert 0.002 <= annotated[schema.HUMAN] / counts[schema.HUMAN] <= 0.01
    assert release["summary"]["mturk_annotated"] == annotated[schema.BOT] + annotated[schema.HUMAN]


def test_crowdworker_labels_mostly_agree_with_ground_truth(release):
    """Bot mturk dicts hold every category as 0/1 with one 1, right ~95% of the time."""
    agree = total = 0
    for _, _, m, g in _bot_messages_with_quality(release):
        if m.get("mturk"):
            assert set(m["mturk"]) == MTURK_KEYS and sum(m["mturk"].values()) == 1
            total += 1
            agree += m["mturk"][g["quality"]] == 1
    assert total > 100 and agree / total > 0.9


def test_summary_matches_files(release):
    """The returned summary counts what the files contain."""
    s = release["summary"]
    convs = _conversations(release)
    msgs = [m for c in convs for m in c["message_history"]]
    bots = [m for m in msgs if m["sender"] == schema.BOT]
    assert s["conversations"] == len(convs)
    assert s["messages"] == len(msgs)
    assert s["bot_messages"] == len(bots) == len(release["gt"])
    assert s["likes"] == sum(m["isLiked"] for m in bots)
    assert s["dislikes"] == sum(m["isDisliked"] for m in bots)
    expected = {q: 0 for q in QUALITIES}
    expected.update(collections.Counter(g["quality"] for g in release["gt"]))
    assert s["quality"] == expected


# --------------------------------------------------------------------------- world


def test_ground_truth_equals_judge_for_every_bot_message(release):
    """judge(previous texts joined by "\\n", text) reproduces every ground-truth label."""
    n = 0
    for c, k, m, g in _bot_messages_with_quality(release):
        context = "\n".join(x["text"] for x in c["message_history"][:k])
        assert g["bot_message_id"] == m["bot_message_id"]
        assert g["quality"] in QUALITIES
        assert judge(context, m["text"]) == g["quality"], (context[-300:], m["text"], g["quality"])
        n += 1
    assert n == len(release["gt"]) > 10_000


def test_quality_shares_mirror_deployment(release):
    """~85.5% good in standard and ~77.2% in adversarial conversations; all reasons occur, unevenly."""
    counts = {False: collections.Counter(), True: collections.Counter()}
    for g in release["gt"]:
        counts[g["adversarial"]][g["quality"]] += 1
    std, adv = counts[False], counts[True]
    assert abs(std["good"] / sum(std.values()) - 0.855) < 0.025
    assert abs(adv["good"] / sum(adv.values()) - 0.772) < 0.035
    for reason in BAD_REASONS:
        assert std[reason] > 0 and adv[reason] > 0, reason
    assert std["nonsensical"] > std["inappropriate"] and std["off_topic"] > std["inappropriate"]
    assert adv["inappropriate"] / sum(adv.values()) > std["inappropriate"] / sum(std.values())


def test_canned_responses_are_good(release):
    """Safety deflections, crash messages and dislike prompts are ground-truth good."""
    n = 0
    for _, _, m, g in _bot_messages_with_quality(release):
        if m["isSafetyControlledResponse"] or m["from_model_crash"]:
            assert g["quality"] == "good"
            n += 1
    assert n > 0
    assert release["summary"]["canned_responses"] >= n


def test_about_thirty_percent_adversarial_and_flags_follow_them(release):
    """~30% of conversations are adversarial; flagged human messages sit almost only there."""
    s = release["summary"]
    assert 0.25 <= s["adversarial_conversations"] / s["conversations"] <= 0.35
    adv_of = {g["chat_id"]: g["adversarial"] for g in release["gt"]}
    flagged = {False: 0, True: 0}
    totals = collections.Counter(adv_of.values())
    for c in _conversations(release):
        if any(
            any(v != schema.SAFETY_OK for v in m["safety"].values())
            for m in c["message_history"]
            if m["sender"] == schema.HUMAN
        ):
            flagged[adv_of[c["chat_id"]]] += 1
    assert flagged[True] / totals[True] > 0.7
    assert flagged[False] / totals[False] < 0.06  # rare false positives only
    reasons = collections.Counter(
        m["previous_interaction_failure"]
        for c in _conversations(release)
        for m in c["message_history"]
        if m["sender"] == schema.BOT
    )
    assert reasons["unsafe_Human"] > reasons["unsafe_BlenderBot3"] > 0 and reasons["unsafe_model_crash"] > 0


def test_feedback_is_sparse_noisy_and_correlated_with_quality(release):
    """Likes land mostly on good and dislikes on bad messages; few users click; types match reasons."""
    n = collections.Counter()
    type_match = type_total = 0
    for _, _, m, g in _bot_messages_with_quality(release):
        good = g["quality"] == "good"
        n["good" if good else "bad"] += 1
        n[("like_" if m["isLiked"] else "none_") + ("good" if good else "bad")] += m["isLiked"]
        n["dislike_" + ("good" if good else "bad")] += m["isDisliked"]
        if m["isDisliked"] and not good:
            type_total += 1
            type_match += m["dislike_type"] == EXPECTED_DISLIKE[g["quality"]]
    like_good, like_bad = n["like_good"] / n["good"], n["like_bad"] / n["bad"]
    dislike_good, dislike_bad = n["dislike_good"] / n["good"], n["dislike_bad"] / n["bad"]
    assert like_good > 2.5 * like_bad > 0
    assert dislike_bad > 5 * dislike_good > 0
    assert type_total > 100 and type_match / type_total > 0.7
    clicked_users = set()
    users = set()
    for c in _conversations(release):
        users.add(c["user_pseudo_id"])
        if any(m.get("isLiked") or m.get("isDisliked") for m in c["message_history"]):
            clicked_users.add(c["user_pseudo_id"])
    assert 0.1 <= len(clicked_users) / len(users) <= 0.3


def test_dislike_feedback_follows_a_dislike(release):
    """isDislikeFeedback humans answer the bot's question two turns after a disliked message."""
    n = 0
    for c in _conversations(release):
        h = c["message_history"]
        for k, m in enumerate(h):
            if m["sender"] == schema.HUMAN and m["isDislikeFeedback"]:
                n += 1
                assert k >= 3 and h[k - 1]["sender"] == schema.BOT and h[k - 3]["isDisliked"]
                assert "?" in h[k - 1]["text"]
    assert n > 10


_TOPIC_WORDS = {
    t: {t, *synthetic._NOUNS[i], *synthetic._GERUNDS[i]} for i, t in enumerate(synthetic.TOPIC_NAMES)
}


def _context_type(history, k):
    """'number' after a "How many/long/often ...?" human line, 'why' after a
    "Why ...?" one, 'science' while the human's current topic is science (and
    not astronomy), else None."""
    humans = [m["text"] for m in history[:k] if m["sender"] == schema.HUMAN]
    last = humans[-1].lower() if humans else ""
    if re.search(r"(^|[.!] )how (many|long|often)\b", last):
        return "number"
    if re.search(r"(^|[.!] )why\b", last):
        return "why"
    for text in reversed(humans):
        words = set(re.findall(r"[a-z]+", text.lower()))
        topics = {t for t in synthetic.TOPIC_NAMES if words & _TOPIC_WORDS[t]}
        if topics:
            return "science" if "science" in topics and "astronomy" not in topics else None
    return None


def test_the_bots_quirks_are_its_mode_in_their_context_type(release):
    """After number and why questions and while the topic is science, the deployed bot's
    most frequent response is one fixed bad text, but most responses elsewhere are distinct:
    likelihood training then makes the failure the model's mode there (the BB3x experiment
    needs such systematic failures for feedback to matter)."""
    expected_top = {
        "number": "i have been learning a lot about <topic> lately",
        "why": "that is so interesting tell me more about your day",
        "science": "what got you interested in astronomy",
    }
    by_type = {kind: collections.Counter() for kind in expected_top}
    verdicts = {kind: collections.Counter() for kind in expected_top}
    for c, k, m, g in _bot_messages_with_quality(release):
        kind = _context_type(c["message_history"], k)
        if kind and not (m["isSafetyControlledResponse"] or m["from_model_crash"]):
            words = re.findall(r"[a-z]+", m["text"].lower())
            if kind == "number":  # the dodge names the human's topic: count it as one text
                words = ["<topic>" if w in synthetic.TOPIC_NAMES else w for w in words]
            by_type[kind][" ".join(words)] += 1
            verdicts[kind][g["quality"]] += 1
    for kind, counts in by_type.items():
        total = sum(counts.values())
        (top, n_top), (_, n_second) = counts.most_common(2)
        assert total > 150, kind
        assert top == expected_top[kind], (kind, counts.most_common(3))
        assert n_top > 5 * n_second, (kind, counts.most_common(3))
        bad = total - verdicts[kind]["good"]
        assert bad / total > 0.45, (kind, verdicts[kind])
    assert release["summary"]["quirk_responses"] > 0.03 * release["summary"]["bot_messages"]


def test_vocabulary_is_modest_but_responses_vary(release):
    """A few thousand words at most, yet bot texts are mostly distinct strings."""
    words = set()
    bot_texts = []
    for c in _conversations(release):
        for m in c["message_history"]:
            words.update(re.findall(r"[a-z0-9']+", m["text"].lower()))
            if m["sender"] == schema.BOT:
                bot_texts.append(m["text"])
    assert 300 < len(words) < 3000
    assert len(set(bot_texts)) / len(bot_texts) > 0.5


# --------------------------------------------------------------------------- judge

CTX_PASTA_Q = "Hi!\nHello! How is your day going so far?\nDo you like pasta?"
CTX_PASTA = "Lately I have been really into pasta."
CTX_DRUMS_WHY = "Lately I have been really into drums.\nMostly because songs are so lovely.\nWhy?"
CTX_HIKING = "I love hiking.\nI really enjoy camping, especially on weekends.\nLately I have been really into pasta."


@pytest.mark.parametrize(
    "context, response, expected",
    [
        (CTX_PASTA_Q, "Yes, I have tried baking a few times and it was amazing.", "good"),
        (CTX_PASTA_Q, "YES,  i have tried BAKING a few times and it was amazing!!!", "good"),
        (CTX_PASTA_Q, "I like to spend my free time baking.", "ignoring_last_turn"),
        (CTX_PASTA_Q, "Yes, I have tried hiking a few times and it was amazing.", "off_topic"),
        (CTX_PASTA_Q, "That is so interesting, tell me more about your day.", "ignoring_last_turn"),
        (CTX_PASTA_Q, "baking pasta the is my", "nonsensical"),
        (CTX_PASTA_Q, "Yes, I have tried baking a few times and it was", "nonsensical"),
        (CTX_PASTA_Q, "That is a stupid question.", "inappropriate"),
        (CTX_PASTA_Q, "Hello! How is your day going so far?", "repeating"),
        (CTX_PASTA_Q, "Yes, pasta are one of my amazing interests. Shut up.", "inappropriate"),
        (
            CTX_HIKING,
            "I really enjoy fishing, especially on weekends.",
            "ignoring_last_turn",
        ),
        (
            CTX_HIKING,
            "As I said, I really enjoy camping, especially on weekends.",
            "repeating",
        ),
        (
            CTX_HIKING,
            "I really enjoy baking, especially on weekends.",
            "good",
        ),
        (
            "I love hiking.\nI really enjoy camping, especially on weekends.\nTell me more!",
            "I really enjoy fishing, especially on weekends.",
            "good",
        ),
        (CTX_DRUMS_WHY, "I like to spend my free time singing.", "ignoring_last_turn"),
        (CTX_DRUMS_WHY, "Because singing helps me relax after a long day.", "good"),
        ("", "Hi there! What would you like to talk about today?", "good"),
        ("Hi!", "Do you like tacos?", "good"),
        (CTX_PASTA, "Hi there! What would you like to talk about today?", "ignoring_last_turn"),
        ("You are so stupid.", "Hey do you want to talk about something else? How about we talk about music?", "good"),
        ("", "", "nonsensical"),
    ],
)
def test_judge_rules_on_hand_written_examples(context, response, expected):
    """The documented rule and its precedence decide hand-written cases."""
    assert judge(context, response) == expected
    assert is_good(context, response) == (expected == "good")


def test_judge_survives_junk_and_is_deterministic():
    """Empty, random, unicode and very long inputs return a quality without crashing."""
    rng = random.Random(0)
    alphabet = "abc xyz?!.\n\r\u2028\u0085\t\x00é漢字🙂'0123456789" + "".join(chr(i) for i in range(32, 127))
    cases = ["", "\n", "\n\n\n", "?", "\r\u2028\u0085", "'" * 50]
    for _ in range(300):
        cases.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200))))
    long_text = "pasta baking " * 100_000
    with bad_inputs.deadline(300):  # linear work takes well under a second; backtracking never ends
        _judge_all(cases, long_text)
    with pytest.raises(TypeError):
        judge(None, "x")  # type: ignore[arg-type]



def _judge_all(cases, long_text):
    for ctx in cases[:60]:
        for resp in cases[::10]:
            q = judge(ctx, resp)
            assert q in QUALITIES
            assert q == judge(ctx, resp)
    assert judge(long_text, long_text) in QUALITIES
    many_lines = "\n".join(["Do you like pasta?"] * 20_000)
    assert judge(many_lines, "Yes, I have tried baking a few times and it was amazing.") in QUALITIES


def test_public_constants():
    """QUALITIES is good followed by the five bad reasons."""
    assert BAD_REASONS == ("off_topic", "nonsensical", "repeating", "ignoring_last_turn", "inappropriate")
    assert QUALITIES == ("good",) + BAD_REASONS
