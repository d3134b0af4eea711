"""The feedback policy: which responses count as good (positive) or bad (negative).

BB3x split deployment responses into good and bad from user feedback "in
conjunction with crowdworker annotations"; the exact rule is not public. This
policy makes ours explicit and configurable. Rules run in ``order``; the first
rule that reaches a verdict decides, and its name is recorded as the example's
``feedback_source`` so every decision can be audited with ``stats``.

Default rules (each can be reordered or dropped):
- ``canned``: canned safety / model-crash responses are not model generations,
  so they are left unlabeled (CE still trains on unlabeled examples).
- ``mturk``: crowdworker votes: more bad-category votes than good -> negative,
  more good than bad -> positive, a tie or an empty dict -> no verdict.
- ``dislike``: a thumbs-down -> negative, except dislike types listed in
  ``ignored_dislike_types`` (the canned-response answers agree/disagree_sensitive
  say how the user felt about the safety intervention, not the response).
  A message both liked and disliked is a conflict and stays unlabeled.
- ``like``: a thumbs-up -> positive.
- ``safety``: a message flagged unsafe by either classifier -> negative.
- ``reward``: the reward model's verdict when its probability reaches a
  threshold; both thresholds default to off (None), because the reward model
  labels every message and would swamp the sparse human signal.
Everything without a verdict is unlabeled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from bb3x_jax.data import release, schema

RULES = ("canned", "mturk", "dislike", "like", "safety", "reward")


@dataclasses.dataclass(frozen=True)
class FeedbackPolicy:
    order: tuple[str, ...] = RULES
    mturk_good_keys: tuple[str, ...] = (schema.MTURK_GOOD,)
    mturk_bad_keys: tuple[str, ...] = schema.MTURK_BAD
    ignored_dislike_types: tuple[str, ...] = schema.SENSITIVE_DISLIKE_TYPES
    reward_negative_threshold: float | None = None
    reward_positive_threshold: float | None = None

    def __post_init__(self):
        unknown = [r for r in self.order if r not in RULES]
        if unknown:
            raise ValueError(f"unknown feedback rule(s) {unknown}; known rules: {', '.join(RULES)}")
        for name in ("reward_negative_threshold", "reward_positive_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] or None, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FeedbackPolicy":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown feedback policy key(s) {unknown}; known keys: {', '.join(sorted(fields))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]

    def classify(self, message: dict[str, Any]) -> tuple[int, str]:
        """(feedback class, deciding rule) for one label message; ("none") when no rule decides."""
        for rule in self.order:
            verdict = getattr(self, f"_rule_{rule}")(message)
            if verdict is not None:
                return verdict, rule
        return schema.UNLABELED, "none"

    # Each rule returns a class or None (no verdict).

    def _rule_canned(self, m: dict[str, Any]) -> int | None:
        if m.get("isSafetyControlledResponse") or m.get("from_model_crash"):
            return schema.UNLABELED
        return None

    def _rule_mturk(self, m: dict[str, Any]) -> int | None:
        votes = m.get("mturk")
        if not votes:
            return None
        good = sum(float(votes.get(k, 0) or 0) for k in self.mturk_good_keys)
        bad = sum(float(votes.get(k, 0) or 0) for k in self.mturk_bad_keys)
        if bad > good:
            return schema.NEGATIVE
        if good > bad:
            return schema.POSITIVE
        return None

    def _rule_dislike(self, m: dict[str, Any]) -> int | None:
        if not m.get("isDisliked"):
            return None
        if m.get("isLiked"):
            return schema.UNLABELED  # conflicting clicks: no trustworthy verdict
        if (m.get("dislike_type") or "") in self.ignored_dislike_types:
            return None
        return schema.NEGATIVE

    def _rule_like(self, m: dict[str, Any]) -> int | None:
        if m.get("isLiked") and not m.get("isDisliked"):
            return schema.POSITIVE
        return None

    def _rule_safety(self, m: dict[str, Any]) -> int | None:
        return schema.NEGATIVE if release.is_safe(m) is False else None

    def _rule_reward(self, m: dict[str, Any]) -> int | None:
        label, probability = release.parse_reward(m.get("reward"))
        if label == schema.REWARD_NOT_OK and self.reward_negative_threshold is not None:
            if probability >= self.reward_negative_threshold:
                return schema.NEGATIVE
        if label == schema.REWARD_OK and self.reward_positive_threshold is not None:
            if probability >= self.reward_positive_threshold:
                return schema.POSITIVE
        return None


DEFAULT_POLICY = FeedbackPolicy()
