"""Framing: a checkpoint's pairs become exactly what its own agent builds (ParlAI's agents, BB3's OPT
prompt), through the pipeline and the ``encode`` command as well."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest

import bb3x_jax
from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data import pipeline, prompts
from bb3x_jax.data.framing import Framing
from bb3x_jax.data.tokenizers import files as tokenizer_files
from tests import REPO
from tests import checkpoint_fixtures as fx


@pytest.fixture(scope="module")
def datapath(tmp_path_factory):
    """A ParlAI datapath whose gpt2/ holds the BPE files (where ParlAI's gpt2 dictionary reads them)."""
    root = tmp_path_factory.mktemp("framing")
    fx.gpt2_bpe(str(root / "data" / "gpt2"))
    return str(root / "data")


def _pairs(n: int = 40, seed: int = 0) -> tuple[list[str], list[str]]:
    """Contexts of 1 to 12 turns (some long enough to be truncated, some with blank lines and odd
    whitespace) and labels of 1 to 30 words (long ones lose ParlAI's end token)."""
    rng = random.Random(seed)
    words = fx.corpus(seed, 400).split()

    def turn():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))

    contexts = ["\n".join(turn() for _ in range(rng.randint(1, 12))) for _ in range(n)]
    contexts[0] = "hi"
    contexts[1] = "hello  \n\nhow are you?\n \nfine"
    labels = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]
    return contexts, labels


def _agent_vectors(path: str, datapath: str, contexts, labels):
    """(text_vec, labels_vec) ParlAI's own agent builds for each pair, as the release feeds it: the
    context one text, the label the message's text."""
    from parlai.core.agents import create_agent_from_model_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agent = create_agent_from_model_file(path, {"datapath": datapath, "datatype": "train"})
        out = []
        for context, label in zip(contexts, labels):
            obs = agent.observe({"text": context, "labels": [label], "episode_done": True})
            out.append((obs["text_vec"].tolist(), obs["labels_vec"].tolist()))
            agent.reset()
    return out


@pytest.mark.parlai
@pytest.mark.parametrize("model, extra", [
    ("bart", ()),
    ("transformer/generator", ()),
    ("bart", ("--history-add-global-end-token", "end", "--delimiter", "  ")),
    ("transformer/generator", ("--history-add-global-end-token", "end")),
], ids=["bart", "generator", "bart-global-end-delimiter", "generator-global-end"])
def test_framing_equals_the_checkpoints_own_parlai_agent(datapath, tmp_path, model, extra):
    """For a checkpoint saved by ParlAI's agent (bart as BB3-3B, or the plain generator), every pair's
    encoder input and decoder target equal what that agent vectorises: left truncation to the opt's
    text_truncate, the bart wrap, the global end token, a truncated label losing __end__; the
    delimiter option (only between history entries) never enters."""
    path = fx.parlai_agent_save(str(tmp_path / "model"), datapath, model=model, text_truncate=24,
                                label_truncate=9, extra_args=extra)
    loaded = bb3x_jax.load(path, bpe_dir=os.path.join(datapath, "gpt2"))
    framing = loaded.framing()
    assert (framing.text_truncate, framing.label_truncate, framing.label) == (24, 9, "parlai")
    assert framing.context == ("bart" if model == "bart" else "plain")
    assert framing.global_end_token == bool(extra)
    contexts, labels = _pairs()
    ours = framing_lib.frame_pairs(contexts, labels, loaded.tokenizer, framing)
    theirs = _agent_vectors(path, datapath, contexts, labels)
    assert ours == theirs
    assert any(len(lab) == 9 and lab[-1] != 2 for _, lab in ours), "some label must lose its end token"
    assert any(len(ctx) == 24 for ctx, _ in ours), "some context must be truncated"

    # The pipeline's batches (and its token cache) hold the same rows.
    config = pipeline.PipelineConfig(global_batch_size=8, text_truncate=24, label_truncate=9, shuffle=False,
                                     num_epochs=1, drop_remainder=False, prefetch=0, context_framing=framing.context,
                                     label_framing=framing.label, global_end_token=framing.global_end_token)
    source = [{"context": c, "label": lab, "feedback": 1} for c, lab in zip(contexts, labels)]
    rows = []
    for batch in pipeline.BatchIterator(source, loaded.tokenizer, config, process_index=0, process_count=1):
        for ctx, lab, valid in zip(batch["context_ids"], batch["label_ids"], batch["valid"]):
            if valid:
                rows.append(([int(t) for t in ctx if t != 0], [int(t) for t in lab if t != 0]))
    assert rows == theirs


@pytest.mark.parlai
def test_encode_command_prints_what_parlais_agent_builds(datapath, tmp_path):
    """`python -m bb3x_jax.data encode --tokenizer MODEL_FILE` prints, per {"context", "label"} line,
    the ids ParlAI's agent of that checkpoint builds; a bad line and a missing file are one-line errors."""
    path = fx.parlai_agent_save(str(tmp_path / "model"), datapath, model="bart", text_truncate=24, label_truncate=9)
    contexts, labels = _pairs(12, seed=3)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"context": c, "label": lab}) + "\n" for c, lab in zip(contexts, labels)))
    out = _encode("--tokenizer", path, "--bpe_dir", os.path.join(datapath, "gpt2"), "--input", str(pairs))
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(g["context_ids"], g["label_ids"]) for g in got] == _agent_vectors(path, datapath, contexts, labels)

    missing = _encode("--tokenizer", path, "--input", str(pairs))  # the BPE files are not beside it
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "encoder.json" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "hi", "label": "yo"}\n{"context": 3}\n')
    failed = _encode("--tokenizer", path, "--bpe_dir", os.path.join(datapath, "gpt2"), "--input", str(bad))
    assert failed.returncode == 2 and f"{bad}:2:" in failed.stderr and "Traceback" not in failed.stderr


def _encode(*args):
    return subprocess.run([sys.executable, "-m", "bb3x_jax.data", "encode", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


# --- BB3's OPT prompt ------------------------------------------------------------------------------
def test_bb3_opt_prompt_text():
    """The prompt is the vanilla dialogue instruction, the turns with speakers counted from the end
    (the last is Person 1), blank and __SILENCE__ lines skipped but holding their speaker's place,
    persona lines first, then "Person 2:"."""
    context = "your persona: I like tea\nhi there\nhello! how are you?\n\n__SILENCE__\nfine, and you?"
    turns = prompts.bb3_opt_turns(context)
    assert turns == ["your persona: I like tea", "Person 1: hi there", "Person 2: hello! how are you?",
                     "Person 1: fine, and you?"]
    assert prompts.render_bb3_opt_prompt(turns) == (
        "A conversation between two persons.\n\nyour persona: I like tea\nPerson 1: hi there\n"
        "Person 2: hello! how are you?\nPerson 1: fine, and you?\nPerson 2:")
    assert prompts.render_bb3_opt_prompt([]) == "Person 2:"
    assert prompts.bb3_opt_turns("just one")[-1] == "Person 1: just one"


def _bb3_prompt_history_class():
    """BB3's BB3PromptHistory: its class statements, run from projects/bb3/agents/opt_api_agent.py as the
    ParlAI 1.7.2 wheel ships it (importing that module pulls in its whole serving stack: search,
    safety, NLTK data)."""
    import ast
    import importlib.util
    import itertools
    import logging
    from typing import List, Optional

    import projects.bb3.prompts as PROMPT
    from projects.bb3.agents.module import Module

    origin = importlib.util.find_spec("projects.bb3.agents.opt_api_agent").origin
    with open(origin) as f:
        tree = ast.parse(f.read(), origin)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("SimplePromptHistory",
                                                                                 "BB3PromptHistory")]
    namespace = {"itertools": itertools, "Optional": Optional, "List": List, "Opt": dict, "DictionaryAgent": object,
                 "PROMPT": PROMPT, "Module": Module, "logging": logging}
    exec(compile(ast.Module(classes, type_ignores=[]), origin, "exec"), namespace)
    return namespace["BB3PromptHistory"]


@pytest.mark.parlai
def test_bb3_opt_prompt_equals_bb3s_prompt_history():
    """The rendered prompt equals BB3's own BB3PromptHistory (vrm module, no shots) on the same text."""
    BB3PromptHistory = _bb3_prompt_history_class()
    contexts, _ = _pairs(30, seed=5)
    contexts += ["your persona: I like tea\nhi\n\n__SILENCE__\nyo", "Opening\nhello"]
    for context in contexts:
        history = BB3PromptHistory(opt={"module": "vrm", "include_prompt": True, "all_vanilla_prompt": False,
                                        "num_shots": 0})
        history.observe_other(context)
        assert prompts.render_bb3_opt_prompt(prompts.bb3_opt_turns(context)) == \
            history.render_flattened(history.turns), context


@pytest.fixture(scope="module")
def hf_opt(tmp_path_factory, datapath):
    folder = str(tmp_path_factory.mktemp("hfopt") / "opt")
    gpt2 = os.path.join(datapath, "gpt2")
    return fx.hf_opt_dir(folder, os.path.join(gpt2, "encoder.json"), os.path.join(gpt2, "vocab.bpe"))


def test_bb3_opt_framing_ids(hf_opt):
    """OPT checkpoints frame as BB3's prompt: [</s>] + the prompt as transformers' own OPT tokenizer
    encodes it (the longest run of latest turns that fits text_truncate, dropping the fewest), and the
    label " " + response + [</s>]."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(hf_opt)
    model = bb3x_jax.load(hf_opt)
    assert model.framing().context == "bb3_opt_prompt"
    tok = model.tokenizer
    contexts, labels = _pairs(30, seed=7)
    for truncate in (60, 120, 400):
        framing = Framing(truncate, 10, context="bb3_opt_prompt")
        for (ctx_ids, lab_ids), context, label in zip(framing_lib.frame_pairs(contexts, labels, tok, framing),
                                                      contexts, labels):
            turns = prompts.bb3_opt_turns(context)
            fitting = [d for d in range(len(turns) + 1)
                       if len(reference(prompts.render_bb3_opt_prompt(turns[d:]))["input_ids"]) <= truncate]
            assert ctx_ids == reference(prompts.render_bb3_opt_prompt(turns[fitting[0]:]))["input_ids"]
            assert lab_ids == (reference(" " + label, add_special_tokens=False)["input_ids"][:9] + [2])
    lengths = [len(ids) for ids, _ in framing_lib.frame_pairs(contexts, labels, tok, Framing(120, 10,
                                                                context="bb3_opt_prompt"))]
    assert max(lengths) <= 120 and len(set(lengths)) > 10  # turns dropped where needed, not everywhere


def test_auto_framing_follows_the_tokenizer(datapath, tmp_path, hf_opt):
    """auto framing: plain for this project's sentencepiece models, the agent's for a ParlAI checkpoint,
    BB3's prompt for OPT; explicit settings override; unsupported ParlAI history options are refused."""
    gpt2 = os.path.join(datapath, "gpt2")
    path = fx.parlai_trio_by_hand(str(tmp_path / "m" / "model"), os.path.join(gpt2, "encoder.json"))
    spec = tokenizer_files.resolve("checkpoint", path, bpe_dir=gpt2)
    assert framing_lib.for_tokenizer(None, 64, 16) == Framing(64, 16)
    assert framing_lib.for_tokenizer(spec, 64, 16) == Framing(64, 16, context="bart", label="parlai")
    assert framing_lib.for_tokenizer(spec, 64, 16, label="end_kept").label == "end_kept"
    hf_spec = tokenizer_files.resolve("checkpoint", hf_opt)
    assert framing_lib.for_tokenizer(hf_spec, 64, 16).context == "bb3_opt_prompt"
    with pytest.raises(ValueError, match="person_tokens=True"):
        framing_lib.parlai_framing({**spec.opt, "person_tokens": True}, 64, 16)
    with pytest.raises(ValueError, match="text_truncate >= 3"):
        Framing(2, 16, context="bart")


def test_frame_rows_pad_and_lengths(datapath, tmp_path):
    """context_ids pads rows to the longest with the pad id; a global end token keeps its place under
    left truncation."""
    gpt2 = os.path.join(datapath, "gpt2")
    path = fx.parlai_trio_by_hand(str(tmp_path / "m" / "model"), os.path.join(gpt2, "encoder.json"),
                                  model="transformer/generator")
    tok = tokenizer_files.load_path("parlai", path, bpe_dir=gpt2)
    texts = ["hi", "hello there how are you doing today my friend"]
    framing = Framing(6, 4, global_end_token=True)
    ids = framing_lib.context_ids(texts, tok, framing)
    full = [tok.encode(t) for t in texts]
    assert ids[0].tolist() == full[0] + [2] + [0] * (6 - len(full[0]) - 1)
    assert ids[1].tolist() == full[1][-5:] + [2]
    assert ids.dtype == np.int32
