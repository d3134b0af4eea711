"""A run's data from its config: release -> prepared TFDS data -> tokenizer -> iterator.

Why a module of its own: every mode that reads the release (train, eval,
chat, iterate, train_judge, data) needs the same three cached artefacts, built once per
release and reused: the synthetic release when no real one is configured, the
prepared dataset (keyed by the release's fingerprint) and the sentencepiece
model trained on its train split (stored beside the prepared data).
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import jax
import tensorflow_datasets as tfds
from absl import logging
from ml_collections import config_dict
from orbax.checkpoint import multihost

from bb3x_jax import config as config_lib
from bb3x_jax.data import builder as builder_lib
from bb3x_jax.data import generated, parallel, pipeline, records, synthetic, token_cache
from bb3x_jax.data.tokenizers import base as tokenizer_lib
from bb3x_jax.data.tokenizers import files as tokenizer_files


def data_root(data: config_dict.ConfigDict, workdir: str) -> str:
    """Where the synthetic release and the prepared data live: ``data.dir``, else the workdir.

    Runs that share one release (the iterations of --mode=iterate, an
    experiment's models) point ``data.dir`` at one folder and prepare it once.
    """
    return os.path.expanduser(data.dir) if data.dir else workdir


def resolve_release(data: config_dict.ConfigDict, workdir: str) -> str:
    """The configured release, or the synthetic one written (once) into the data root."""
    if data.manual_dir:
        return os.path.expanduser(data.manual_dir)
    folder = os.path.join(data_root(data, workdir), "synthetic_release")
    marker = os.path.join(folder, "SYNTHESIZED.json")
    wanted = {"conversations": int(data.synthetic.conversations), "seed": int(data.synthetic.seed)}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("request") == wanted:
                return folder
    logging.info("Writing the synthetic release (%d conversations, seed %d) to %s", *wanted.values(), folder)
    summary = synthetic.synthesize(folder, wanted["conversations"], wanted["seed"])
    with open(marker, "w") as f:  # written last: a partial release is never reused
        json.dump({"request": wanted, "summary": summary}, f, indent=1)
    return folder


def prepare(config: config_dict.ConfigDict, workdir: str) -> builder_lib.Bb3xDeployment:
    data = config.data
    tfds.disable_progress_bar()  # the run's own output says what was prepared
    sha = None if str(data.tarball_sha256).lower() in ("", "none") else data.tarball_sha256
    return builder_lib.prepare(
        resolve_release(data, workdir),
        data.stream,
        data_dir=os.path.join(data_root(data, workdir), "tfds"),
        policy=config_lib.feedback_policy(config),
        skip_malformed=data.skip_malformed,
        tarball_sha256=sha,
        num_workers=parallel.resolve_workers(data.num_workers),
    )


def is_synthetic_release(data: config_dict.ConfigDict) -> bool:
    """The synthetic world's release: synthesized into the data root, or a folder the synthesizer wrote."""
    return synthetic.is_release(data.manual_dir)


def tokenizer_path(config: config_dict.ConfigDict, built: builder_lib.Bb3xDeployment) -> str:
    """The sentencepiece model trained beside the prepared data (when no tokenizer is configured)."""
    tok = config.data.tokenizer
    return os.path.join(str(built.data_dir), f"sentencepiece-v{tok.vocab_size}-n{tok.max_sentences}.model")


def tokenizer_spec(config: config_dict.ConfigDict, built: builder_lib.Bb3xDeployment):
    """The run's tokenizer files: the configured ones (a checkpoint's own, a sentencepiece model),
    or the sentencepiece model trained on the train split (trained here on first use)."""
    spec = config_lib.tokenizer_spec(config)
    if spec is not None:
        return spec
    path = tokenizer_path(config, built)
    if not os.path.exists(path):
        train_tokenizer(config, built, path)
    return tokenizer_files.resolve_sentencepiece(path)


def load_tokenizer(config: config_dict.ConfigDict, built: builder_lib.Bb3xDeployment):
    """The run's tokenizer (``tokenizer_spec``), loaded."""
    return tokenizer_files.load(tokenizer_spec(config, built))


def train_tokenizer(config: config_dict.ConfigDict, built: builder_lib.Bb3xDeployment, path: str):
    """A sentencepiece model trained once on the train split, written to ``path``."""
    tok = config.data.tokenizer
    logging.info("Training a %d-piece sentencepiece model on the train split -> %s", tok.vocab_size, path)
    source = records.TrainingRecords.of(built, "train")
    return tokenizer_lib.train_sentencepiece(
        records.tokenizer_texts(source, tok.max_sentences),
        path,
        vocab_size=tok.vocab_size,
        seed=0,
        # vocab_size is an upper bound: a small (e.g. synthetic) release gets a smaller model.
        extra_options={"hard_vocab_limit": False},
    )


# How long the other processes of a multi-process job wait for process 0 to
# prepare the data (the real release takes minutes; the barrier fails after this).
PREPARE_TIMEOUT_S = 4 * 3600
_barriers = itertools.count()  # a barrier name is single-use: number them (same order on every process)


def prepare_with_tokenizer(config: config_dict.ConfigDict, workdir: str):
    """(prepared dataset, tokenizer): ``prepare`` and ``load_tokenizer``, safe with several processes.

    The processes of a multi-host job share the workdir (its checkpoints must be
    on shared storage), and two processes must not write the same synthetic
    release, TFDS files or sentencepiece model at once. So process 0 makes them
    while the others wait at a barrier of the coordination service (no device
    collective, with its own long timeout); then the others make the same calls,
    which only read what process 0 wrote.
    """
    def make():
        built = prepare(config, workdir)
        return built, load_tokenizer(config, built)

    if jax.process_count() == 1:
        return make()

    made = make() if jax.process_index() == 0 else None
    barrier = multihost.get_barrier_sync_fn()
    barrier(key=f"bb3x_jax_data_prepared_{next(_barriers)}", timeout_ms=PREPARE_TIMEOUT_S * 1000)
    return made if made is not None else make()


def pipeline_config(config: config_dict.ConfigDict, *, train: bool, framing=None) -> pipeline.PipelineConfig:
    """The batches of ``config``; ``framing``: the run's (``config_lib.framing``), when already resolved."""
    data = config.data
    framing = framing or config_lib.framing(config)
    common = dict(
        text_truncate=data.text_truncate,
        label_truncate=data.label_truncate,
        context_buckets=tuple(data.context_buckets),
        label_buckets=tuple(data.label_buckets),
        seed=config.seed,
        prefetch=data.prefetch,
        workers=data.pipeline_workers,
        context_framing=framing.context,
        label_framing=framing.label,
        global_end_token=framing.global_end_token,
    )
    if train:
        return pipeline.PipelineConfig(global_batch_size=data.batch_size, **common)
    return pipeline.PipelineConfig.for_eval(data.batch_size, **common)


def source(built: builder_lib.Bb3xDeployment, split: str) -> records.TrainingRecords:
    """The split's (context, label, feedback) records; an empty split (possible on small releases) is an error."""
    check_not_empty(built, split)
    return records.TrainingRecords.of(built, split)


def check_not_empty(built: builder_lib.Bb3xDeployment, split: str) -> None:
    """A split a run reads must hold examples: small releases (a fresh deployment folder) may leave
    one empty, which is the user's to fix (more conversations, or another split), not a crash."""
    if builder_lib.num_examples(built, split) == 0:
        raise builder_lib.EmptySplitError(split, builder_lib.split_report(built, split))


def batch_source(config: config_dict.ConfigDict, built: builder_lib.Bb3xDeployment, tok, split: str,
                 framing=None):
    """What the pipeline reads for ``split``: the token cache (built once) or the raw records.

    The train split is followed by the generated splits of ``data.extra_train``
    (iterative CRINGE; a split listed twice is read twice per epoch).
    """
    data = config.data
    framing = framing or config_lib.framing(config)
    release = _cached(config, source(built, split), tok, str(built.data_dir), split, framing)
    if split != "train" or not data.extra_train:
        return release
    extra = {}
    for path in dict.fromkeys(data.extra_train):
        try:
            split_source = generated.GeneratedSplit(path)
        except (OSError, ValueError) as error:
            raise config_lib.ConfigError("data.extra_train", str(error)) from None
        extra[path] = _cached(config, split_source, tok, path, "generated", framing)
    return generated.ConcatRecords([release] + [extra[path] for path in data.extra_train])


def _cached(config: config_dict.ConfigDict, records_source, tok, root: str, name: str, framing):
    data = config.data
    if not data.token_cache:
        return records_source
    path = token_cache.cache_dir(root, name, tok, framing)
    if not os.path.exists(os.path.join(path, "meta.json")):
        logging.info("Tokenizing %s once into %s", name, path)
    workers = parallel.resolve_workers(data.num_workers) if len(records_source) > 10_000 else 0
    return token_cache.build(records_source, tok, framing, path, workers=workers)


def summary(built: builder_lib.Bb3xDeployment) -> dict[str, Any]:
    """Per-split examples and reports, as stored with the prepared data."""
    return {
        split: builder_lib.split_report(built, split)
        for split in ("train", "valid", "test")
    }
