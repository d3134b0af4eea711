"""BB3-3B -> BB3x: CRINGE fine-tuning of ParlAI's BB3-3B checkpoint on the deployment release.

    python main.py --config configs/bb3_3b.py --workdir runs/bb3x_3b \
        --config.train.init_from=~/ParlAI/data/models/bb3/bb3_3B/model \
        --config.data.tokenizer.bpe_dir=~/ParlAI/data/gpt2 \
        --config.data.manual_dir=~/data/bb3_demo_chunks.tgz

``train.init_from`` is the zoo's model file (``model.opt`` and ``model.dict``
beside it); the architecture, the dictionary and the framing (ParlAI's bart
agent: ``[__start__] + context + [__end__]``, labels as ParlAI truncates
them) all come from that checkpoint. ``data.tokenizer.bpe_dir`` is where
GPT-2's ``encoder.json`` / ``vocab.bpe`` are (ParlAI keeps them in
``<datapath>/gpt2``), unless they sit beside the model file. Export the result
for ParlAI with
``python -m bb3x_jax.cli.convert runs/bb3x_3b out/model --to parlai``.

The settings are BB3-3B's fine-tuning recipe (configs/bb3_common.py): AdamW at
learning rate 1e-6, gradient clipping at 1.0, 100 warmup steps, dropout 0.1,
context truncated to 1024 tokens (the encoder's positions), labels to 128;
``dots_no_batch`` rematerialisation.

Where to run it (checked with ``--mode=plan``, which compiles the real step for
simulated devices: ``python main.py --config configs/bb3_3b.py --mode=plan
--config.plan.devices=N --config.mesh.data=D --config.mesh.fsdp=F
--config.bench.batch=64 --config.plan.device_memory_gb=GB``):
* one TPU v5p-64 slice (32 chips, 95 GB each): ``--config.mesh.data=4
  --config.mesh.fsdp=8`` at the global batch of 64 (plan: 4.0 GB of parameters
  and Adam moments + 9.0 GB of temporaries = 13.0 GB per chip, 2 rows each).
* one 8xH100 node (80 GB each): ``--config.mesh.data=1 --config.mesh.fsdp=8``
  at 64 (plan: 4.0 + 23.7 = 27.8 GB per GPU, 8 rows each).
The default mesh (all devices on the data axis) runs anywhere, e.g. on a CPU
with a tiny stand-in checkpoint.
"""

from configs import bb3_common


def get_config():
    # The encoder's 1,024 positions for the context, 128 tokens for the reply.
    return bb3_common.finetune_config("bb3_3b", text_truncate=1024, label_truncate=128,
                                      context_buckets=(128, 256, 512, 1024), remat="dots_no_batch")
