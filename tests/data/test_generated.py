"""Generated-example splits for iterative CRINGE: the 50/50 balance rule, the split files, concatenation."""

from __future__ import annotations

import collections
import json
import os

import pytest

from bb3x_jax.data import generated
from bb3x_jax.data.framing import Framing


def _examples(positives: int, negatives: int, repeat_positive: int = 1):
    out = [{"context": f"c{i}", "label": f"good {i}", "feedback": 1} for i in range(positives)] * repeat_positive
    return out + [{"context": f"c{i}", "label": f"bad {i}", "feedback": 0} for i in range(negatives)]


@pytest.mark.parametrize("positives, negatives, expected", [(10, 50, 20), (10, 15, 15), (40, 8, 8), (0, 5, 0)])
def test_balance_is_half_and_half_with_each_positive_at_most_twice(positives, negatives, expected):
    """As many positives as negatives; a distinct positive appears at most twice and every distinct
    positive once before any appears twice; the counts account for everything dropped."""
    mixed, counts = generated.balance(_examples(positives, negatives), seed=0)
    feedback = collections.Counter(e["feedback"] for e in mixed)
    assert feedback[1] == feedback[0] == expected
    copies = collections.Counter(e["label"] for e in mixed if e["feedback"] == 1)
    assert max(copies.values(), default=0) <= 2
    if expected >= positives:
        assert len(copies) == positives  # every distinct positive used
    else:
        assert set(copies.values()) <= {1}  # none twice while others are unused
    assert counts["negative_kept"] + counts["negative_dropped"] == negatives
    assert counts["positive_kept"] == expected


def test_balance_counts_duplicate_positives_once_and_is_deterministic():
    """The same positive generated three times counts as one distinct positive; same seed, same mix."""
    examples = _examples(4, 20, repeat_positive=3)
    mixed, counts = generated.balance(examples, seed=1)
    assert counts["positive_in"] == 12 and counts["positive_distinct"] == 4
    assert counts["positive_duplicates_dropped"] == 8 and counts["positive_kept"] == 8
    assert mixed == generated.balance(examples, seed=1)[0]
    assert mixed != generated.balance(examples, seed=2)[0]


def test_balance_rejects_unlabeled_examples():
    """Only judged generations (good or bad) may enter; anything else is an error, not a silent drop."""
    with pytest.raises(ValueError, match="feedback"):
        generated.balance([{"context": "c", "label": "l", "feedback": -1}], seed=0)


def test_split_round_trip_concat_and_bad_lines(tmp_path):
    """A written split reads back field for field (bytes, as the pipeline expects), concatenates
    after another source by index, and a damaged line is reported with its line number."""
    examples = _examples(3, 2)
    meta = generated.write_split(str(tmp_path / "iter1"), examples, {"iteration": 1})
    split = generated.GeneratedSplit(str(tmp_path / "iter1"))
    assert len(split) == 5 and meta["positive"] == 3 and split.meta["iteration"] == 1
    assert split[0] == {"context": b"c0", "label": b"good 0", "feedback": 1}
    both = generated.ConcatRecords([_examples(2, 0), split])
    assert len(both) == 7 and both[2] == split[0] and both.__getitems__([6, 0])[0] == split[4]
    with pytest.raises(IndexError):
        both[7]
    generated.write_split(str(tmp_path / "iter1"), examples[:2], {"iteration": 1})  # replaced whole
    assert len(generated.GeneratedSplit(str(tmp_path / "iter1"))) == 2
    with open(os.path.join(tmp_path / "iter1", "examples.jsonl"), "a") as f:
        f.write(json.dumps({"context": "x"}) + "\n")
    with pytest.raises(ValueError, match="examples.jsonl:3"):
        generated.GeneratedSplit(str(tmp_path / "iter1"))


def test_concatenated_token_caches_give_each_source_rows_in_request_order(tmp_path, tokenizer):
    """ConcatRecords over token caches offers token_rows (so training stays on cached ids) and each
    requested index gets exactly its own source's row, in the order requested; a mixed concatenation
    (cache + text) offers none, so the pipeline falls back to tokenizing text."""
    import numpy as np

    from bb3x_jax.data import token_cache

    first = [{"context": f"hello there\nhow are you {i}", "label": f"fine {i}", "feedback": i % 2} for i in range(5)]
    second = [{"context": f"tell me {i} things", "label": f"no no {i}", "feedback": 1} for i in range(3)]
    caches = [token_cache.build(src, tokenizer, Framing(16, 8), str(tmp_path / name))
              for src, name in ((first, "a"), (second, "b"))]
    both = generated.ConcatRecords(caches)
    assert both.text_truncate == 16 and both.label_truncate == 8
    order = np.array([6, 0, 4, 5, 1, 7, 6])
    got = both.token_rows(order)
    for position, index in enumerate(order):
        source, local = (caches[0], index) if index < 5 else (caches[1], index - 5)
        want = source.token_rows(np.array([local]))
        for part in range(2):
            stream, starts, lengths = got[part]
            row = stream[starts[position] : starts[position] + lengths[position]]
            np.testing.assert_array_equal(row, want[part][0])
        assert got[2][position] == want[2][0]
    assert not hasattr(generated.ConcatRecords([caches[0], first]), "token_rows")
