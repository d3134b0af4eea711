"""``--mode=chat``: talk to a trained model in the terminal.

The history is kept and framed exactly as training saw contexts (turns joined
with the release's delimiter, then the run's framing: ``bb3x_jax.data.framing``),
and responses come from ``config.generation``.
Type ``[reset]`` to start a new conversation, ``[exit]`` (or end the input) to
stop. Reads stdin line by line, so a conversation can be piped in as well.
"""

from __future__ import annotations

import sys
from typing import TextIO

import jax
import numpy as np
from flax import nnx
from ml_collections import config_dict

from bb3x_jax import config as config_lib
from bb3x_jax import decoding
from bb3x_jax.data import framing as framing_lib
from bb3x_jax.data.tokenizers.base import DELIMITER
from bb3x_jax.eval import generation as generation_eval
from bb3x_jax.train import runtime

RESET, EXIT = "[reset]", "[exit]"


class Conversation:
    """One conversation's history and the model's replies to it."""

    def __init__(self, network, tokenizer, config: config_dict.ConfigDict, framing=None):
        self.tokenizer = tokenizer
        self.config = config
        self.framing = framing or config_lib.framing(config)
        self.settings = config_lib.generation_settings(config)
        self.vocab_size = network.cfg.vocab_size  # a tokenizer larger than the model fails, not wraps
        graphdef, self.state = nnx.split(network)
        self.search = decoding.compiled_search(graphdef, self.settings)
        self.history: list[str] = []
        self.turns = 0

    def reset(self) -> None:
        self.history = []

    def respond(self, message: str) -> str:
        """Adds the human's message, generates the bot's reply, adds it too, returns it."""
        self.history.append(" ".join(message.split()))  # one turn per line: no delimiters inside a turn
        ids = framing_lib.context_ids([DELIMITER.join(self.history)], self.tokenizer, self.framing)
        decoding.check_ids(ids, self.vocab_size, "chat: the tokenizer's context ids")
        # one shape: compiled once
        rows = decoding.pad_batch(ids, rows=1, width=self.framing.text_truncate, pad_id=self.tokenizer.pad_id)
        key = jax.random.fold_in(jax.random.key(self.config.seed), self.turns)
        tokens, _ = self.search(self.state, rows, key)
        self.turns += 1
        reply = generation_eval.response_text(self.tokenizer, np.asarray(tokens)[0])
        self.history.append(reply)
        return reply


def load_conversation(config: config_dict.ConfigDict, workdir: str) -> Conversation:
    """The workdir's best (or ``eval.checkpoint``) parameters with the run's tokenizer."""
    trained = runtime.trained_network(config, workdir)
    return Conversation(trained.network, trained.setup.tokenizer, config, trained.setup.framing)


def run(config: config_dict.ConfigDict, workdir: str, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    conversation = load_conversation(config, workdir)
    interactive = stdin.isatty()
    print(f"Chatting with {workdir} ({RESET} starts over, {EXIT} or end of input stops).", file=stdout)
    while True:
        if interactive:
            print("YOU: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == EXIT:
            break
        message = line.strip()
        if not message:
            continue
        if message == RESET:
            conversation.reset()
            print("(new conversation)", file=stdout, flush=True)
            continue
        if not interactive:
            print(f"YOU: {message}", file=stdout)
        print(f"BOT: {conversation.respond(message)}", file=stdout, flush=True)
