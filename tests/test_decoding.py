"""Decoding against transformers' ``generate`` on the same weights, and the constraints' properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bb3x_jax import decoding
from bb3x_jax.model import api
from bb3x_jax.model.formats import tables
from tests.model import hf_fixtures

MAX_LEN = 12


def _blenderbot(scan: bool):
    hf, cfg = hf_fixtures.chatty_blenderbot(end_bias=2.0)
    model = hf_fixtures.new_model(cfg.replace(scan_layers=scan))
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_blenderbot_table(cfg))
    rng = np.random.default_rng(0)
    context = rng.integers(3, cfg.vocab_size, (10, 8))
    context[1, 5:] = 0
    context[2, 3:] = 0
    return hf, model, context


def _opt(scan: bool):
    hf, cfg = hf_fixtures.chatty_opt(end_bias=2.0)
    model = hf_fixtures.new_model(cfg.replace(scan_layers=scan))
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_opt_table(cfg))
    rng = np.random.default_rng(0)
    context = rng.integers(3, cfg.vocab_size, (10, 8))
    context[:, 0] = 2
    context[1, 5:] = 1
    context[2, 3:] = 1
    return hf, model, context


def _hf_generate(hf, context, pad: int, **kwargs):
    """transformers' new tokens (decoder-only prompts left-padded, as it expects)."""
    decoder_only = not hf.config.is_encoder_decoder
    if decoder_only:
        context = np.stack([np.concatenate([r[r == pad], r[r != pad]]) for r in context])
    settings = dict(max_new_tokens=MAX_LEN, do_sample=False, no_repeat_ngram_size=0, length_penalty=1.0,
                    early_stopping=False, num_beams=1)
    settings.update(kwargs)
    if not decoder_only:
        settings.update(forced_eos_token_id=None, forced_bos_token_id=None)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(context), attention_mask=torch.tensor(context != pad).long(),
                          **settings).numpy()
    return out[:, context.shape[1]:] if decoder_only else out[:, 1:]


def _until_end(row, end: int = 2):
    """A generation up to and including its end token (what follows is padding)."""
    row = list(row)
    return row[: row.index(end) + 1] if end in row else row


def _assert_same_generations(ours, ref):
    ours_rows, ref_rows = [_until_end(r) for r in ours], [_until_end(r) for r in ref]
    assert ours_rows == ref_rows
    ended = sum(len(r) < MAX_LEN for r in ref_rows)
    assert 0 < ended < len(ref_rows), "the fixture must exercise both early ends and max_len"


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("arch", ["blenderbot", "opt"])
def test_greedy_and_beam_search_match_transformers(arch, scan):
    """Greedy and beam search (4 beams) give transformers' token ids on the same weights, for the
    encoder-decoder and the decoder-only model, with the layer list and with scanned layers."""
    hf, model, context = (_blenderbot if arch == "blenderbot" else _opt)(scan)
    pad = model.cfg.pad_id
    greedy = decoding.generate(model, context, decoding.Settings(max_len=MAX_LEN))
    _assert_same_generations(greedy, _hf_generate(hf, context, pad))
    beam = decoding.generate(model, context, decoding.Settings(method="beam", beam_size=4, max_len=MAX_LEN))
    _assert_same_generations(beam, _hf_generate(hf, context, pad, num_beams=4))
    assert [_until_end(r) for r in beam] != [_until_end(r) for r in greedy]  # the search matters here


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_generated_pad_ids_are_tokens_like_any_other(method):
    """An OPT model whose generations pass through its pad id (1): that token is attended to later
    (its mask comes from the generated length, not from comparing ids with pad), as in transformers."""
    hf, cfg = hf_fixtures.chatty_opt(end_bias=1.0, pad_bias=1.6)
    model = hf_fixtures.new_model(cfg)
    tables.load_state_dict(model, hf.state_dict(), *tables.hf_opt_table(cfg))
    context = np.random.default_rng(1).integers(3, cfg.vocab_size, (10, 8))
    context[:, 0] = 2
    context[1, 5:] = 1
    beams = 4 if method == "beam" else 1
    ours = decoding.generate(model, context, decoding.Settings(method=method, beam_size=beams, max_len=MAX_LEN))
    ref = _hf_generate(hf, context, 1, num_beams=beams)
    assert sum(1 in _until_end(r)[:-1] for r in ref) >= 3, "the fixture must generate the pad id mid-sequence"
    assert [_until_end(r) for r in ours] == [_until_end(r) for r in ref]


def test_output_is_padded_after_the_end_token():
    """Generations are [batch, <= max_len] ids: no start token, and only pad after the end token."""
    _, model, context = _blenderbot(False)
    out = decoding.generate(model, context, decoding.Settings(max_len=MAX_LEN))
    assert out.shape[0] == len(context) and out.shape[1] <= MAX_LEN
    for row in out:
        tail = row[len(_until_end(row)):]
        assert (tail == model.cfg.pad_id).all()


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_min_len_bans_the_end_token_as_transformers_min_new_tokens(method):
    """With min_len, no generation ends before it, and the ids equal transformers' min_new_tokens."""
    hf, model, context = _blenderbot(False)
    beams = 4 if method == "beam" else 1
    plain = decoding.generate(model, context, decoding.Settings(method=method, beam_size=beams, max_len=MAX_LEN))
    assert min(len(_until_end(r)) for r in plain) < 6  # without it, some end early
    out = decoding.generate(model, context,
                            decoding.Settings(method=method, beam_size=beams, max_len=MAX_LEN, min_len=6))
    assert min(len(_until_end(r)) for r in out) >= 7  # 6 tokens, then the end may come
    ref = _hf_generate(hf, context, 0, num_beams=beams, min_new_tokens=6)
    assert [_until_end(r) for r in out] == [_until_end(r) for r in ref]


def _ngrams(seq, n):
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def test_ngram_blocking_of_hypothesis_and_context():
    """Beam search with block_ngram=n: no n-gram twice in a generation; context_block_ngram=n: no
    n-gram of the context in it (where the unblocked generations had both). (Greedy blocking is
    compared with transformers below.)"""
    _, model, context = _blenderbot(False)
    method, beams = "beam", 4
    pad, end = model.cfg.pad_id, model.cfg.end_id

    def generations(**kw):
        out = decoding.generate(model, context, decoding.Settings(method=method, beam_size=beams, max_len=MAX_LEN,
                                                                  **kw))
        return [[t for t in _until_end(r, end) if t != end] for r in out]

    def repeats(rows, n):
        return sum(len(_ngrams(r, n)) - len(set(_ngrams(r, n))) for r in rows)

    def from_context(rows, n):
        return sum(len(set(_ngrams(r, n)) & set(_ngrams([t for t in c if t != pad], n))) for r, c in zip(rows, context))

    plain = generations()
    assert repeats(plain, 3) > 0
    assert from_context(plain, 1) > 0
    assert from_context(generations(context_block_ngram=1), 1) == 0
    both = generations(block_ngram=3, context_block_ngram=1)
    assert repeats(both, 3) == 0 and from_context(both, 1) == 0


def test_hypothesis_blocking_matches_transformers_no_repeat_ngram():
    """block_ngram equals transformers' no_repeat_ngram_size (greedy and beam) on the encoder-decoder."""
    hf, model, context = _blenderbot(False)
    for beams in (1, 4):
        out = decoding.generate(model, context, decoding.Settings(method="beam" if beams > 1 else "greedy",
                                                                  beam_size=beams, max_len=MAX_LEN, block_ngram=2))
        ref = _hf_generate(hf, context, 0, num_beams=beams, no_repeat_ngram_size=2)
        assert [_until_end(r) for r in out] == [_until_end(r) for r in ref]


def test_top_k_and_top_p_filters_match_transformers_warpers():
    """The sampling filters keep exactly the tokens transformers' TopK/TopP warpers keep."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 3
    for top_k, top_p in ((5, 1.0), (0, 0.7), (0, 0.05), (10, 0.9)):
        ours = np.asarray(decoding._filter_top_k_top_p(logits, top_k, top_p))
        ref = torch.tensor(logits)
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1.0:
            ref = TopPLogitsWarper(top_p)(None, ref)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref.numpy()), err_msg=f"{top_k} {top_p}")


def test_sampling_is_seeded_and_follows_the_model_distribution():
    """Sampling: same seed -> same ids, other seed -> other ids; top_k=1 is greedy; and the first
    token's frequencies over 4000 draws match the model's softmax (total variation < 0.05)."""
    _, model, context = _blenderbot(False)
    sample = decoding.Settings(method="sample", max_len=MAX_LEN)
    a = decoding.generate(model, context, sample, seed=1)
    assert np.array_equal(a, decoding.generate(model, context, sample, seed=1))
    assert not np.array_equal(a, decoding.generate(model, context, sample, seed=2))
    greedy = decoding.generate(model, context, decoding.Settings(max_len=MAX_LEN))
    top1 = decoding.generate(model, context, decoding.Settings(method="sample", top_k=1, max_len=MAX_LEN), seed=3)
    assert np.array_equal(top1, greedy)

    one = np.repeat(context[:1], 4000, axis=0)
    first = decoding.generate(model, one, decoding.Settings(method="sample", max_len=1), seed=0)[:, 0]
    import jax

    def first_token_probs(model, context, start):
        memory, mask = model.encode(context)
        return jax.nn.softmax(model.decode(start, memory, mask)[:, -1] @ model.embeddings[...].T)

    start = np.asarray([[model.cfg.decoder_start[0]]])
    probs = np.asarray(jax.jit(first_token_probs)(model, one[:1], start))[0]
    freq = np.bincount(first, minlength=len(probs)) / len(first)
    assert 0.5 * np.abs(freq - probs).sum() < 0.05


def test_generate_on_the_loaded_model_object(tmp_path):
    """``bb3x_jax.load(dir).generate`` (the public API) gives the same ids as the module function,
    and rejects bad settings by name."""
    hf, model, context = _blenderbot(False)
    hf.save_pretrained(tmp_path / "hf")
    loaded = api.load(str(tmp_path / "hf"))
    out = loaded.generate(context, method="beam", beam_size=3, max_len=MAX_LEN)
    ref = decoding.generate(model, context, decoding.Settings(method="beam", beam_size=3, max_len=MAX_LEN))
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="top_p"):
        loaded.generate(context, method="sample", top_p=0.0)
    with pytest.raises(ValueError, match="beam_size"):
        loaded.generate(context, method="greedy", beam_size=4)


def test_ngram_bans_on_a_worked_example():
    """The banned tokens are exactly the continuations of the hypothesis's last n-1 tokens in the
    source, ignoring padded and not-yet-generated positions."""
    source = np.array([[5, 6, 7, 5, 6, 9, 0, 0]])
    valid = source != 0

    def banned(hypothesis, length, n):
        bans = decoding._ngram_bans(source, valid, np.array([hypothesis]), length, n, 12)
        return sorted(np.flatnonzero(np.asarray(bans)[0]).tolist())

    assert banned([4, 5, 6, 0], 3, 3) == [7, 9]  # "5 6" continues with 7 and 9
    assert banned([4, 9, 6, 0], 3, 3) == []  # "9 6" never occurs
    assert banned([4, 9, 6, 0], 3, 2) == [7, 9]  # "6" continues with 7 and 9
    assert banned([4, 9, 6, 0], 2, 2) == []  # "9" is followed only by padding
    assert banned([4, 5, 6, 0], 1, 3) == []  # fewer than n-1 tokens generated
    assert banned([0, 0, 0, 0], 0, 1) == [5, 6, 7, 9]  # unigrams: every source token


@pytest.mark.parametrize("ids, bad", [([5, 1000000000], 1000000000), ([5, 4000], 4000), ([5, -3, 7], -3),
                                      (np.array([[1, 2], [3, 4000]]), 4000), ([[1, 2], [5, -1]], -1)])
def test_check_ids_names_the_first_id_outside_the_vocabulary(ids, bad):
    with pytest.raises(ValueError, match=rf"^input:3: id {bad} is outside the vocabulary \[0, 4000\)$"):
        decoding.check_ids(ids, 4000, "input:3")
    decoding.check_ids([[0, 3999], [1]], 4000, "input:3")  # ragged rows, both ends of the range: fine
