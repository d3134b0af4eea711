"""``python -m bb3x_jax.convert SRC DST --to orbax|hf|parlai``: checkpoint conversion.

SRC is anything ``bb3x_jax.load`` reads (a transformers directory, a ParlAI or
metaseq checkpoint, or one of this project's orbax checkpoints). ``orbax``
writes ``DST/0`` in the layout training reads with ``train.init_from``. Prints
one JSON line with the architecture and parameter count.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from flax import nnx


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bb3x_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--to", required=True, choices=["orbax", "hf", "parlai"])
    args = parser.parse_args(argv)
    from bb3x_jax.model.api import load

    model = load(args.src)
    if args.to == "orbax":
        model.save_orbax(args.dst)
    else:
        model.save_pytorch(args.dst, format=args.to)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model.network, nnx.Param)))
    print(json.dumps({"src": args.src, "dst": args.dst, "format": args.to, "arch": model.config.arch,
                      "variant": model.config.variant, "parameters": params}))


if __name__ == "__main__":
    main()
