"""``--mode=train``: the training loop, resumable to the bit.

One run = one workdir. The loop prepares data and tokenizer (cached), builds
the model sharded on the mesh (random, or from converted weights with
``train.init_from``), and then either starts at step 0 or restores the newest
whole checkpoint in ``workdir/checkpoints`` (parameters, optimizer state,
step, RNG key and the data iterator's position), so a killed run continues
exactly as if it had not stopped. It validates every ``train.eval_every``
steps, keeps the best checkpoint by ``checkpoint.best_metric``, logs metrics
as JSON lines and TensorBoard events, and plots the loss curves at the end.

A run never destroys another: before anything is written, the config recorded
in the newest checkpoint's ``meta`` is compared with this run's (model,
tokenizer, data, objective, optimizer: ``config.check_resumable``) and a
difference is refused naming the key and both values; so is a workdir whose
step folders cannot be read or restored, instead of training from step 0 next
to them. A checkpoint that fails to restore is moved aside (``<step>.damaged``).

SIGTERM (preemption) and Ctrl-C finish the current step, save a checkpoint and
stop; the run resumes from it when started again. A non-finite loss or gradient
norm stops the run with ``TrainingDiverged`` before anything of it is saved (see
``run``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import config_dict
from tqdm import tqdm

from bb3x_jax import config as config_lib
from bb3x_jax.data.tokenizers import files as tokenizer_files
from bb3x_jax.errors import ConfigError, Stopped, TrainingDiverged, WorkdirError
from bb3x_jax.eval import likelihood as eval_lib
from bb3x_jax.train import checkpoint as checkpoint_lib
from bb3x_jax.train import inputs as dataset
from bb3x_jax.train import metrics_log
from bb3x_jax.train import runtime as setup_lib

# Fault injection for the resume tests: SIGKILL this process right after this
# step (once the checkpoints started so far are on disk), as a preemption would.
FAULT_KILL_ENV = "BB3X_FAULT_KILL_AFTER_STEP"
# For the signal tests: sleep this many seconds after every step, so that a signal
# sent once training is under way lands mid-run on a machine of any speed.
FAULT_STEP_DELAY_ENV = "BB3X_FAULT_STEP_DELAY_S"


class _StopRequests:
    """Turns SIGTERM / SIGINT into a flag read between steps (a second Ctrl-C interrupts at once).

    With several processes all must stop after the same step (the checkpoint save is
    collective), so SIGTERM is left to JAX's preemption notifier, installed by
    ``jax.distributed.initialize``: it tells every process, and they agree on a step
    (``reached_preemption_sync_point``). A Python handler would replace that notifier
    and let each process stop on its own. SIGINT keeps its default there.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ():
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logging.warning("%s received: saving a checkpoint after this step", signal.Signals(signum).name)

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:  # every process must stop at the same step

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = signal.SIGTERM
                logging.warning("preemption notice: all processes save a checkpoint after step %d", step)
            return self.signum is not None
        return self.signum is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _run_meta(setup: setup_lib.Setup, iterator_state: dict) -> dict:
    return {
        "iterator": iterator_state,
        "config": json.loads(setup.config.to_json_best_effort()),
        "model_config": dataclasses.asdict(setup.model_cfg),
    }


def _maybe_inject_fault(step: int, checkpoints: checkpoint_lib.Checkpointer) -> None:
    target = os.environ.get(FAULT_KILL_ENV)
    if target and int(target) == step:
        checkpoints.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    delay = os.environ.get(FAULT_STEP_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _mean_metrics(values: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


# Train-step metrics that must stay finite; the others (per-class means) can be NaN on a batch without that class.
GUARDED_METRICS = ("loss", "grad_norm")


def _check_finite(window: list[tuple[int, Any]], last_saved: int | None, position) -> list[dict]:
    """Fetches the window's metrics (replacing them in place by host values) and raises
    ``TrainingDiverged`` at the first step whose loss or gradient norm is not finite;
    ``position(step)`` names that step's batch (derived only then, never per step)."""
    values = jax.device_get([metrics for _, metrics in window])
    for i, ((step, _), v) in enumerate(zip(window, values)):
        bad = {k: float(v[k]) for k in GUARDED_METRICS if k in v and not np.isfinite(v[k])}
        if bad:
            raise TrainingDiverged(step, position(step), bad, last_saved)
        window[i] = (step, v)
    return values


def _check_valid(valid: dict, step: int, position: dict, last_saved: int | None) -> None:
    """A validation NLL that is not finite (for a class that has tokens) is a diverged model."""
    bad = {k: float(v) for k, v in valid.items() if k.startswith("nll_") and not np.isfinite(v)
           and valid.get("tokens_" + k[len("nll_"):], 0)}  # a class's NLL (not the gap) over its tokens
    if bad:
        raise TrainingDiverged(step, position, bad, last_saved)


def _check_workdir(config: config_dict.ConfigDict, directory: str) -> dict | None:
    """Reads the newest checkpoint's recorded meta (no arrays) and refuses a run that would not continue it:
    a config that changes what was trained, a step count below the checkpoint's, or step folders of which
    none can be read. Returns that meta (None: no checkpoint, a fresh start)."""
    steps = checkpoint_lib.step_folders(directory)
    newest = checkpoint_lib.newest_meta(directory)
    if newest is None:
        if steps:
            raise WorkdirError(os.path.dirname(directory), f"{directory} holds step folders {steps} of which no "
                               "meta can be read; nothing was changed. Train in a new --workdir, or move "
                               f"{directory} aside to start this one over")
        return None
    step, meta = newest
    config_lib.check_resumable(meta.get("config", {}), config, f"{directory}/{step}")
    if step > config.train.steps:
        raise ConfigError("train.steps", f"is {config.train.steps}, but the workdir's newest checkpoint "
                                         f"{directory}/{step} is past it; set at least {step}")
    return meta


# ModelConfig fields set by the tokenizer (the rest by the preset or the converted weights).
_TOKENIZER_FIELDS = ("vocab_size", "pad_id", "start_id", "end_id", "decoder_start")


def _check_model(meta: dict, model_cfg, directory: str) -> None:
    """The network this run built has the checkpoint's shapes and ids (the tokenizer files, say, can
    change under an unchanged config)."""
    saved = meta.get("model_config") or {}
    now = json.loads(json.dumps(dataclasses.asdict(model_cfg)))
    changed = sorted(k for k in saved.keys() & now.keys() if saved[k] != now[k])
    if changed:
        key = "data.tokenizer" if set(changed) <= set(_TOKENIZER_FIELDS) else "model.preset"
        details = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed[:10])
        raise ConfigError(key, f"builds a network that differs from the checkpoint in {directory} (checkpoint -> "
                               f"now: {details}); nothing was changed. Resume with the checkpoint's data and "
                               "tokenizer, or train in a new --workdir")


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run in ``workdir``; returns its summary.

    Divergence: the train step's ``loss`` and ``grad_norm`` are fetched and checked at every
    log step (``train.log_every``, for every step since the last check) and before every
    checkpoint save (the steps not yet checked, including the one being saved); validation
    NLLs are checked before the save that records them.
    The first non-finite value raises ``TrainingDiverged`` naming that step and its batch's
    position (epoch, step in epoch) before that step is saved, so the newest checkpoint and
    the best one stay finite (checkpoints already being written are finished). Steps that
    neither log nor save add no host sync.
    """
    os.makedirs(workdir, exist_ok=True)
    directory = os.path.join(workdir, "checkpoints")
    saved_meta = _check_workdir(config, directory)  # before anything is written
    setup = setup_lib.Setup(config, workdir)
    dataset.check_not_empty(setup.built, "valid")  # every run validates at its end: fail before the first step
    if saved_meta is not None:
        _check_model(saved_meta, setup.model_cfg, directory)
    train = config.train
    checkpoints = setup_lib.checkpointer(config, workdir)
    state, start_step = setup.state, 0
    iterator = setup.iterator("train", train=True)
    try:
        restored = checkpoints.restore_latest(setup.state)
    except BaseException:
        iterator.close()
        checkpoints.close()
        raise
    if restored is not None:
        config_lib.check_resumable(restored.meta.get("config", {}), config, f"{directory}/{restored.step}")
        state, start_step = restored.state, restored.step
        iterator.set_state(restored.meta["iterator"])
        print(f"Resumed from {checkpoints.directory}/{start_step}")
        if train.init_from:
            logging.info("train.init_from ignored: the run resumes from its own checkpoint")
    if jax.process_index() == 0:  # the tokenizer and framing go with the model (chat, generate, export)
        tokenizer_files.save_bundle(setup.tokenizer_spec, os.path.join(workdir, tokenizer_files.BUNDLE_DIR),
                                    framing=setup.framing.to_dict())
    log = metrics_log.MetricsLog(workdir, resume_step=start_step, enabled=jax.process_index() == 0)
    ckpt_every = config.checkpoint.every_steps
    eval_every = train.eval_every
    window, window_tokens, tokens_seen = [], [], 0  # window: (step, metrics) since the last log
    last_saved = start_step or None
    started = time.perf_counter()
    valid: dict[str, Any] | None = None
    try:
        with _StopRequests() as stop, tqdm(total=train.steps, initial=start_step, desc=f"train {train.objective}",
                                           unit="step", disable=jax.process_index() != 0) as bar:
            for step in range(start_step + 1, train.steps + 1):
                batch = next(iterator)  # global arrays, already on the mesh
                state, metrics = setup.train_step(state, batch, setup.anchor)
                window.append((step, metrics))  # the run's step s is the iterator's batch s
                window_tokens.append((batch["context_ids"] != setup.pad_id).sum()
                                     + (batch["label_ids"] != setup.pad_id).sum())
                if step % train.log_every == 0 or step == train.steps:
                    elapsed = time.perf_counter() - started
                    tokens_seen += int(np.sum(jax.device_get(window_tokens)))
                    values = {**_mean_metrics(_check_finite(window, last_saved, iterator.position)),
                              "tokens_per_s": tokens_seen / elapsed}
                    window, window_tokens = [], []
                    log.write("train", step, values)
                    bar.set_postfix(loss=f"{values['loss']:.3f}", ce=f"{values['ce_loss']:.3f}",
                                    ct=f"{values['ct_loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")
                valid = None
                if (eval_every and step % eval_every == 0) or step == train.steps:
                    _check_finite(window, last_saved, iterator.position)  # a diverged model is not validated
                    valid = setup.validate(state.params, state.rest)
                    _check_valid(valid, step, iterator.position(step), last_saved)
                    log.write("valid", step, valid)
                    bar.write(f"step {step}: valid ppl_positive {valid['ppl_positive']:.3f} "
                              f"gap {valid['nll_gap_negative_minus_positive']:.4f}")
                stopping = stop.requested(step)
                if step % ckpt_every == 0 or step == train.steps or valid is not None or stopping:
                    _check_finite(window, last_saved, iterator.position)  # nothing non-finite is saved
                    checkpoints.save(step, state, _run_meta(setup, iterator.get_state()), metrics=valid)
                    last_saved = step
                bar.update(1)
                _maybe_inject_fault(step, checkpoints)
                if stopping:
                    checkpoints.wait()
                    raise Stopped(stop.signum, step)
        checkpoints.wait()
        if valid is None:  # resumed at the last step: nothing ran, read the final validation back
            valid = checkpoints.read_meta(train.steps).get("metrics") or setup.validate(state.params, state.rest)
        best_step = checkpoints.best_step()
    finally:
        iterator.close()
        checkpoints.close()
        log.close()
    log.plot(title=f"{train.objective} / {config.model.preset}")
    summary = {
        "objective": train.objective, "steps": train.steps, "model": config.model.preset,
        "parameters": setup.parameter_count, "resumed_from": start_step,
        "train_s": round(time.perf_counter() - started, 1), "best_step": best_step,
        "checkpoints": checkpoints.directory, "valid": metrics_log.json_safe(valid),
    }
    if jax.process_index() == 0:  # one writer of the workdir's logs (it is shared by all processes)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print("\nvalid split (" + (f"{train.eval_batches} batches" if train.eval_batches else "all") + ")")
        print(eval_lib.format_table(valid))
        print(f"metrics: {log.path}  plot: {log.plot_path}  tensorboard: {os.path.join(workdir, 'tensorboard')}")
        print(json.dumps(summary))
    return summary
