"""Tiny stand-ins for BB3's checkpoints, in their real on-disk formats, made here (no downloads).

* GPT-2 byte-level BPE files (``encoder.json`` / ``vocab.bpe``) trained with
  ``tokenizers`` on a small corpus: any text encodes (all 256 bytes are symbols).
* A ParlAI checkpoint as ParlAI's own ``agent.save()`` writes it (``model``,
  ``model.opt``, ``model.dict``; needs ParlAI), and the same three files written
  by hand in that layout (for the tests that run without ParlAI).
* A transformers OPT directory: ``save_pretrained`` of a random
  ``OPTForCausalLM`` and of transformers' own GPT-2 tokenizer with OPT's ids.
* A metaseq consolidated checkpoint with fairseq's ``dict.txt`` and GPT-2's
  ``gpt2-vocab.json`` / ``gpt2-merges.txt`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch

from bb3x_jax.data.tokenizers import bpe

_WORDS = ("hello hi how are you I do like love music cooking pasta science stars the a is what why "
          "because that sounds great interesting tell me more about your day? ! . , really yes no "
          "guitar movies books travel favorite fun").split()


def corpus(seed: int = 0, n: int = 6000) -> str:
    rng = random.Random(seed)
    seps = [" ", " ", " ", "? ", ". ", "\n", "! "]
    return "".join(rng.choice(_WORDS) + rng.choice(seps) for _ in range(n))


def gpt2_bpe(folder: str, vocab_size: int = 420) -> tuple[str, str]:
    """GPT-2-format BPE files ``folder/encoder.json`` and ``folder/vocab.bpe`` (paths)."""
    from tokenizers import ByteLevelBPETokenizer

    os.makedirs(folder, exist_ok=True)
    trainer = ByteLevelBPETokenizer(add_prefix_space=False)
    trainer.train_from_iterator([corpus()], vocab_size=vocab_size, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    trainer.save_model(folder)
    encoder, merges = os.path.join(folder, "encoder.json"), os.path.join(folder, "vocab.bpe")
    os.replace(os.path.join(folder, "vocab.json"), encoder)
    os.replace(os.path.join(folder, "merges.txt"), merges)
    return encoder, merges


# --- ParlAI ------------------------------------------------------------------------------------
ARCH = dict(embedding_size=16, n_heads=2, ffn_size=32, n_layers=2, n_positions=128)


def parlai_agent_save(path: str, datapath: str, *, model: str = "bart", text_truncate: int = 48,
                      label_truncate: int = 12, extra_args: tuple[str, ...] = (), **arch) -> str:
    """``path`` (+ ``.opt``, ``.dict``) written by ParlAI's own ``agent.save()`` for a fresh agent of
    ``model`` (``bart`` as BB3-3B, or ``transformer/generator``) with a gpt2 dictionary whose BPE
    files are in ``datapath/gpt2``; the weights are ParlAI's random initialisation."""
    from parlai.core.agents import create_agent
    from parlai.core.params import ParlaiParser

    arch = {**ARCH, **arch}
    args = ["--model", model, "--dict-tokenizer", "gpt2", "--datapath", datapath,
            "--embedding-size", str(arch["embedding_size"]), "--n-heads", str(arch["n_heads"]),
            "--ffn-size", str(arch["ffn_size"]), "--n-layers", str(arch["n_layers"]),
            "--n-encoder-layers", str(arch["n_layers"]), "--n-decoder-layers", str(arch["n_layers"]),
            "--n-positions", str(arch["n_positions"]), "--variant", "prelayernorm", "--activation", "gelu",
            "--learn-positional-embeddings", "True", "--lr-scheduler", "none", "--optimizer", "adamw",
            "--text-truncate", str(text_truncate), "--label-truncate", str(label_truncate),
            "--model-file", path, "--dropout", "0.0", *extra_args]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = ParlaiParser(True, True).parse_args(args)
        if model == "bart":
            opt["converting"] = True  # no download of fairseq's bart.large
        torch.manual_seed(0)
        agent = create_agent(opt)
        with torch.no_grad():  # non-trivial norms and biases
            for name, param in agent.model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    param.add_(0.1 * torch.randn_like(param))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        agent.save(path)
    return path


def parlai_trio_by_hand(path: str, encoder_json: str, *, model: str = "bart", text_truncate: int = 48,
                        label_truncate: int = 12, fp16: bool = False, seed: int = 0, **arch) -> str:
    """The three files ParlAI's ``agent.save()`` writes, written in its layout without ParlAI:
    ``{"model", "optimizer", "optimizer_type", "number_training_updates"}``, a JSON ``.opt`` with
    ParlAI's option names (no ``datapath``, as ParlAI saves it) and the gpt2 ``.dict``."""
    from bb3x_jax.model import build
    from bb3x_jax.model.config import ModelConfig
    from bb3x_jax.model.formats import parlai

    arch = {**ARCH, **arch}
    tokens, counts = bpe.parlai_gpt2_dict_tokens(encoder_json, fp16_pad=True)
    bart = model == "bart"
    cfg = ModelConfig(vocab_size=len(tokens), d_model=arch["embedding_size"], n_heads=arch["n_heads"],
                      ffn_dim=arch["ffn_size"], n_encoder_layers=arch["n_layers"],
                      n_decoder_layers=arch["n_layers"], n_positions=arch["n_positions"],
                      embeddings_scale=not bart, decoder_start=(2, 1) if bart else (1,),
                      mask_start_logit=not bart)
    network = build.build(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in parlai.state_dict_for_parlai(network, cfg).items():
        value = value + (0.1 * rng.standard_normal(value.shape).astype(np.float32) if "norm" in key else 0)
        state[key] = torch.from_numpy(np.asarray(value, np.float32)).to(torch.float16 if fp16 else torch.float32)
    state["encoder.embeddings.weight"] = state["decoder.embeddings.weight"] = state["embeddings.weight"]
    state["START"] = torch.tensor([cfg.start_id])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "params": []}]},
                "optimizer_type": "adamw", "number_training_updates": 7}, path)
    opt = {
        "model": model, "embedding_size": cfg.d_model, "n_heads": cfg.n_heads, "ffn_size": cfg.ffn_dim,
        "n_layers": arch["n_layers"], "n_encoder_layers": arch["n_layers"] if bart else -1,
        "n_decoder_layers": arch["n_layers"] if bart else -1, "n_positions": cfg.n_positions,
        "variant": "prelayernorm", "activation": "gelu", "learn_positional_embeddings": True,
        "embeddings_scale": not bart, "n_segments": 0, "output_scaling": 1.0, "share_word_embeddings": True,
        "dropout": 0.0, "attention_dropout": 0.0, "relu_dropout": 0.0, "dict_tokenizer": "gpt2",
        "dict_file": None, "model_file": path, "init_model": None, "fp16": fp16, "force_fp16_tokens": True,
        "text_truncate": text_truncate, "label_truncate": label_truncate, "truncate": -1, "delimiter": "\n",
        "history_add_global_end_token": None, "special_tok_lst": None, "person_tokens": False,
        "split_lines": False, "history_reversed": False, "datatype": "train", "dict_lower": False,
        "inference": "greedy", "beam_size": 1,
    }
    with open(path + ".opt", "w") as f:
        json.dump(opt, f, indent=4)
    bpe.write_parlai_dict(path + ".dict", tokens, counts)
    return path


# --- OPT: transformers and metaseq ---------------------------------------------------------------
def opt_ids(encoder_json: str) -> dict[str, int]:
    """OPT's ids for a GPT-2 vocabulary: ``<s> <pad> </s> <unk>`` then GPT-2 id + 4 (dict.txt order)."""
    with open(encoder_json, encoding="utf-8") as f:
        gpt2 = json.load(f)
    vocab = {name: i for i, name in enumerate(bpe.OPT_SPECIALS)}
    vocab.update({tok: gid + 4 for tok, gid in gpt2.items()})
    return vocab


def _random_opt(vocab_size: int, positions: int, seed: int):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=positions, pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0,
        attention_dropout=0.0, activation_function="relu", do_layer_norm_before=True, word_embed_proj_dim=16,
    )).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def hf_opt_dir(directory: str, encoder_json: str, vocab_bpe: str, *, positions: int = 160, seed: int = 0) -> str:
    """A transformers OPT directory: the model's and transformers' own tokenizer's ``save_pretrained``."""
    from transformers import GPT2Tokenizer

    vocab = opt_ids(encoder_json)
    rows = -(-len(vocab) // 8) * 8
    _random_opt(rows, positions, seed).save_pretrained(directory)
    staging = directory + "-vocab"
    os.makedirs(staging, exist_ok=True)
    with open(os.path.join(staging, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    tokenizer = GPT2Tokenizer(os.path.join(staging, "vocab.json"), vocab_bpe, bos_token="</s>", eos_token="</s>",
                              unk_token="</s>", pad_token="<pad>", add_bos_token=True, add_prefix_space=False)
    tokenizer.save_pretrained(directory)
    shutil.rmtree(staging)
    return directory


def metaseq_file(path: str, encoder_json: str, vocab_bpe: str, *, positions: int = 160, seed: int = 1) -> str:
    """A metaseq consolidated checkpoint (metaseq's key names and options) with fairseq's
    ``dict.txt`` and GPT-2's ``gpt2-vocab.json`` / ``gpt2-merges.txt`` beside it."""
    from tests.model.formats import test_metaseq

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    with open(encoder_json, encoding="utf-8") as f:
        gpt2 = json.load(f)
    rows = -(-(len(gpt2) + 4) // 8) * 8
    hf = _random_opt(rows, positions, seed)
    options = test_metaseq.options(decoder_layers=2, decoder_embed_dim=16, decoder_ffn_embed_dim=32,
                                   decoder_attention_heads=2, max_target_positions=positions)
    checkpoint = {"model": test_metaseq.singleton_state(hf),
                  "cfg": {"model": argparse.Namespace(**options),
                          "task": {"max_target_positions": positions}, "common": {"model_parallel_size": 1}},
                  "extra_state": {"epoch": 1}, "optimizer_history": []}
    torch.save(checkpoint, path)
    with open(os.path.join(folder, "dict.txt"), "w", encoding="utf-8") as f:
        for gid in sorted(gpt2.values()):
            f.write(f"{gid} {1000 - gid % 1000}\n")
    shutil.copyfile(encoder_json, os.path.join(folder, "gpt2-vocab.json"))
    shutil.copyfile(vocab_bpe, os.path.join(folder, "gpt2-merges.txt"))
    return path


def framed_logits(model, contexts, labels) -> tuple[list, list, np.ndarray]:
    """(encoder inputs, targets, teacher-forced logits [n, T, V]) of pairs under a loaded model's own
    tokenizer and framing."""
    from bb3x_jax.data import framing as framing_lib

    rows = framing_lib.frame_pairs(contexts, labels, model.tokenizer, model.framing())
    pad = model.config.pad_id
    ctx = np.full((len(rows), max(len(c) for c, _ in rows)), pad, np.int32)
    lab = np.full((len(rows), max(len(lb) for _, lb in rows)), pad, np.int32)
    for i, (c, lb) in enumerate(rows):
        ctx[i, : len(c)], lab[i, : len(lb)] = c, lb
    return [c for c, _ in rows], [lb for _, lb in rows], np.asarray(model.logits(ctx, lab))
