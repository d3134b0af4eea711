"""BB3-175B -> BB3x: CRINGE fine-tuning of the 175B OPT model behind BB3-175B (what BB3x was).

    python main.py --config configs/bb3_175b.py --workdir gs://bucket/bb3x_175b \
        --config.train.init_from=gs://bucket/bb3_175b/ \
        --config.data.manual_dir=gs://bucket/bb3_demo_chunks.tgz \
        --config.mesh.data=1 --config.mesh.fsdp=64 --config.distributed.enabled=True

``train.init_from`` is the folder of metaseq's model-parallel parts (merged on
load, with ``dict.txt`` and GPT-2's vocabulary and merges), a consolidated
file, or a transformers OPT directory. Framing and settings as
configs/bb3_30b.py (configs/bb3_common.py).

Where to run it (``--mode=plan`` on simulated devices): float32 parameters and
Adam moments alone are 2.1 TB, so
* one TPU v5p-64 slice (32 chips, 95 GB each) does not hold it:
  ``--config.mesh.fsdp=32`` plans 65.6 GB of state + 47.6 GB of temporaries = 113.2 GB
  per chip (one row each).
* one 8xH100 node (640 GB in all) cannot hold the state either.
* 64 devices do: ``--config.mesh.fsdp=64`` at the global batch of 64, one row
  per device (plan: 32.8 + 37.9 = 70.7 GB per device: a v5p-128 slice, or
  eight 8xH100 nodes).
"""

from configs import bb3_common


def get_config():
    # BB3's OPT prompt kept below BB3's 1,912-token prompt limit (counted with the leading
    # </s>), and a 128-token reply: both fit OPT's 2,048 positions.
    return bb3_common.finetune_config("bb3_175b", text_truncate=1912, label_truncate=128,
                                      context_buckets=(256, 512, 1024, 1912), remat="full")
