"""``python -m bb3x_jax.model params [PRESET ...]``: parameter counts without allocating weights.

The model is traced with ``nnx.eval_shape``, so even bb3_175b costs no memory.
Prints one JSON object: preset -> parameters (and the published size).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from flax import nnx

from bb3x_jax.model import config, transformer

PUBLISHED = {"bb3_3b": 2.7e9, "bb1_3b": 2.7e9, "bb3_30b": 30e9, "bb3_175b": 175e9}


def count_parameters(cfg: config.ModelConfig) -> int:
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bb3x_jax.model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="parameter counts of presets")
    p.add_argument("presets", nargs="*", default=list(config.PRESETS))
    args = parser.parse_args(argv)
    out = {}
    for name in args.presets:
        n = count_parameters(config.preset(name))
        entry = {"parameters": n}
        if name in PUBLISHED:
            entry["published"] = PUBLISHED[name]
            entry["relative_difference"] = round(n / PUBLISHED[name] - 1, 4)
        out[name] = entry
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
