"""Start-up validation of the configuration tree.

ml_collections already rejects unknown keys and wrongly typed overrides; this
checks values and the relations between them, naming the offending key, so a
bad run fails in its first second instead of after data preparation.
"""

from __future__ import annotations

import json
import os
import re

import jax
from absl import logging
from ml_collections import config_dict

from bb3x_jax import cringe, decoding
from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data import pipeline, schema
from bb3x_jax.data.feedback import FeedbackPolicy
from bb3x_jax.data.tokenizers import files as tokenizer_files
from bb3x_jax.errors import ConfigError
from bb3x_jax.model import config as model_presets
from bb3x_jax.model.config import REMAT_POLICIES


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def tokenizer_spec(config: config_dict.ConfigDict) -> tokenizer_files.TokenizerSpec | None:
    """The configured tokenizer's files (None: a sentencepiece model trained on the data);
    a missing file names ``data.tokenizer.path``."""
    tok = config.data.tokenizer
    try:
        return tokenizer_files.resolve_configured(tok.kind, tok.path, init_from=config.train.init_from,
                                                  bpe_dir=tok.bpe_dir, trust_pickle=config.train.trust_pickle)
    except (OSError, ValueError) as error:
        key = "data.tokenizer.path" if tok.path or tok.kind not in ("auto", "checkpoint") else "train.init_from"
        raise ConfigError(key, str(error)) from None


def framing(config: config_dict.ConfigDict, spec=...) -> framing_lib.Framing:
    """How this run frames contexts and labels: the tokenizer's checkpoint's own framing
    (``data.context_framing`` / ``data.label_framing`` = auto) or the configured one."""
    data = config.data
    spec = tokenizer_spec(config) if spec is ... else spec
    try:
        return framing_lib.for_tokenizer(spec, data.text_truncate, data.label_truncate,
                                         context=data.context_framing, label=data.label_framing)
    except ValueError as error:
        raise ConfigError("data.context_framing", str(error)) from None


def feedback_policy(config: config_dict.ConfigDict) -> FeedbackPolicy:
    try:
        return FeedbackPolicy.from_dict(config.data.policy.to_dict())
    except (TypeError, ValueError) as error:
        raise ConfigError("data.policy", str(error)) from None


def generation_settings(config: config_dict.ConfigDict):
    """The ``generation`` section as ``decoding.Settings``; a bad value names its key."""
    fields = {f: config.generation[f] for f in config.generation.keys()}
    try:
        return decoding.Settings(**fields)
    except (TypeError, ValueError) as error:
        named = [(str(error).find(f"{f} must"), f) for f in fields if f"{f} must" in str(error)]
        bad = min(named)[1] if named else ""  # the first complaint
        raise ConfigError(f"generation.{bad}" if bad else "generation", str(error)) from None


def validate(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Returns the config if every value is usable; raises ConfigError naming the key otherwise."""
    data = config.data
    _require(data.stream in schema.STREAMS, "data.stream", f"{data.stream!r} is not one of {', '.join(schema.STREAMS)}")
    _require(data.synthetic.conversations > 0, "data.synthetic.conversations", "must be positive")
    _require(data.tokenizer.kind in tokenizer_files.CONFIG_KINDS, "data.tokenizer.kind",
             f"{data.tokenizer.kind!r} is not one of {', '.join(tokenizer_files.CONFIG_KINDS)}")
    _require(data.tokenizer.vocab_size >= 64, "data.tokenizer.vocab_size", "must be at least 64")
    _require(data.text_truncate > 0, "data.text_truncate", "must be positive")
    _require(data.context_framing in ("auto",) + framing_lib.CONTEXT_FRAMINGS, "data.context_framing",
             f"{data.context_framing!r} is not one of auto, {', '.join(framing_lib.CONTEXT_FRAMINGS)}")
    _require(data.label_framing in ("auto",) + framing_lib.LABEL_FRAMINGS, "data.label_framing",
             f"{data.label_framing!r} is not one of auto, {', '.join(framing_lib.LABEL_FRAMINGS)}")
    _require(data.label_truncate > 1, "data.label_truncate", "must be at least 2 (label + end token)")
    framing(config)  # the tokenizer's files exist and the framing fits the truncation
    for key, truncate in (("context_buckets", data.text_truncate), ("label_buckets", data.label_truncate)):
        try:
            pipeline.check_buckets(data[key], truncate)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"data.{key}", str(error)) from None
    _require(data.batch_size > 0, "data.batch_size", "must be positive")
    _require(data.prefetch >= 0, "data.prefetch", "must be >= 0")
    _require(data.pipeline_workers >= 0, "data.pipeline_workers", "must be >= 0")
    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        _require(size == -1 or size >= 1, f"mesh.{axis}", f"must be -1 or a positive size, got {size}")
    _require(sum(config.mesh[a] == -1 for a in ("data", "fsdp", "tensor")) <= 1, "mesh", "at most one axis may be -1")
    train = config.train
    _require(train.objective in ("cringe", "mle", "mle_positive_only", "unlikelihood"), "train.objective",
             f"{train.objective!r} is not one of cringe, mle, mle_positive_only, unlikelihood")
    _require(train.k >= 1, "train.k", "must be >= 1")
    _require(train.kl_anchor >= 0, "train.kl_anchor", "must be >= 0 (0: no anchor)")
    _require(train.kl_anchor_direction in cringe.ANCHOR_DIRECTIONS, "train.kl_anchor_direction",
             f"{train.kl_anchor_direction!r} is not one of {', '.join(cringe.ANCHOR_DIRECTIONS)}")
    _require(train.steps > 0, "train.steps", "must be positive")
    _require(train.learning_rate > 0, "train.learning_rate", "must be positive")
    _require(train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    if train.warmup_steps > train.steps:  # allowed (a smoke run of a real config), but it only warms up
        logging.warning("config.train.warmup_steps=%d is more than train.steps=%d: the run only warms up, "
                        "its learning rate peaks at %.3g of train.learning_rate", train.warmup_steps, train.steps,
                        train.steps / train.warmup_steps)
    _require(train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _require(train.log_every >= 1, "train.log_every", "must be >= 1")
    _require(config.model.preset in model_presets.PRESETS, "model.preset",
             f"{config.model.preset!r} is not one of {', '.join(model_presets.PRESETS)}")
    _require(0.0 <= config.model.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    for key in ("dtype", "param_dtype"):
        _require(config.model[key] in ("float32", "bfloat16"), f"model.{key}",
                 f"{config.model[key]!r} is not float32 or bfloat16")

    _require(config.model.remat in REMAT_POLICIES, "model.remat",
             f"{config.model.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    _require(train.eval_every >= 0, "train.eval_every", "must be >= 0")
    _require(train.eval_batches >= 0, "train.eval_batches", "must be >= 0 (0: the whole split)")
    ckpt = config.checkpoint
    _require(ckpt.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    _require(ckpt.keep >= 1, "checkpoint.keep", "must be >= 1")
    _require(ckpt.best_mode in ("min", "max"), "checkpoint.best_mode", f"{ckpt.best_mode!r} is not min or max")
    _require(ckpt.best_metric in ("",) + EVAL_METRICS, "checkpoint.best_metric",
             f"{ckpt.best_metric!r} is not a validation metric ({', '.join(EVAL_METRICS)})")
    _require(config.eval.split in schema.SPLITS, "eval.split", f"{config.eval.split!r} is not one of {schema.SPLITS}")
    _require(config.eval.checkpoint in ("best", "latest") or config.eval.checkpoint.isdigit(), "eval.checkpoint",
             f"{config.eval.checkpoint!r} is not best, latest or a step number")
    _require(config.eval.batches >= 0, "eval.batches", "must be >= 0")
    _require(config.eval.generate_examples >= 0, "eval.generate_examples", "must be >= 0 (0: no generations)")
    _require(config.eval.generate_batch >= 1, "eval.generate_batch", "must be positive")
    _require(config.eval.judge in ("auto", "synthetic", "classifier", "none"), "eval.judge",
             f"{config.eval.judge!r} is not auto, synthetic, classifier or none")
    it = config.iterate
    _require(it.iterations >= 1, "iterate.iterations", "must be positive")
    _require(it.contexts >= 0, "iterate.contexts", "must be >= 0 (0: every train context)")
    _require(it.steps >= 1, "iterate.steps", "must be positive")
    _require(it.generated_repeat >= 1, "iterate.generated_repeat", "must be positive")
    _require(it.anchor in ("previous", "baseline"), "iterate.anchor", f"{it.anchor!r} is not previous or baseline")
    _require(it.judge in ("auto", "synthetic", "classifier"), "iterate.judge",
             f"{it.judge!r} is not auto, synthetic or classifier")
    _require(not it.deployment or os.path.isdir(os.path.expanduser(it.deployment)), "iterate.deployment",
             f"{it.deployment} is not a folder (a deployment folder of release_data_XX.jsonl chunk files)")
    serve = config.serve
    _require(1 <= serve.port <= 65535, "serve.port", "must be a TCP port (1-65535)")
    _require(serve.max_chars >= 1, "serve.max_chars", "must be positive")
    _require(serve.max_batch >= 1, "serve.max_batch", "must be positive")
    _require(serve.batch_wait_ms >= 0, "serve.batch_wait_ms", "must be >= 0")
    _require(serve.compact_every_s > 0, "serve.compact_every_s", "must be positive")
    reasons = [r.strip() for r in serve.reasons.split(",") if r.strip()]
    _require(bool(reasons) and all(re.fullmatch(r"[a-z0-9_]+", r) for r in reasons), "serve.reasons",
             f"must be comma-separated names of lowercase letters, digits and '_', got {serve.reasons!r}")
    generation_settings(config)
    judge = config.judge
    for key in ("d_model", "n_heads", "ffn_dim", "n_layers", "steps", "batch_size"):
        _require(judge[key] >= 1, f"judge.{key}", "must be positive")
    _require(judge.d_model % judge.n_heads == 0, "judge.d_model", f"must be a multiple of judge.n_heads ({judge.n_heads})")
    _require(judge.max_len >= 8, "judge.max_len", "must be at least 8 (context tail + separator + response)")
    _require(judge.learning_rate > 0, "judge.learning_rate", "must be positive")
    _require(judge.weight_decay >= 0, "judge.weight_decay", "must be >= 0")
    _require(0.0 <= judge.dropout < 1.0, "judge.dropout", "must be in [0, 1)")
    bench = config.bench
    for key in ("batch", "context", "label", "steps"):
        _require(bench[key] >= 1, f"bench.{key}", "must be positive")
    _require(bench.warmup >= 1, "bench.warmup", "must be >= 1 (the first step compiles)")
    _require(0.0 <= bench.negative_fraction <= 1.0, "bench.negative_fraction", "must be in [0, 1]")
    _require(bench.decode_len >= 0, "bench.decode_len", "must be >= 0 (0: no decoding benchmark)")
    _require(bench.decode_beam >= 1, "bench.decode_beam", "must be >= 1 (1: greedy)")
    _require(config.plan.devices >= 0, "plan.devices", "must be >= 0 (0: the product of the mesh sizes)")
    _require(config.plan.device_memory_gb > 0, "plan.device_memory_gb", "must be positive")
    feedback_policy(config)
    return config


# Validation metrics (bb3x_jax.eval.likelihood) a best checkpoint can be chosen by.
EVAL_METRICS = tuple(
    f"{metric}_{name}" for metric in ("nll", "ppl", "token_acc") for name in ("positive", "negative", "unlabeled")
) + ("nll_gap_negative_minus_positive",)


def model_overrides(config: config_dict.ConfigDict) -> dict:
    """ModelConfig fields the run config sets on any architecture (preset or converted weights)."""
    m = config.model
    return {"dropout": m.dropout, "dtype": m.dtype, "param_dtype": m.param_dtype, "scan_layers": m.scan_layers,
            "remat": m.remat}


# Settings newer than some checkpoints, each with the value that trains what those checkpoints
# trained: a recorded config without the key counts as having this value.
_ADDED_SETTINGS = {"train.kl_anchor": 0.0, "train.kl_anchor_direction": "forward", "train.kl_anchor_from": ""}
# Config keys (and sections, ending in '.') a resumed run may change: they do not change what was
# trained so far. Everything else (model, tokenizer, data source and stream, objective, optimizer,
# seed) must equal the checkpoint's. ``data.dir`` only says where the prepared data is kept.
_RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.init_from",
                      "train.trust_pickle", "checkpoint.", "eval.", "iterate.", "judge.", "bench.", "plan.",
                      "data_check.", "distributed.", "data.num_workers", "data.prefetch", "data.pipeline_workers",
                      "data.dir", "mesh.",
                      # the experiment script's own sections (configs/bb3x_table.py): what it runs, not
                      # what a training trains (that reaches train.* and data.* before it starts)
                      "baseline.", "control.", "sampled.", "experiment.")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _without_inert(flat: dict) -> dict:
    """``flat`` without the settings that change nothing as set: the anchor's direction and weights when
    unanchored, and the objective options its objective does not read (``train.k`` of an mle run)."""
    inert = {f"train.{option}" for option in cringe.KNOWN_OPTIONS
             - set(cringe.OBJECTIVE_OPTIONS.get(flat.get("train.objective"), cringe.KNOWN_OPTIONS))}
    if not flat.get("train.kl_anchor"):
        inert.update({"train.kl_anchor_direction", "train.kl_anchor_from"})
    return {k: v for k, v in flat.items() if k not in inert}


def check_resumable(saved: dict, config: config_dict.ConfigDict, checkpoint: str = "") -> None:
    """Fails naming the keys and both values when a run is resumed with a config that changes
    what it trains (``saved``: the config recorded in the checkpoint ``checkpoint``).

    Changing the step count, logging, checkpointing, the mesh or the number of
    workers is allowed (the mesh only changes placement); anything else that
    differs from the checkpoint's config is an error.
    """
    now = _without_inert(_flatten(json.loads(config.to_json_best_effort())))
    before = _without_inert({**_ADDED_SETTINGS, **_flatten(saved)})
    changed = sorted(
        key for key in set(now) | set(before)
        if now.get(key) != before.get(key) and not key.startswith(_RESUMABLE_CHANGES)
    )
    if changed:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:10])
        where = f" {checkpoint}" if checkpoint else ""
        raise ConfigError(changed[0], f"differs from the checkpoint being resumed{where} (checkpoint -> now: "
                                      f"{details}); nothing was changed. Resume with the checkpoint's values, "
                                      "or train with this config in a new --workdir")


def model_config(config: config_dict.ConfigDict, tokenizer):
    """The network's config: the preset, with the tokenizer's vocabulary and special ids."""
    cfg = model_presets.preset(
        config.model.preset,
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        start_id=tokenizer.start_id,
        end_id=tokenizer.end_id,
        decoder_start=(tokenizer.start_id,),
        **model_overrides(config),
    )
    check_positions(config, cfg, "model.preset", config.model.preset)
    return cfg


def check_positions(config: config_dict.ConfigDict, cfg, key: str, name: str) -> None:
    """The model has a position for every context (and, decoder-only, label) token the data gives it."""
    needed = config.data.text_truncate + (config.data.label_truncate if cfg.arch == "decoder_only" else 0)
    _require(cfg.n_positions >= max(needed, config.data.label_truncate), key,
             f"{name} has {cfg.n_positions} positions, the data needs {needed} "
             "(lower data.text_truncate / data.label_truncate)")


def initialize_distributed(config: config_dict.ConfigDict) -> None:
    """Joins the multi-host job when ``distributed.enabled`` (before any other JAX call)."""
    dist = config.distributed
    if not dist.enabled:
        return

    kwargs = {}
    if dist.coordinator_address:
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes >= 0:
        kwargs["num_processes"] = dist.num_processes
    if dist.process_id >= 0:
        kwargs["process_id"] = dist.process_id
    jax.distributed.initialize(**kwargs)
