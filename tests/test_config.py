"""Configuration: the default tree validates, bad values fail naming their key."""

from __future__ import annotations

import pytest

from bb3x_jax import config as config_lib
from configs import cringe


def test_default_config_is_valid():
    """The shipped config passes validation and yields the default feedback policy."""
    config = config_lib.validate(cringe.get_config())
    assert config_lib.feedback_policy(config).order[0] == "canned"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("data.stream", "bots", "data.stream"),
        ("data.context_buckets", (64, 32), "data.context_buckets"),
        ("data.context_buckets", (32, 64), "below the truncation"),
        ("data.label_truncate", 1, "data.label_truncate"),
        ("mesh.fsdp", 0, "mesh.fsdp"),
        ("data.tokenizer.kind", "bpe", "data.tokenizer.kind"),
        ("checkpoint.best_metric", "ppl_good", "checkpoint.best_metric"),
        ("checkpoint.keep", 0, "checkpoint.keep"),
        ("eval.checkpoint", "newest", "eval.checkpoint"),
        ("model.dtype", "float16", "model.dtype"),
        ("bench.warmup", 0, "bench.warmup"),
        ("bench.decode_len", -1, "bench.decode_len"),
        ("generation.method", "nucleus", "config.generation.method"),
        ("generation.beam_size", 0, "config.generation.beam_size"),
        ("generation.top_p", 0.0, "config.generation.top_p"),
        ("eval.judge", "gpt", "eval.judge"),
        ("data.context_framing", "t5", "data.context_framing"),
        ("data.label_framing", "always", "data.label_framing"),
        ("data.tokenizer.kind", "parlai", "config.data.tokenizer.path: a parlai tokenizer needs a path"),
        ("data.tokenizer.path", "/nonexistent/spm.model", "config.data.tokenizer.path: .*no sentencepiece model"),
        ("train.init_from", "/nonexistent/model", "config.train.init_from: /nonexistent/model: no such file"),
        ("train.kl_anchor", -0.5, "config.train.kl_anchor: must be >= 0"),
        ("train.kl_anchor_direction", "both", "config.train.kl_anchor_direction"),
    ],
)
def test_bad_values_name_their_key(key, value, message):
    """Each invalid value is reported with the dotted key that holds it."""
    config = cringe.get_config()
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_bad_policy_is_reported_under_data_policy():
    """A feedback policy with an unknown rule fails as config.data.policy."""
    config = cringe.get_config()
    config.data.policy.order = ["likes"]
    with pytest.raises(config_lib.ConfigError, match="config.data.policy: unknown feedback rule"):
        config_lib.validate(config)


def test_two_free_mesh_axes_are_rejected():
    """Only one mesh axis may take 'the remaining devices'."""
    config = cringe.get_config()
    config.mesh.fsdp = -1
    with pytest.raises(config_lib.ConfigError, match="at most one axis"):
        config_lib.validate(config)


def test_resuming_with_a_changed_training_setting_names_it():
    """Changing what is trained (alpha, the model) on resume fails naming the key; changing the
    step count, logging or the mesh does not."""
    import json

    saved = json.loads(cringe.get_config().to_json_best_effort())
    allowed = cringe.get_config()
    allowed.train.steps = 999
    allowed.train.log_every = 1
    allowed.mesh.data = 2
    config_lib.check_resumable(saved, allowed)
    for key, value in (("train.alpha", 2.0), ("model.preset", "tiny_opt"), ("data.batch_size", 16)):
        changed = cringe.get_config()
        section, leaf = key.split(".")
        changed[section][leaf] = value
        with pytest.raises(config_lib.ConfigError, match=f"config.{key}"):
            config_lib.check_resumable(saved, changed)


@pytest.mark.parametrize("name", ["bb3_3b", "bb3_30b", "bb3_175b"])
def test_real_run_configs_are_valid(name):
    """configs/bb3_*.py validate as shipped (train.init_from is the user's to set)."""
    import importlib

    config = config_lib.validate(importlib.import_module(f"configs.{name}").get_config())
    assert config.train.learning_rate == 1e-6 and config.model.dtype == "bfloat16"
    assert config.data.tokenizer.kind == "auto" and config.data.context_framing == "auto"


def test_resume_refusal_names_both_values_and_the_data_source():
    """A refused resume names the key with the checkpoint's and this run's values; the data
    source (data.manual_dir) is part of what was trained, data.dir (where it is kept) is not."""
    import json

    saved = json.loads(cringe.get_config().to_json_best_effort())
    changed = cringe.get_config()
    changed.model.preset = "small"
    with pytest.raises(config_lib.ConfigError, match=r"config.model.preset: .*/ckpt/30 .*'tiny' -> 'small'"):
        config_lib.check_resumable(saved, changed, "/ckpt/30")
    changed = cringe.get_config()
    changed.data.manual_dir = "/data/release"
    with pytest.raises(config_lib.ConfigError, match="config.data.manual_dir"):
        config_lib.check_resumable(saved, changed)
    moved = cringe.get_config()
    moved.data.dir = "/elsewhere"
    config_lib.check_resumable(saved, moved)


def test_warmup_longer_than_the_run_is_allowed_with_a_warning(monkeypatch):
    """train.warmup_steps > train.steps validates, and a warning says the run only warms up."""
    from absl import logging

    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
    config = cringe.get_config()
    config.train.steps, config.train.warmup_steps = 10, 40
    config_lib.validate(config)
    assert any("train.warmup_steps=40 is more than train.steps=10" in w and "0.25" in w for w in warnings)
    warnings.clear()
    config.train.warmup_steps = 10
    config_lib.validate(config)
    assert not any("warmup" in w for w in warnings)


def test_a_checkpoint_older_than_the_kl_anchor_resumes_as_unanchored():
    """A checkpoint whose recorded config has no train.kl_anchor trained without one: it resumes
    (and a finished stage is reused) at kl_anchor 0, and is refused at any other weight."""
    import json

    saved = json.loads(cringe.get_config().to_json_best_effort())
    del saved["train"]["kl_anchor"]
    config_lib.check_resumable(saved, cringe.get_config())
    anchored = cringe.get_config()
    anchored.train.kl_anchor = 1.0
    with pytest.raises(config_lib.ConfigError, match=r"config.train.kl_anchor: .*0.0 -> 1.0"):
        config_lib.check_resumable(saved, anchored)
    unanchored = cringe.get_config()
    unanchored.train.kl_anchor_direction = "reverse"  # changes nothing without an anchor
    config_lib.check_resumable(saved, unanchored)
    anchored.train.kl_anchor_direction = "reverse"
    recorded = json.loads(anchored.to_json_best_effort())
    anchored.train.kl_anchor_direction = "forward"
    with pytest.raises(config_lib.ConfigError, match=r"config.train.kl_anchor_direction: .*'reverse' -> 'forward'"):
        config_lib.check_resumable(recorded, anchored)


def test_the_anchors_weights_count_only_for_an_anchored_run():
    """train.kl_anchor_from changes nothing without an anchor (a resume ignores it); with one, another
    anchor is refused naming the key, and a checkpoint older than the setting anchored to its start."""
    import json

    unanchored = cringe.get_config()
    recorded = json.loads(unanchored.to_json_best_effort())
    unanchored.train.kl_anchor_from = "/models/baseline"
    config_lib.check_resumable(recorded, unanchored)
    anchored = cringe.get_config()
    anchored.train.kl_anchor = 1.0
    recorded = json.loads(anchored.to_json_best_effort())
    del recorded["train"]["kl_anchor_from"]
    config_lib.check_resumable(recorded, anchored)
    anchored.train.kl_anchor_from = "/models/baseline"
    with pytest.raises(config_lib.ConfigError, match=r"config.train.kl_anchor_from: .*'' -> '/models/baseline'"):
        config_lib.check_resumable(recorded, anchored)


def test_iterate_anchor_names_its_choices():
    config = cringe.get_config()
    config.iterate.anchor = "first"
    with pytest.raises(config_lib.ConfigError, match="config.iterate.anchor: 'first' is not previous or baseline"):
        config_lib.validate(config)


def test_objective_options_the_objective_does_not_read_do_not_block_a_resume():
    """An mle run never reads train.k, alpha or detach_positives: changing them resumes it (and reuses a
    finished mle stage); for cringe, which reads them, the change is refused, naming the key."""
    import json

    mle = cringe.get_config()
    mle.train.objective = "mle"
    saved = json.loads(mle.to_json_best_effort())
    for key, value in (("k", 5), ("alpha", 0.5), ("detach_positives", True)):
        changed = cringe.get_config()
        changed.train.objective = "mle"
        changed.train[key] = value
        config_lib.check_resumable(saved, changed)
        changed.train.objective = "cringe"
        recorded = json.loads(cringe.get_config().to_json_best_effort())
        with pytest.raises(config_lib.ConfigError, match=f"config.train.{key}: "):
            config_lib.check_resumable(recorded, changed)
    positive_only = cringe.get_config()
    positive_only.train.objective = "mle_positive_only"
    recorded = json.loads(positive_only.to_json_best_effort())
    positive_only.train.train_ce_on_positive = False  # read by mle_positive_only
    with pytest.raises(config_lib.ConfigError, match="config.train.train_ce_on_positive"):
        config_lib.check_resumable(recorded, positive_only)


def test_kl_anchor_without_a_start_is_refused(tmp_path):
    """The anchor is the model the run starts from: without train.init_from there is none."""
    from bb3x_jax.train import runtime

    config = cringe.get_config()
    config.train.kl_anchor = 1.0
    with pytest.raises(config_lib.ConfigError, match="config.train.kl_anchor: .*train.init_from"):
        runtime.Setup(config, str(tmp_path), with_data=False)
