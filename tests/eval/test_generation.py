"""Text metrics of generations: ParlAI's F1 and the judge summary."""

from __future__ import annotations

import random

import pytest

from bb3x_jax.eval import generation as generation_eval


def test_f1_on_worked_examples():
    """Unigram F1 after lower-casing and dropping punctuation and articles."""
    assert generation_eval.f1_score("The cat sat.", "a cat SAT") == 1.0
    assert generation_eval.f1_score("cat dog", "cat mouse") == pytest.approx(0.5)
    assert generation_eval.f1_score("cat cat cat", "cat") == pytest.approx(0.5)  # clipped counts: p 1/3, r 1
    assert generation_eval.f1_score("", "anything") == 0.0
    assert generation_eval.normalize_answer("  An apple, THE end!  ") == "apple end"


@pytest.mark.parlai
def test_f1_equals_parlai_f1_metric():
    """Our F1 equals ParlAI's F1Metric on random sentences."""
    from parlai.core import metrics

    words = ["the", "a", "cat", "Cat,", "dog!", "an", "music", "I", "like", "it's", "x"]
    rng = random.Random(0)
    for _ in range(200):
        guess = " ".join(rng.choices(words, k=rng.randint(0, 6)))
        answer = " ".join(rng.choices(words, k=rng.randint(1, 6)))
        ours = generation_eval.f1_score(guess, answer)
        assert ours == pytest.approx(metrics.F1Metric.compute(guess, [answer]).value()), (guess, answer)


def test_judge_summary_lists_every_reason_and_sums_to_one():
    """Good rate plus the bad reasons' shares is 1, and reasons never seen are listed as 0."""
    summary = generation_eval.judge_summary(["good", "good", "off_topic", "repeating"],
                                            reasons=("off_topic", "repeating", "nonsensical"))
    assert summary["good_rate"] == 0.5 and summary["judged"] == 4
    assert summary["reasons"] == {"off_topic": 0.25, "repeating": 0.25, "nonsensical": 0.0}


def test_response_text_stops_at_the_end_token():
    """Generated ids become text up to the end token, without padding."""

    class Tok:
        pad_id, end_id = 0, 2

        def decode(self, ids):
            return " ".join(map(str, ids))

    assert generation_eval.response_text(Tok(), [5, 6, 2, 7, 0]) == "5 6"
    assert generation_eval.response_text(Tok(), [5, 0, 6]) == "5 6"
