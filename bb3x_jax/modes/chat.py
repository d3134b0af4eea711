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

from ml_collections import config_dict

from bb3x_jax import config as config_lib
from bb3x_jax.deploy.responder import Responder
from bb3x_jax.train import runtime

RESET, EXIT = "[reset]", "[exit]"


class Conversation:
    """One conversation's history and the model's replies to it (the server's responder, one row)."""

    def __init__(self, network, tokenizer, config: config_dict.ConfigDict, framing=None):
        self.responder = Responder(network, tokenizer, framing or config_lib.framing(config),
                                   config_lib.generation_settings(config), max_batch=1, seed=config.seed)
        self.history: list[str] = []

    def reset(self) -> None:
        self.history = []

    def respond(self, message: str) -> str:
        """Adds the human's message, generates the bot's reply, adds it too, returns it."""
        self.history.append(message)
        reply = self.responder.reply([self.history])[0]
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
