"""Peak host memory of ``bb3x_jax.load`` against the size of the weights.

Writes a random Blenderbot-shaped model (transformers safetensors directory,
and the same weights as a ParlAI checkpoint file), then loads each in a fresh
process and prints ONE JSON line per format with the weights' size and the
peak resident memory the load added (``VmHWM`` after minus ``VmRSS`` before). The
goal is about one copy of the weights: the loaders read tensors one by one
from memory-mapped files into a shape-only model.

    python benchmarks/conversion_memory.py [--d_model 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

CHILD = """
import json, sys
import jax
import bb3x_jax
from flax import nnx


def status(key):  # kB figures of this process's own memory (fresh at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024


before = status("VmRSS")
model = bb3x_jax.load(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(nnx.state(model.network)))
print(json.dumps({"added_peak_mb": status("VmHWM") - before, "rss_before_mb": before,
                  "rss_after_mb": status("VmRSS")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8008)
    args = parser.parse_args()
    import torch
    from transformers import BlenderbotConfig, BlenderbotForConditionalGeneration

    import bb3x_jax

    cfg = BlenderbotConfig(vocab_size=args.vocab, d_model=args.d_model, encoder_layers=args.layers,
                           decoder_layers=args.layers, encoder_attention_heads=16, decoder_attention_heads=16,
                           encoder_ffn_dim=4 * args.d_model, decoder_ffn_dim=4 * args.d_model,
                           max_position_embeddings=128)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        BlenderbotForConditionalGeneration(cfg).save_pretrained(hf_dir)
        parlai_file = os.path.join(tmp, "model.pt")
        bb3x_jax.load(hf_dir).save_pytorch(parlai_file, format="parlai")
        weights_mb = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir)
                         if f.endswith(".safetensors")) / 2**20
        for name, path in (("hf_safetensors", hf_dir), ("parlai", parlai_file)):
            out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True,
                                 cwd=REPO)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"format": name, "weights_mb": round(weights_mb, 1),
                              "file_mb": round(os.path.getsize(path) / 2**20, 1) if os.path.isfile(path) else None,
                              **{k: round(v, 1) for k, v in result.items()},
                              "copies": round(result["added_peak_mb"] / weights_mb, 2)}))


if __name__ == "__main__":
    main()
