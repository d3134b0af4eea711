"""The feedback classifier (``--mode=train_judge``): model, loss, input rows, the mode end to end, the loader."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests import REPO

JUDGE_FLAGS = (
    "--config.data.synthetic.conversations=300", "--config.data.tokenizer.vocab_size=1000",
    "--config.judge.d_model=32", "--config.judge.n_heads=2", "--config.judge.ffn_dim=64",
    "--config.judge.n_layers=1", "--config.judge.max_len=48", "--config.judge.steps=30",
    "--config.judge.batch_size=16",
)


def run_judge_mode(workdir, *overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "main.py", "--config", "configs/cringe.py", f"--workdir={workdir}",
               "--mode=train_judge", *JUDGE_FLAGS, *overrides]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=True)


# --- a toy world: responses that contain "banana" are good ------------------------------------
_WORDS = ("apple cherry grape lemon mango melon olive peach pear plum "
          "red green blue cold warm quick slow big small very").split()


def _sentence(rng, n, extra=()):
    words = list(rng.choice(_WORDS, n)) + list(extra)
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory):
    from bb3x_jax.data.tokenizers import base as tokenizer_lib

    rng = np.random.default_rng(0)
    texts = [_sentence(rng, 6, ["banana"] if i % 3 == 0 else []) for i in range(600)]
    return tokenizer_lib.train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm") / "toy.model"), vocab_size=400,
                                             num_threads=1, extra_options={"hard_vocab_limit": False})


def _toy_pairs(rng, n):
    contexts, responses, labels = [], [], []
    for _ in range(n):
        good = bool(rng.random() < 0.5)
        contexts.append("\n".join(_sentence(rng, 5) for _ in range(int(rng.integers(1, 4)))))
        responses.append(_sentence(rng, int(rng.integers(2, 6)), ["banana"] if good else []))
        labels.append(int(good))
    return contexts, responses, np.asarray(labels, np.int32)


def test_classifier_learns_a_separable_signal(toy_tokenizer):
    """Model + class-weighted loss + jitted AdamW step learn a trivially separable rule (the response has
    "banana" or not) to > 95% held-out accuracy in a few dozen steps: the training path works at all."""
    from bb3x_jax.eval import judges
    from bb3x_jax.model import classifier
    from bb3x_jax.modes import train_judge as judge_train

    rng = np.random.default_rng(1)
    cfg = classifier.ClassifierConfig(vocab_size=toy_tokenizer.vocab_size, d_model=32, n_heads=2, ffn_dim=64,
                                      n_layers=1, max_len=32, dropout=0.0)
    contexts, responses, labels = _toy_pairs(rng, 400)
    ids = judges.encode(contexts, responses, toy_tokenizer, cfg.max_len)
    graphdef, params, rest, history = judge_train.train_classifier(cfg, ids, labels, steps=40, batch_size=32,
                                                                    learning_rate=3e-3, seed=0)
    assert history[-1]["loss"] < history[0]["loss"]
    held_contexts, held_responses, held_labels = _toy_pairs(rng, 200)
    judge = judges.FeedbackJudge(cfg, params, toy_tokenizer)
    verdicts = judge.verdicts(held_contexts, held_responses, batch_size=64)
    accuracy = np.mean([(v == "good") == bool(y) for v, y in zip(verdicts, held_labels)])
    assert accuracy > 0.95, accuracy


def test_encoded_rows_keep_the_response_whole_and_the_context_tail(toy_tokenizer):
    """A row is [pad...] + the context's last tokens + separator (end id) + the whole response: the
    response is never cut for context, the context is cut from the left exactly as ParlAI frames it."""
    from bb3x_jax.data.tokenizers import base as tokenizer_lib
    from bb3x_jax.model import classifier

    tok, max_len = toy_tokenizer, 16
    context = "\n".join(["apple cherry grape lemon", "mango melon olive peach", "pear plum red green blue"] * 3)
    responses = ["banana", "cold warm quick slow big small very apple cherry", ""]
    assert len(tok.encode(context)) > 2 * max_len  # the context must be cut
    rows = classifier.encode_pairs([context] * 3, responses, tok, max_len)
    assert rows.shape == (3, max_len) and rows.dtype == np.int32
    for row, response in zip(rows, responses):
        response_ids = tok.encode(response)
        sep = int(np.flatnonzero(row == tok.end_id)[0])
        assert list(row[sep + 1 :]) == response_ids  # whole, at the end (left padding)
        padding = int((row == tok.pad_id).sum())
        assert (row[:padding] == tok.pad_id).all()  # left padding only
        room = max_len - 1 - len(response_ids)
        assert list(row[padding:sep]) == tokenizer_lib.encode_context(context, tok, room)
    long_response = " ".join(["banana apple"] * 20)
    (row,) = classifier.encode_pairs([context], [long_response], tok, max_len)
    assert row[0] == tok.end_id and list(row[1:]) == tok.encode(long_response)[: max_len - 1]
    short = classifier.encode_pairs([""], ["banana"], tok, max_len)[0]
    assert list(short[short != tok.pad_id]) == [tok.end_id] + tok.encode("banana")


def test_the_loss_weights_both_classes_equally():
    """With 90/10 imbalanced labels the class weights make the loss (mean BCE of positives + mean BCE of
    negatives) / 2: checked against a hand computation, so the rare class is not drowned out."""
    import jax.numpy as jnp

    from bb3x_jax.model import classifier

    labels = np.array([1] * 9 + [0])
    logits = np.array([2.0, 1.0, 0.5, -0.5, 3.0, 0.0, 1.5, -1.0, 0.25, 0.75], np.float32)
    w_pos, w_neg = classifier.class_weights(labels)
    assert w_pos == pytest.approx(10 / 18) and w_neg == pytest.approx(5.0)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    bce_pos = [softplus(-z) for z in logits[:9]]
    bce_neg = [softplus(logits[9])]
    by_hand = (w_pos * sum(bce_pos) + w_neg * sum(bce_neg)) / (9 * w_pos + 1 * w_neg)
    assert by_hand == pytest.approx(0.5 * np.mean(bce_pos) + 0.5 * np.mean(bce_neg))
    loss = classifier.weighted_bce(jnp.asarray(logits), jnp.asarray(labels), (w_pos, w_neg))
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    unweighted = float(np.mean(bce_pos + bce_neg))
    assert float(classifier.weighted_bce(jnp.asarray(logits), jnp.asarray(labels), (1.0, 1.0))) == pytest.approx(
        unweighted, rel=1e-5)
    # Invalid rows count for nothing.
    padded = classifier.weighted_bce(jnp.asarray(np.append(logits, 9.0)), jnp.asarray(np.append(labels, 0)),
                                     (w_pos, w_neg), valid=jnp.asarray([True] * 10 + [False]))
    assert float(padded) == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(ValueError, match="both classes"):
        classifier.class_weights(np.ones(5))


def test_judge_config_is_validated():
    """A judge setting that cannot work fails at start-up naming its key."""
    from bb3x_jax import config as config_lib
    from configs import cringe

    config = cringe.get_config()
    config.judge.n_heads = 3
    with pytest.raises(config_lib.ConfigError, match="judge.d_model"):
        config_lib.validate(config)
    config = cringe.get_config()
    config.judge.steps = 0
    with pytest.raises(config_lib.ConfigError, match="judge.steps"):
        config_lib.validate(config)


def test_canned_responses_keep_their_own_feedback_for_the_judge():
    """With judge.label_canned the judge's policy is the run's without its ``canned`` rule, so a liked
    safety deflection is a positive for the judge (the run's policy leaves it unlabeled for CRINGE);
    without it the judge follows the run's policy."""
    from bb3x_jax.data import schema
    from bb3x_jax.modes import train_judge as judge_train
    from configs import cringe

    config = cringe.get_config()
    liked_deflection = {"isSafetyControlledResponse": True, "isLiked": True, "isDisliked": False}
    run_policy = judge_train.config_lib.feedback_policy(config)
    assert run_policy.classify(liked_deflection) == (schema.UNLABELED, "canned")
    policy = judge_train.judge_policy(config)
    assert "canned" not in policy.order and policy.classify(liked_deflection) == (schema.POSITIVE, "like")
    assert {k: v for k, v in policy.to_dict().items() if k != "order"} == {
        k: v for k, v in run_policy.to_dict().items() if k != "order"}
    config.judge.label_canned = False
    assert judge_train.judge_policy(config) is None


def _tiny_dialogue(tokenizer, seed: int = 3):
    """A random tiny encoder-decoder with ``tokenizer``'s ids, and its parameters."""
    from flax import nnx

    from bb3x_jax.model import build
    from bb3x_jax.model.config import ModelConfig

    model_cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, ffn_dim=64, n_encoder_layers=1,
                            n_decoder_layers=1, n_positions=32, pad_id=tokenizer.pad_id, start_id=tokenizer.start_id,
                            end_id=tokenizer.end_id, decoder_start=(tokenizer.start_id,))
    network = build.build(model_cfg, seed=seed)
    return model_cfg, network, nnx.state(network, nnx.Param)


def test_dialogue_classifier_reads_the_pair_as_the_dialogue_model_does(toy_tokenizer):
    """The dialogue arch starts from the given network's exact parameters; its config survives a JSON
    round trip (meta.json); a row is the framed context row then the framed label row (what the
    dialogue model was trained on); logits are finite for real rows, an empty context and the
    batch filler rows."""
    import jax
    from flax import nnx

    from bb3x_jax.data import framing as framing_lib
    from bb3x_jax.model import classifier

    tok = toy_tokenizer
    model_cfg, _, network_params = _tiny_dialogue(tok)
    framing = framing_lib.Framing(text_truncate=20, label_truncate=10)
    cfg = classifier.ClassifierConfig.for_dialogue(model_cfg, framing, dropout=0.1, pad_id=tok.pad_id,
                                                   sep_id=tok.end_id)
    assert cfg.max_len == 30 and cfg.dialogue.dropout == 0.1 and cfg.input_framing() == framing
    assert classifier.ClassifierConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = classifier.build(cfg, 0, network_params)
    for a, b in zip(jax.tree.leaves(nnx.state(model.network, nnx.Param)), jax.tree.leaves(network_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    contexts = ["apple cherry\n" * 8 + "grape lemon", "", "mango"]
    responses = ["banana pear", "plum", " ".join(["red green"] * 10)]
    rows = classifier.encode_rows(cfg, contexts, responses, tok)
    assert rows.shape == (3, 30) and rows.dtype == np.int32
    want_context = framing_lib.frame_context_rows(contexts, tok, framing).padded(3, 20, tok.pad_id)
    want_label = framing_lib.frame_label_rows(responses, tok, framing).padded(3, 10, tok.pad_id)
    np.testing.assert_array_equal(rows[:, :20], want_context)
    np.testing.assert_array_equal(rows[:, 20:], want_label)
    assert rows[0, 20 + len(tok.encode("banana pear"))] == tok.end_id and rows[2, -1] == tok.end_id  # end kept
    logits = np.asarray(model(np.concatenate([rows, classifier.padding_rows(cfg, 2)])))
    assert logits.shape == (5,) and np.isfinite(logits).all()
    with pytest.raises(ValueError, match="encoder-decoder"):
        classifier.ClassifierConfig.for_dialogue(model_cfg.replace(arch="decoder_only", n_encoder_layers=0), framing,
                                                 dropout=0.0, pad_id=tok.pad_id, sep_id=tok.end_id)


def test_dialogue_classifier_trains_and_judges_batch_independently(toy_tokenizer):
    """The dialogue arch learns the toy rule (the response has "banana") through the same training
    step (its network's dropout streams reseeded per step), the same seed gives the same parameters,
    and a judge's verdicts do not depend on the prediction batch size (filler rows change nothing)."""
    import jax

    from bb3x_jax.data import framing as framing_lib
    from bb3x_jax.eval import judges
    from bb3x_jax.model import classifier
    from bb3x_jax.modes import train_judge as judge_train

    tok = toy_tokenizer
    model_cfg, _, _ = _tiny_dialogue(tok)
    cfg = classifier.ClassifierConfig.for_dialogue(model_cfg, framing_lib.Framing(20, 10), dropout=0.1,
                                                   pad_id=tok.pad_id, sep_id=tok.end_id)
    rng = np.random.default_rng(1)
    contexts, responses, labels = _toy_pairs(rng, 300)
    ids = judges.encode_rows(cfg, contexts, responses, tok)
    train = dict(steps=60, batch_size=32, learning_rate=3e-3, seed=0)
    _, params, _, history = judge_train.train_classifier(cfg, ids, labels, **train)
    assert history[-1]["loss"] < history[0]["loss"]
    _, again, _, _ = judge_train.train_classifier(cfg, ids, labels, **train)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    judge = judges.FeedbackJudge(cfg, params, tok)
    held_contexts, held_responses, held_labels = _toy_pairs(rng, 100)
    verdicts = judge.verdicts(held_contexts, held_responses, batch_size=64)
    accuracy = np.mean([(v == "good") == bool(y) for v, y in zip(verdicts, held_labels)])
    assert accuracy > 0.9, accuracy
    assert judge.verdicts(held_contexts[:9], held_responses[:9], batch_size=4) == verdicts[:9]


# --- the mode end to end -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("judge_run"))
    result = run_judge_mode(workdir)
    return workdir, result.stdout


def _metrics(report):
    """The report without wall-clock fields."""
    report = json.loads(json.dumps(report))
    report["train"].pop("seconds")
    report["train"].pop("data_seconds")
    return report


def test_train_judge_writes_the_judge_and_a_consistent_report(judged):
    """main.py --mode=train_judge writes judge/{params.npz,meta.json,report.json}; the report's rates are in
    [0, 1] and its counts add up (labelled = good + bad, examples = labelled + unlabeled, confusion = counts)."""
    workdir, stdout = judged
    directory = os.path.join(workdir, "judge")
    assert sorted(os.listdir(directory)) == ["meta.json", "params.npz", "report.json", "tokenizer"]
    assert sorted(os.listdir(os.path.join(directory, "tokenizer"))) == ["bb3x_tokenizer.json", "sentencepiece.model"]
    assert not [n for n in os.listdir(workdir) if ".tmp-" in n or n.endswith(".old")]
    meta = json.load(open(os.path.join(directory, "meta.json")))
    assert meta["max_len"] == 48 and meta["steps"] == 30 and meta["seed"] == 0
    assert meta["tokenizer"]["kind"] == "sentencepiece" and len(meta["tokenizer"]["fingerprint"]) == 16
    assert meta["classifier"]["d_model"] == 32 and meta["classifier"]["n_layers"] == 1
    report = json.load(open(os.path.join(directory, "report.json")))
    train = report["train"]
    assert train["labelled"] == train["positive"] + train["negative"] > 0
    assert train["examples"] == train["labelled"] + train["unlabeled_skipped"]
    assert train["unlabeled_skipped"] > 0
    held = report["eval"]
    labelled = held["labelled"]
    assert held["examples"] == labelled["count"] + held["unlabeled"]
    tables = [labelled, report["ground_truth"], report["ground_truth"]["labelled"], report["ground_truth"]["unlabeled"]]
    for m in tables:
        c = m["confusion"]
        assert m["count"] == m["good"] + m["bad"] == m["predicted_good"] + m["predicted_bad"]
        assert c["good_as_good"] + c["good_as_bad"] == m["good"] and c["bad_as_bad"] + c["bad_as_good"] == m["bad"]
        for key in ("accuracy", "balanced_accuracy", "precision_good", "recall_good", "precision_bad", "recall_bad",
                    "majority_baseline_accuracy"):
            assert m[key] is None or 0.0 <= m[key] <= 1.0, (key, m[key])
    assert labelled["count"] > 0 and labelled["accuracy"] is not None
    truth = report["ground_truth"]
    assert truth["count"] == held["examples"]  # every held-out bot response, labelled or not
    assert truth["labelled"]["count"] + truth["unlabeled"]["count"] == truth["count"]
    assert sum(v["count"] for v in truth["called_bad_by_true_reason"].values()) == truth["count"]
    assert "agreement with synthetic.judge" in stdout
    # The recall of every true bad reason is reported; together they make up the bad class's recall.
    reasons = {k: v for k, v in truth["called_bad_by_true_reason"].items() if k != "good"}
    assert sum(v["count"] for v in reasons.values()) == truth["bad"]
    called_bad = sum(v["called_bad"] * v["count"] for v in reasons.values())
    assert called_bad == pytest.approx(truth["confusion"]["bad_as_bad"])
    for reason, v in reasons.items():
        assert f"{reason:<19s}{v['count']:>7d}" in stdout and "(recall)" in stdout
    assert 'precision of "bad"' in stdout and "(false alarms)" in stdout
    assert train["relabelled"] >= 0 and json.load(open(os.path.join(directory, "meta.json")))["label_canned"] is True
    assert json.loads(stdout.strip().splitlines()[-1])["judge"] == directory


def test_loaded_judge_gives_deterministic_verdicts(judged):
    """load_judge on the written directory returns "good"/"bad" per pair, the same answers on a second
    call and through __call__, and the same as the evaluation's threshold on P(good)."""
    from bb3x_jax.eval import judges

    workdir, _ = judged
    judge = judges.load_judge(os.path.join(workdir, "judge"))
    contexts = ["Hi!", "I love cooking.\nMe too! What do you cook?\nMostly pasta. What is your favorite dish?", ""]
    responses = ["Hello! Do you like music?", "My favorite dish is lasagna.", "stupid idiot"]
    first = judge.verdicts(contexts, responses)
    assert len(first) == 3 and set(first) <= {"good", "bad"}
    assert judge.verdicts(contexts, responses, batch_size=2) == first
    assert [judge(c, r) for c, r in zip(contexts, responses)] == first
    assert judge.verdicts([], []) == []
    probabilities = judge.probabilities(contexts, responses)
    assert [("good" if p > 0.5 else "bad") for p in probabilities] == first
    assert judge.bad_reasons == ("bad",)


def test_same_seed_same_judge(judged, tmp_path):
    """A second run with the same config and seed (on a copy of the prepared data) gives the same report
    metrics and the same parameters: the mode is deterministic."""
    workdir, _ = judged
    again = str(tmp_path / "again")
    shutil.copytree(workdir, again, ignore=shutil.ignore_patterns("judge"))
    run_judge_mode(again)
    first = json.load(open(os.path.join(workdir, "judge", "report.json")))
    second = json.load(open(os.path.join(again, "judge", "report.json")))
    assert _metrics(first) == _metrics(second)
    a, b = np.load(os.path.join(workdir, "judge", "params.npz")), np.load(os.path.join(again, "judge", "params.npz"))
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name])


# --- the mode from a dialogue model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def dialogue_judged(judged, tmp_path_factory):
    """The mode with judge.init_from: a random tiny encoder-decoder saved as this project's checkpoint
    with the run's tokenizer (a trained one is what the experiment uses; training one here is slow)."""
    from bb3x_jax.data.tokenizers import files as tokenizer_files
    from bb3x_jax.eval import judges
    from bb3x_jax.model import api as model_api

    workdir, _ = judged
    root = tmp_path_factory.mktemp("dialogue_judge")
    spec = tokenizer_files.read_bundle(os.path.join(workdir, "judge", "tokenizer"))
    spec = tokenizer_files.TokenizerSpec(spec.kind, spec.files, spec.options, spec.opt, spec.source,
                                         framing={"text_truncate": 24, "label_truncate": 12, "context": "plain",
                                                  "label": "end_kept", "global_end_token": False})
    model_cfg, network, _ = _tiny_dialogue(judges.load_judge(os.path.join(workdir, "judge")).tokenizer)
    model_api.BB3Model(network, model_cfg, tokenizer_spec=spec).save_orbax(str(root / "model"))
    again = str(root / "run")
    shutil.copytree(workdir, again, ignore=shutil.ignore_patterns("judge"))
    result = run_judge_mode(again, f"--config.judge.init_from={root / 'model'}", "--config.judge.steps=6")
    return again, str(root / "model"), result.stdout


def test_a_judge_from_a_dialogue_model_is_written_and_loads(dialogue_judged):
    """With judge.init_from the mode fine-tunes the dialogue model: meta.json records the dialogue
    arch (the model's config and framing), the report says where it started, and load_judge gives
    the verdicts the evaluation's threshold gives."""
    from bb3x_jax.eval import judges

    workdir, model, stdout = dialogue_judged
    directory = os.path.join(workdir, "judge")
    meta = json.load(open(os.path.join(directory, "meta.json")))
    assert meta["classifier"]["arch"] == "dialogue" and meta["classifier"]["dialogue"]["d_model"] == 32
    assert meta["classifier"]["framing"]["text_truncate"] == 24 and meta["max_len"] == 36
    report = json.load(open(os.path.join(directory, "report.json")))
    assert report["train"]["init_from"].startswith(model) and f"from {model}" in stdout
    judge = judges.load_judge(directory)
    contexts = ["Hi!", "I love cooking.\nWhat do you cook?", ""]
    responses = ["Hello! Do you like music?", "Mostly pasta.", "stupid idiot"]
    verdicts = judge.verdicts(contexts, responses)
    assert verdicts == ["good" if p > 0.5 else "bad" for p in judge.probabilities(contexts, responses, batch_size=2)]


def test_init_from_must_share_the_runs_tokenizer(dialogue_judged, toy_tokenizer):
    """A dialogue model whose tokenizer is not the run's is refused, naming judge.init_from; so is a
    path without a model, with the hint to train one first."""
    from bb3x_jax import config as config_lib
    from bb3x_jax.modes import train_judge as judge_train
    from configs import cringe

    workdir, model, _ = dialogue_judged
    config = cringe.get_config()
    config.judge.init_from = model
    pretrained = judge_train.load_pretrained(config, workdir)
    with pytest.raises(config_lib.ConfigError, match="judge.init_from.*tokenizer"):
        judge_train.pretrained_classifier(pretrained, config, toy_tokenizer)
    config.judge.init_from = "workdir"
    with pytest.raises(config_lib.ConfigError, match="judge.init_from.*train one first"):
        judge_train.load_pretrained(config, os.path.join(workdir, "nothing_here"))


# --- loading errors -------------------------------------------------------------------------------
def test_a_missing_judge_directory_names_the_path(tmp_path):
    """load_judge on a directory that does not exist fails with an error naming that path."""
    from bb3x_jax.eval import judges

    missing = str(tmp_path / "no_such_judge")
    with pytest.raises(FileNotFoundError, match="no_such_judge"):
        judges.load_judge(missing)


def test_a_corrupt_or_incomplete_judge_names_the_path(judged, tmp_path):
    """A judge directory with a broken meta.json, or without its parameters, fails with an error that
    names the file, never with a half-loaded judge."""
    from bb3x_jax.eval import judges

    workdir, _ = judged
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(workdir, "judge"), broken)
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(judges.JudgeLoadError, match=str(broken / "meta.json")):
        judges.load_judge(str(broken))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(os.path.join(workdir, "judge"), incomplete)
    os.remove(incomplete / "params.npz")
    with pytest.raises(judges.JudgeLoadError, match="params.npz is missing"):
        judges.load_judge(str(incomplete))
