"""``--mode=serve``: a web chat that collects conversations and ratings in the release's format.

The model is the workdir's (``eval.checkpoint``: best by default; of
``serve.checkpoints`` when set, e.g. an iteration's ``iterations/<i>/checkpoints``), or
``train.init_from`` (anything ``bb3x_jax.load`` reads, with its own tokenizer)
when the workdir has no checkpoint yet; it replies with ``config.generation``.
Conversations go to ``serve.folder`` (default ``<workdir>/deployment``) as
``release_data_NN.jsonl`` chunks, which ``--config.data.manual_dir`` and
``--config.iterate.deployment`` read as they read the release. Stop with
Ctrl-C (or SIGTERM): the chunk files are brought up to date on the way out,
and a restart continues the conversations left open.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from typing import TextIO

import uvicorn
from absl import logging
from ml_collections import config_dict

from bb3x_jax import config as config_lib
from bb3x_jax.deploy import app as app_lib
from bb3x_jax.deploy import store as store_lib
from bb3x_jax.deploy.responder import BatchingResponder, Responder
from bb3x_jax.errors import ConfigError
from bb3x_jax.model import api
from bb3x_jax.train import runtime


def settings(config: config_dict.ConfigDict) -> app_lib.ServeSettings:
    serve = config.serve
    return app_lib.ServeSettings(
        max_chars=serve.max_chars, notice=serve.notice,
        reasons=tuple(r.strip() for r in serve.reasons.split(",") if r.strip()),
        blocked_words=app_lib.parse_words(serve.blocked_words), safety_response=serve.safety_response.strip(),
        compact_every_s=serve.compact_every_s,
    )


def load_responder(config: config_dict.ConfigDict, workdir: str) -> tuple[Responder, str]:
    """(the responder, what it serves): the workdir's checkpoint, else ``train.init_from``."""
    settings_ = config_lib.generation_settings(config)
    options = dict(max_batch=config.serve.max_batch, seed=config.seed)
    folder = config.serve.checkpoints or os.path.join(workdir, "checkpoints")
    if config.serve.checkpoints and not _has_checkpoints(folder):
        raise ConfigError("serve.checkpoints", f"{folder} holds no checkpoint (step folders)")
    if _has_checkpoints(folder):
        trained = runtime.trained_network(config, workdir, checkpoints_dir=config.serve.checkpoints or None)
        responder = Responder(trained.network, trained.setup.tokenizer, trained.setup.framing, settings_, **options)
        return responder, trained.checkpoint
    path = config.train.init_from
    if not path:
        raise ConfigError("train.init_from", f"{workdir} has no checkpoint to serve; train there first or give "
                                             "--config.train.init_from=PATH")
    try:
        loaded = api.load(path, bpe_dir=config.data.tokenizer.bpe_dir, trust_pickle=config.train.trust_pickle)
        tokenizer = loaded.tokenizer
    except (OSError, ValueError) as error:
        raise ConfigError("train.init_from", str(error)) from None
    framing = config_lib.framing(config, loaded.tokenizer_spec)
    return Responder(loaded.network, tokenizer, framing, settings_, **options), path


def _has_checkpoints(folder: str) -> bool:
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def check_port(host: str, port: int) -> None:
    """Fails in one line before the model loads when the address is taken or not this machine's."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        why = "is in use" if error.errno == errno.EADDRINUSE else f"cannot be used ({error.strerror})"
        raise ConfigError("serve.port", f"{host}:{port} {why}; choose another with --config.serve.port "
                                        "or --config.serve.host") from None


def run(config: config_dict.ConfigDict, workdir: str, stdout: TextIO = sys.stdout) -> None:
    serve = config.serve
    check_port(serve.host, serve.port)
    responder, source = load_responder(config, workdir)
    if serve.warm_up:
        logging.info("Compiling the search for batches of %s", responder.sizes)
        responder.warm_up()
    folder = serve.folder or os.path.join(workdir, "deployment")
    store = store_lib.DeploymentStore(folder)
    replay = store.replay_report
    if replay.events:
        logging.info("Replayed %d logged events: %d conversations, %d still open%s", replay.events,
                     replay.conversations, replay.open,
                     f" (dropped {replay.torn_tail_bytes} bytes of an unacknowledged last event)"
                     if replay.torn_tail_bytes else "")
    app = app_lib.make_app(store, BatchingResponder(responder, wait_s=serve.batch_wait_ms / 1000), settings(config))
    print(f"Serving {source} at http://{serve.host}:{serve.port}/ ; conversations are written to {folder}",
          file=stdout, flush=True)
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="warning", access_log=False)
