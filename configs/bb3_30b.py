"""BB3-30B -> BB3x: CRINGE fine-tuning of the 30B OPT model behind BB3-30B.

    python main.py --config configs/bb3_30b.py --workdir runs/bb3x_30b \
        --config.train.init_from=~/models/bb3_30b/consolidated.pt \
        --config.data.manual_dir=~/data/bb3_demo_chunks.tgz

``train.init_from`` is a metaseq checkpoint (a consolidated file or the folder
of its model-parallel parts, with fairseq's ``dict.txt`` and GPT-2's
vocabulary and merges beside it or in ``data.tokenizer.bpe_dir``) or a
transformers OPT directory. Contexts are framed as BB3's OPT prompt
(``bb3x_jax/data/prompts.py``): the vanilla dialogue instruction, "Person 1:" /
"Person 2:" turns, "Person 2:" last; the reply is `` " " + text`` and ``</s>``.
Export with ``python -m bb3x_jax.cli.convert runs/bb3x_30b out --to hf``.

Settings (configs/bb3_common.py): BB3x's fine-tuning settings for the OPT
models are not published. The learning rate, warmup and clipping are BB3-3B's
recipe (1e-6, 100, 1.0): a fine-tune from a strong checkpoint that CRINGE
should move little, and a larger model takes no larger step; dropout 0.1 as in
OPT's pretraining; prompt up to 1,912 tokens (BB3's limit) plus a 128-token
reply within OPT's 2,048 positions; bf16 compute with float32 parameters and
Adam moments (12 bytes per parameter), full rematerialisation.

Where to run it (``--mode=plan`` on simulated devices, as in configs/bb3_3b.py):
* one TPU v5p-64 slice (32 chips, 95 GB each): ``--config.mesh.data=1
  --config.mesh.fsdp=32`` at the global batch of 64 (plan: 11.3 GB of parameters and Adam
  moments + 20.8 GB of temporaries = 32.1 GB per chip, 2 rows each).
* one 8xH100 node (80 GB each): ``--config.mesh.data=1 --config.mesh.fsdp=8
  --config.data.batch_size=8`` (plan: 45.0 + 30.0 = 75.0 GB per GPU, one row each:
  close to the limit, so a step sees 8 examples)
"""

from configs import bb3_common


def get_config():
    # BB3's OPT prompt kept below BB3's 1,912-token prompt limit (counted with the leading
    # </s>), and a 128-token reply: both fit OPT's 2,048 positions.
    return bb3_common.finetune_config("bb3_30b", text_truncate=1912, label_truncate=128,
                                      context_buckets=(256, 512, 1024, 1912), remat="full")
