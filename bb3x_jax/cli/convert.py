"""``python -m bb3x_jax.cli.convert SRC DST --to orbax|hf|parlai``: checkpoint conversion.

SRC is anything ``bb3x_jax.load`` reads (a transformers directory, a ParlAI or
metaseq checkpoint, or one of this project's orbax checkpoints or training
workdirs). ``orbax`` writes ``DST/0`` in the layout training reads with
``train.init_from`` (and the tokenizer's files in ``DST/tokenizer``);
``parlai`` writes ``DST``, ``DST.opt`` and ``DST.dict`` as ParlAI saves them
(the model must come with its ParlAI dictionary: a ParlAI checkpoint, or a
run trained from one); ``hf`` writes a transformers directory (with OPT's
tokenizer files for OPT models). Prints one JSON line with the architecture,
parameter count and files written; a missing or unusable input is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np
from flax import nnx

from bb3x_jax.model.api import load


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bb3x_jax.cli.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--to", required=True, choices=["orbax", "hf", "parlai"])
    parser.add_argument("--bpe_dir", default="", help="where GPT-2's BPE files are when not beside SRC")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="read SRC's pickles with the full unpickler, which can run code from the file: only for "
                             "files from a source you trust (bb3x_jax/model/formats/pickles.py)")
    args = parser.parse_args(argv)

    try:
        model = load(args.src, bpe_dir=args.bpe_dir, trust_pickle=args.trust_pickle)
        if args.to == "orbax":
            written = [model.save_orbax(args.dst)]
        else:
            written = model.save_pytorch(args.dst, format=args.to)
    except (OSError, ValueError) as error:
        print(f"convert: {error}", file=sys.stderr)
        sys.exit(2)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.network, nnx.Param)))
    print(json.dumps({"src": args.src, "dst": args.dst, "format": args.to, "arch": model.config.arch,
                      "variant": model.config.variant, "parameters": params, "written": written}))


if __name__ == "__main__":
    main()
