"""BB3 checkpoints end to end, per on-disk format: a tiny stand-in in the real format trains a few
CRINGE steps on a synthetic release with its own tokenizer and framing, is exported back to its
format, and PyTorch (ParlAI's agent, transformers) scores held-out pairs exactly as the trained
workdir does; the real-run configs run with such stand-ins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import bb3x_jax
from bb3x_jax.data import framing as framing_lib
from tests import checkpoint_fixtures as fx

pytestmark = pytest.mark.slow  # each test trains (compiles the step) in a subprocess

from tests import REPO

RUN_FLAGS = ("--config.data.synthetic.conversations=300", "--config.data.batch_size=8", "--config.train.steps=4",
             "--config.train.warmup_steps=1", "--config.train.log_every=2", "--config.train.eval_every=0",
             "--config.train.eval_batches=2", "--config.checkpoint.every_steps=4", "--config.data.num_workers=0")
CONTEXTS = ["hi", "hello there\nhow are you?", "I love music.\nWhat do you like?\nI like pasta and science",
            "why do you like the stars?\nbecause they are interesting\nreally? tell me more"]
LABELS = ["hello! do you like music?", "fine", "that sounds great, tell me more about your favorite pasta",
          "I do, the stars are so interesting"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """GPT-2 BPE files in a ParlAI datapath, and a folder the runs share their synthetic release in."""
    root = tmp_path_factory.mktemp("bb3")
    fx.gpt2_bpe(str(root / "data" / "gpt2"))
    return {"root": root, "datapath": str(root / "data"), "gpt2": str(root / "data" / "gpt2"),
            "data_dir": str(root / "shared")}


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _train(workdir: str, init_from: str, shared, *flags: str, config: str = "configs/cringe.py") -> str:
    run = subprocess.run([sys.executable, "main.py", "--config", config, f"--workdir={workdir}",
                          f"--config.train.init_from={init_from}", f"--config.data.dir={shared['data_dir']}",
                          *RUN_FLAGS, *flags], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _convert(src: str, dst: str, to: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "bb3x_jax.cli.convert", src, dst, "--to", to], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _token_nll(logits: np.ndarray, labels: list[list[int]]) -> list[np.ndarray]:
    """Per-token negative log-likelihood of each label under [n, T, V] logits."""
    log_probs = torch.log_softmax(torch.tensor(np.asarray(logits, np.float32)), dim=-1).numpy()
    return [-log_probs[i, np.arange(len(lab)), lab] for i, lab in enumerate(labels)]


def _our_nll(model) -> tuple[list, list, list[np.ndarray]]:
    """(encoder inputs, targets, per-token NLL) of the held-out pairs from a trained workdir."""
    contexts, labels, logits = fx.framed_logits(model, CONTEXTS, LABELS)
    return contexts, labels, _token_nll(logits, labels)


def _parlai_nll(model_file: str, datapath: str) -> tuple[list, list, list[np.ndarray]]:
    """The same from ParlAI's own agent for a checkpoint: its vectorisation, its model."""
    from parlai.core.agents import create_agent_from_model_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agent = create_agent_from_model_file(model_file, {"datapath": datapath, "datatype": "valid"})
    observations = []
    for context, label in zip(CONTEXTS, LABELS):
        observations.append(agent.observe({"text": context, "eval_labels": [label], "episode_done": True}))
        agent.reset()
    batch = agent.batchify(observations)
    agent.model.eval()
    with torch.no_grad():
        scores, _, _ = agent.model(batch.text_vec, ys=batch.label_vec)
    labels = [o["eval_labels_vec"].tolist() for o in observations]
    return [o["text_vec"].tolist() for o in observations], labels, _token_nll(scores.numpy(), labels)


def _hf_nll(directory: str, contexts: list, labels: list) -> list[np.ndarray]:
    """Per-token NLL of each label after its prompt from a transformers OPT directory."""
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(directory).eval()
    out = []
    for ctx, lab in zip(contexts, labels):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + lab[:-1]])).logits.numpy()[0]
        out.append(_token_nll(logits[None, len(ctx) - 1 :], [lab])[0])
    return out


def _assert_trained_and_equal(ours, reference, before):
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert max(float(np.abs(a - b).max()) for a, b in zip(reference, before)) > 1e-2, "training changed nothing"


@pytest.mark.parlai
def test_parlai_checkpoint_trains_exports_and_parlai_scores_it(shared, tmp_path):
    """ParlAI trio (agent.save(), bart as BB3-3B, gpt2 dictionary) -> CRINGE steps with its dictionary
    and the bart agent's framing -> convert --to parlai -> ParlAI's create_agent_from_model_file
    frames the held-out pairs as we do and its per-token NLL equals the trained workdir's (1e-4)."""
    source = fx.parlai_agent_save(str(tmp_path / "src" / "model"), shared["datapath"], model="bart",
                                  text_truncate=48, label_truncate=12)
    workdir = str(tmp_path / "run")
    _train(workdir, source, shared, f"--config.data.tokenizer.bpe_dir={shared['gpt2']}",
           "--config.data.text_truncate=48", "--config.data.label_truncate=12", "--config.data.context_buckets=(48,)",
           "--config.data.label_buckets=(12,)")
    export = str(tmp_path / "export" / "model")
    written = _convert(workdir, export, "parlai")["written"]
    assert written[:3] == [export, export + ".opt", export + ".dict"]
    assert open(export + ".dict", "rb").read() == open(source + ".dict", "rb").read()
    trained = bb3x_jax.load(workdir)
    assert trained.framing() == framing_lib.Framing(48, 12, context="bart", label="parlai")
    ours = _our_nll(trained)
    theirs = _parlai_nll(export, shared["datapath"])
    assert ours[:2] == theirs[:2]  # the same encoder inputs and targets
    _assert_trained_and_equal(ours[2], theirs[2], _parlai_nll(source, shared["datapath"])[2])


@pytest.mark.parametrize("kind", ["hf", "metaseq"])
def test_opt_checkpoint_trains_exports_and_transformers_scores_it(shared, tmp_path, kind):
    """A transformers OPT directory (save_pretrained of model and tokenizer) or a metaseq consolidated
    file (dict.txt, GPT-2 files beside it) -> CRINGE steps with its tokenizer and BB3's prompt ->
    convert --to hf -> transformers' model and tokenizer: the prompt's ids are its tokenizer's, and
    the per-token NLL equals the trained workdir's (1e-4)."""
    from transformers import AutoTokenizer

    encoder, merges = os.path.join(shared["gpt2"], "encoder.json"), os.path.join(shared["gpt2"], "vocab.bpe")
    if kind == "hf":
        source = fx.hf_opt_dir(str(tmp_path / "src"), encoder, merges)
    else:
        source = fx.metaseq_file(str(tmp_path / "src" / "consolidated.pt"), encoder, merges)
    workdir = str(tmp_path / "run")
    _train(workdir, source, shared, "--config.data.text_truncate=96", "--config.data.label_truncate=16",
           "--config.data.context_buckets=(96,)", "--config.data.label_buckets=(16,)")
    export = str(tmp_path / "export")
    _convert(workdir, export, "hf")
    trained = bb3x_jax.load(workdir)
    assert trained.framing().context == "bb3_opt_prompt"
    contexts, labels, ours = _our_nll(trained)
    reference = AutoTokenizer.from_pretrained(export)
    from bb3x_jax.data import prompts

    for context, ids in zip(CONTEXTS, contexts):
        assert ids == reference(prompts.render_bb3_opt_prompt(prompts.bb3_opt_turns(context)))["input_ids"]
    untrained = bb3x_jax.load(source)
    before_dir = str(tmp_path / "before")
    untrained.save_pytorch(before_dir, format="hf")
    _assert_trained_and_equal(ours, _hf_nll(export, contexts, labels), _hf_nll(before_dir, contexts, labels))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("release") / "release")
    subprocess.run([sys.executable, "-m", "bb3x_jax.data", "synthesize", "--out", folder, "--conversations", "200",
                    "--seed", "1"], cwd=REPO, env=_env(), check=True, capture_output=True)
    return folder


@pytest.mark.parametrize("config", ["bb3_3b", "bb3_3b-orbax", "bb3_30b", "bb3_175b"])
def test_real_run_configs_run_on_a_cpu_with_a_stand_in(shared, release, tmp_path, config):
    """`python main.py --config configs/<bb3 config>.py --config.train.init_from=STAND_IN
    --config.data.manual_dir=DIR --config.train.steps=3` finishes with nothing else overridden: the
    architecture, tokenizer and framing come from the checkpoint (a ParlAI trio in fp16 with its BPE
    files beside it for BB3-3B, or its orbax conversion as the README's quick start makes it; a
    metaseq file for 30B, a transformers directory for 175B)."""
    encoder, merges = os.path.join(shared["gpt2"], "encoder.json"), os.path.join(shared["gpt2"], "vocab.bpe")
    if config.startswith("bb3_3b"):
        stand_in = fx.parlai_trio_by_hand(str(tmp_path / "ckpt" / "model"), encoder, n_positions=1024, fp16=True)
        for path in (encoder, merges):
            os.link(path, tmp_path / "ckpt" / os.path.basename(path))
        if config.endswith("orbax"):
            _convert(stand_in, str(tmp_path / "orbax"), "orbax")
            stand_in, config = str(tmp_path / "orbax"), "bb3_3b"
    elif config == "bb3_30b":
        stand_in = fx.metaseq_file(str(tmp_path / "ckpt" / "consolidated.pt"), encoder, merges, positions=2048)
    else:
        stand_in = fx.hf_opt_dir(str(tmp_path / "ckpt"), encoder, merges, positions=2048)
    run = subprocess.run([sys.executable, "main.py", "--config", f"configs/{config}.py",
                          f"--workdir={tmp_path / 'run'}", f"--config.train.init_from={stand_in}",
                          f"--config.data.manual_dir={release}", "--config.train.steps=3"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert sum(v for k, v in summary["valid"].items() if k.startswith("examples_")) > 0  # validated
    bundle = json.load(open(tmp_path / "run" / "tokenizer" / "bb3x_tokenizer.json"))
    assert bundle["kind"] == {"bb3_3b": "parlai", "bb3_30b": "metaseq", "bb3_175b": "hf"}[config]
    assert bundle["framing"]["context"] == ("bart" if config == "bb3_3b" else "bb3_opt_prompt")
    if config == "bb3_3b":  # and back to ParlAI's three files
        _convert(str(tmp_path / "run"), str(tmp_path / "out" / "model"), "parlai")
        assert bb3x_jax.load(str(tmp_path / "out" / "model")).framing().text_truncate == 1024


def test_every_mode_runs_with_a_parlai_checkpoints_tokenizer(shared, tmp_path):
    """From a ParlAI checkpoint (its dictionary and bart framing, no sentencepiece anywhere): train,
    eval with generations, chat, train_judge, iterate, and the generate CLI (text in, text out,
    no --tokenizer) all run and speak text."""
    encoder = os.path.join(shared["gpt2"], "encoder.json")
    source = fx.parlai_trio_by_hand(str(tmp_path / "src" / "model"), encoder, text_truncate=48, label_truncate=12)
    workdir = str(tmp_path / "run")
    common = (f"--config.data.tokenizer.bpe_dir={shared['gpt2']}", "--config.data.text_truncate=48",
              "--config.data.label_truncate=12", "--config.data.context_buckets=(48,)",
              "--config.data.label_buckets=(12,)", "--config.eval.generate_examples=8", "--config.eval.generate_batch=8",
              "--config.eval.batches=2", "--config.generation.beam_size=2", "--config.generation.max_len=6",
              "--config.eval.checkpoint=latest", "--config.judge.steps=5", "--config.judge.max_len=32",
              "--config.iterate.iterations=1", "--config.iterate.contexts=16", "--config.iterate.steps=2")

    def main(mode: str, stdin: str | None = None) -> str:
        run = subprocess.run([sys.executable, "main.py", "--config", "configs/cringe.py", f"--workdir={workdir}",
                              f"--mode={mode}", f"--config.train.init_from={source}",
                              f"--config.data.dir={shared['data_dir']}", *RUN_FLAGS, *common],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200, input=stdin)
        assert run.returncode == 0, (mode, run.stderr[-3000:])
        return run.stdout

    main("train")
    main("eval")
    evaluation = json.load(open(os.path.join(workdir, "eval_valid.json")))
    assert evaluation["generation"]["examples"] == 8
    chat = main("chat", stdin="hi there\nwhat do you like?\n")
    assert chat.count("BOT:") == 2
    judge = json.loads(main("train_judge").strip().splitlines()[-1])
    assert judge["eval"]["labelled"]["count"] > 0
    assert json.load(open(os.path.join(workdir, "judge", "tokenizer", "bb3x_tokenizer.json")))["kind"] == "parlai"
    main("iterate")
    rows = json.load(open(os.path.join(workdir, "iterations", "results.json")))["rows"]
    assert [r["iteration"] for r in rows] == [0, 1]
    generated = subprocess.run([sys.executable, "-m", "bb3x_jax.cli.generate", workdir, "--max_len=6"], cwd=REPO,
                               env=_env(), capture_output=True, text=True, timeout=600,
                               input='{"context": "hello there\\nhow are you?"}\n')
    assert generated.returncode == 0, generated.stderr[-3000:]
    answer = json.loads(generated.stdout)
    assert isinstance(answer["response"], str) and answer["response_ids"]
    tok = bb3x_jax.load(workdir).tokenizer
    assert answer["response"] == tok.decode([t for t in answer["response_ids"] if t != 2]).strip()
