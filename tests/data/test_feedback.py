"""The feedback policy: each rule, its precedence, and its configuration."""

from __future__ import annotations

import pytest

from bb3x_jax.data import schema
from bb3x_jax.data.feedback import DEFAULT_POLICY, FeedbackPolicy

P, N, U = schema.POSITIVE, schema.NEGATIVE, schema.UNLABELED
OK = {"duo_safety": "__ok__", "string_matcher": "__ok__"}


def msg(**fields):
    return {"text": "t", "sender": "bot", "safety": dict(OK), **fields}


@pytest.mark.parametrize(
    "message, expected",
    [
        (msg(), (U, "none")),
        (msg(isLiked=True), (P, "like")),
        (msg(isDisliked=True, dislike_type="nonsensical"), (N, "dislike")),
        (msg(isLiked=True, isDisliked=True), (U, "dislike")),  # conflicting clicks
        (msg(mturk={"good": 1, "off_topic": 0}), (P, "mturk")),
        (msg(mturk={"good": 0, "nonsensical": 1}), (N, "mturk")),
        (msg(mturk={}), (U, "none")),  # annotated but no votes: no verdict
        (msg(mturk={"good": 1}, isDisliked=True), (P, "mturk")),  # crowdworkers outrank clicks
        (msg(safety={"duo_safety": "__notok__", "string_matcher": "__ok__"}), (N, "safety")),
        (msg(isLiked=True, safety={"duo_safety": "__ok__", "string_matcher": "__notok__"}), (P, "like")),
        (msg(isSafetyControlledResponse=True, isLiked=True), (U, "canned")),
        (msg(from_model_crash=True, isDisliked=True), (U, "canned")),
        (msg(reward="Predicted class: __not_ok__ with probability: 0.99"), (U, "none")),  # reward off by default
    ],
)
def test_default_policy(message, expected):
    """The documented default rules decide each case as the module docstring says."""
    assert DEFAULT_POLICY.classify(message) == expected


def test_sensitive_dislikes_are_ignored_unless_configured():
    """agree/disagree_sensitive dislikes are not negatives by default, and are when configured."""
    m = msg(isDisliked=True, dislike_type="agree_sensitive")
    assert DEFAULT_POLICY.classify(m) == (U, "none")
    strict = FeedbackPolicy(ignored_dislike_types=())
    assert strict.classify(m) == (N, "dislike")


def test_reward_thresholds():
    """The reward model decides only when its probability reaches the configured threshold."""
    policy = FeedbackPolicy(reward_negative_threshold=0.9, reward_positive_threshold=0.95)
    assert policy.classify(msg(reward="Predicted class: __not_ok__ with probability: 0.93")) == (N, "reward")
    assert policy.classify(msg(reward="Predicted class: __not_ok__ with probability: 0.80")) == (U, "none")
    assert policy.classify(msg(reward="Predicted class: __ok__ with probability: 0.96")) == (P, "reward")
    assert policy.classify(msg(reward="Predicted class: __ok__ with probability: 0.90")) == (U, "none")


def test_order_is_configurable():
    """Reordering rules changes precedence: clicks before crowdworkers flips this verdict."""
    m = msg(mturk={"good": 1}, isDisliked=True, dislike_type="other")
    assert FeedbackPolicy(order=("dislike", "mturk")).classify(m) == (N, "dislike")
    assert FeedbackPolicy(order=("like",)).classify(msg(isDisliked=True)) == (U, "none")


def test_bad_policy_values_fail_by_name():
    """Unknown rules, keys and out-of-range thresholds fail with their names."""
    with pytest.raises(ValueError, match="unknown feedback rule"):
        FeedbackPolicy(order=("likes",))
    with pytest.raises(ValueError, match="reward_negative_threshold"):
        FeedbackPolicy(reward_negative_threshold=1.5)
    with pytest.raises(ValueError, match=r"unknown feedback policy key\(s\) \['colour'\]"):
        FeedbackPolicy.from_dict({"colour": 1})


def test_round_trip_and_fingerprint():
    """A policy survives to_dict/from_dict and different policies get different fingerprints."""
    policy = FeedbackPolicy(order=("like", "dislike"), reward_negative_threshold=0.5)
    assert FeedbackPolicy.from_dict(policy.to_dict()) == policy
    assert policy.fingerprint() != DEFAULT_POLICY.fingerprint()
