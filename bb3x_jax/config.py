"""Start-up validation of the configuration tree.

ml_collections already rejects unknown keys and wrongly typed overrides; this
checks values and the relations between them, naming the offending key, so a
bad run fails in its first second instead of after data preparation.
"""

from __future__ import annotations

from ml_collections import config_dict

from bb3x_jax.data import schema
from bb3x_jax.data.feedback import FeedbackPolicy


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config.{key}: {message}")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def feedback_policy(config: config_dict.ConfigDict) -> FeedbackPolicy:
    try:
        return FeedbackPolicy.from_dict(config.data.policy.to_dict())
    except (TypeError, ValueError) as error:
        raise ConfigError("data.policy", str(error)) from None


def validate(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Returns the config if every value is usable; raises ConfigError naming the key otherwise."""
    data = config.data
    _require(data.stream in schema.STREAMS, "data.stream", f"{data.stream!r} is not one of {', '.join(schema.STREAMS)}")
    _require(data.synthetic.conversations > 0, "data.synthetic.conversations", "must be positive")
    _require(data.tokenizer.kind == "sentencepiece", "data.tokenizer.kind",
             f"{data.tokenizer.kind!r} is not supported yet (sentencepiece)")
    _require(data.tokenizer.vocab_size >= 64, "data.tokenizer.vocab_size", "must be at least 64")
    _require(data.text_truncate > 0, "data.text_truncate", "must be positive")
    _require(data.label_truncate > 1, "data.label_truncate", "must be at least 2 (label + end token)")
    for key, truncate in (("context_buckets", data.text_truncate), ("label_buckets", data.label_truncate)):
        buckets = tuple(data[key])
        _require(
            bool(buckets) and list(buckets) == sorted(set(buckets)) and buckets[0] > 0,
            f"data.{key}",
            f"must be strictly increasing positive lengths, got {buckets}",
        )
        _require(buckets[-1] >= truncate, f"data.{key}", f"largest bucket {buckets[-1]} is below the truncation {truncate}")
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
    _require(train.steps > 0, "train.steps", "must be positive")
    _require(train.learning_rate > 0, "train.learning_rate", "must be positive")
    _require(0 <= train.warmup_steps <= train.steps, "train.warmup_steps", "must be in [0, train.steps]")
    _require(train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _require(train.log_every >= 1, "train.log_every", "must be >= 1")
    from bb3x_jax.model import config as model_config

    _require(config.model.preset in model_config.PRESETS, "model.preset",
             f"{config.model.preset!r} is not one of {', '.join(model_config.PRESETS)}")
    _require(0.0 <= config.model.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    feedback_policy(config)
    return config


def model_config(config: config_dict.ConfigDict, tokenizer):
    """The network's config: the preset, with the tokenizer's vocabulary and special ids."""
    from bb3x_jax.model import config as model_config

    cfg = model_config.preset(
        config.model.preset,
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        start_id=tokenizer.start_id,
        end_id=tokenizer.end_id,
        decoder_start=(tokenizer.start_id,),
        dropout=config.model.dropout,
    )
    needed = config.data.text_truncate + (config.data.label_truncate if cfg.arch == "decoder_only" else 0)
    _require(cfg.n_positions >= max(needed, config.data.label_truncate), "model.preset",
             f"{config.model.preset} has {cfg.n_positions} positions, the data needs {needed}")
    return cfg
