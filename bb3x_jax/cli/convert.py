"""``python -m bb3x_jax.cli.convert SRC DST --to orbax|hf|parlai``: checkpoint conversion.

SRC is anything ``bb3x_jax.load`` reads (a transformers directory, a ParlAI or
metaseq checkpoint, or one of this project's orbax checkpoints or training
workdirs). ``orbax`` writes ``DST/0`` in the layout training reads with
``train.init_from`` (and the tokenizer's files in ``DST/tokenizer``);
``parlai`` writes ``DST``, ``DST.opt`` and ``DST.dict`` as ParlAI saves them
(the model must come with its ParlAI dictionary: a ParlAI checkpoint, or a
run trained from one); ``hf`` writes a transformers directory (with OPT's
tokenizer files for OPT models). Prints one JSON line with the architecture,
parameter count and files written. A missing or unusable input, or a
destination that already holds a file the conversion would write (unless
``--overwrite``; orbax checkpoints are never overwritten), is one line on
stderr naming the path, exit status 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys

import jax
import numpy as np
from flax import nnx

from bb3x_jax.data.tokenizers import files as tokenizer_files
from bb3x_jax.model.api import BB3Model, load


def _fail(message: str) -> None:
    print(f"convert: {message}", file=sys.stderr)
    sys.exit(2)


def source_file_problem(path: str) -> str:
    """Why ``path``, a file, cannot be a checkpoint ('' when it may be one): a checkpoint file is
    PyTorch's (a zip archive, or a pickle from older versions); a folder is left to ``load``."""
    if not os.path.isfile(path):
        return ""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as error:
        return f"{path}: {error.strerror or error}"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return ""
    return f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"


def existing_destinations(model: BB3Model, dst: str, to: str) -> list[str]:
    """The paths the conversion would write that already exist.

    ``hf`` writes into a folder (config, weights, tokenizer files; their names
    depend on the transformers version), so any non-empty folder counts.
    """
    if to == "orbax":
        candidates = [os.path.join(dst, "0")]
        if model.tokenizer_spec is not None:
            candidates.append(os.path.join(dst, tokenizer_files.BUNDLE_DIR))
    elif to == "parlai":
        candidates = [dst, tokenizer_files.parlai_opt_path(dst), dst + ".dict"]
        spec = model.tokenizer_spec
        if spec is not None and spec.kind == "parlai" and spec.options.get("dict_tokenizer") == "gpt2":
            folder = os.path.dirname(os.path.abspath(dst))
            for key, name in (("vocab", "encoder.json"), ("merges", "vocab.bpe")):
                target = os.path.join(folder, name)
                if os.path.abspath(spec.files[key]) != target:
                    candidates.append(target)
    else:
        if os.path.isdir(dst):
            return [dst] if os.listdir(dst) else []
        candidates = [dst]
    return [path for path in candidates if os.path.lexists(path)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bb3x_jax.cli.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--to", required=True, choices=["orbax", "hf", "parlai"])
    parser.add_argument("--bpe_dir", default="", help="where GPT-2's BPE files are when not beside SRC")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="read SRC's pickles with the full unpickler, which can run code from the file: only for "
                             "files from a source you trust (bb3x_jax/model/formats/pickles.py)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an existing hf or parlai destination")
    args = parser.parse_args(argv)

    if problem := source_file_problem(args.src):
        _fail(problem)
    try:
        model = load(args.src, bpe_dir=args.bpe_dir, trust_pickle=args.trust_pickle)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as error:
        message = str(error) or type(error).__name__
        _fail(message if args.src in message else f"{args.src}: {message}")
    existing = existing_destinations(model, args.dst, args.to)
    if existing and (args.to == "orbax" or not args.overwrite):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        how = "choose another destination" if args.to == "orbax" else "pass --overwrite to replace it"
        _fail(f"{existing[0]}{more} exists; {how}")
    try:
        if args.to == "orbax":
            written = [model.save_orbax(args.dst)]
        else:
            written = model.save_pytorch(args.dst, format=args.to)
    except (OSError, ValueError) as error:
        _fail(str(error))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.network, nnx.Param)))
    print(json.dumps({"src": args.src, "dst": args.dst, "format": args.to, "arch": model.config.arch,
                      "variant": model.config.variant, "parameters": params, "written": written}))


if __name__ == "__main__":
    main()
