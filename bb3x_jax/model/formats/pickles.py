"""Reading torch-pickled checkpoints (ParlAI, metaseq, transformers ``.bin``) without running code from them.

A ``.pt`` file is a pickle, and unpickling can call any function the file
names: a checkpoint fetched from anywhere could run code the moment it is
loaded. So every checkpoint read goes through ``load``, which by default uses
torch's ``weights_only`` unpickler: it builds tensors and plain Python values
(dicts, lists, numbers, strings) and nothing else, plus ``SAFE_GLOBALS``, the
one other type real checkpoints hold (metaseq's options as an
``argparse.Namespace``; ParlAI's ``agent.save()`` files need nothing more). A
file that needs any other type is refused, naming the file and the type, with
the way to proceed: ``trust_pickle=True`` (``--trust_pickle``,
``train.trust_pickle``) reads it with the full unpickler, for files whose
source you trust.
"""

from __future__ import annotations

import argparse
import pickle
import re

from bb3x_jax.errors import UserError

SAFE_GLOBALS = (argparse.Namespace,)
TRUST_HINT = "trust_pickle=True in the API, --trust_pickle on the command lines, train.trust_pickle in the config"


class UntrustedPickleError(UserError, ValueError):
    """A checkpoint that the safe unpickler refuses (it names a type or function to call)."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        super().__init__(f"{path}: not loaded: unpickling it would call {what}, which a checkpoint's weights and "
                         f"options do not need; only if you trust the file's source, load it with {TRUST_HINT}")


def _offender(message: str) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message) or re.search(r"Unsupported operand (\S+)", message)
    return found.group(1) if found else message.strip().splitlines()[-1][:200]


def load(path: str, *, trust_pickle: bool = False, pickle_module=None, mmap_only: bool = False):
    """``torch.load`` of ``path`` onto the CPU, memory-mapped where the file allows it (zip format;
    ``mmap_only``: fail otherwise, for cheap peeks), by the safe unpickler unless ``trust_pickle``;
    ``pickle_module`` is used for trusted reads only."""
    import torch  # deferred: torch is needed only to read PyTorch checkpoints

    kwargs = {"map_location": "cpu", "weights_only": not trust_pickle}
    if trust_pickle and pickle_module is not None:
        kwargs["pickle_module"] = pickle_module

    def attempt(**extra):
        if trust_pickle:
            return torch.load(path, **kwargs, **extra)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, **kwargs, **extra)

    try:
        try:
            return attempt(mmap=True)
        except RuntimeError as error:  # legacy (pre-zip) files cannot be memory-mapped
            if "mmap" not in str(error) or mmap_only:
                raise
            return attempt()
    except pickle.UnpicklingError as error:
        if trust_pickle:
            raise
        raise UntrustedPickleError(path, _offender(str(error))) from None
