"""What the BB3 -> BB3x fine-tuning configs share (configs/bb3_3b.py, bb3_30b.py, bb3_175b.py).

BB3-3B's recipe (ParlAI's bb3 opts): AdamW at learning rate 1e-6, gradient
clipping at 1.0, 100 warmup steps, dropout 0.1. Weight decay is torch's AdamW
default 0.01 (ParlAI's ``adamw`` leaves it there). CRINGE with alpha 1 and
k 1 on the bot stream labelled by the default feedback policy; bf16 compute
with float32 parameters and Adam moments (12 bytes per parameter); scanned
layers; BB3's decoding for generations (beam 10, min length 20, 3-gram blocking
of the reply and the context). The tokenizer and the framing are the
checkpoint's own (``train.init_from``).
"""

from configs import cringe


def finetune_config(preset: str, *, text_truncate: int, label_truncate: int, context_buckets: tuple[int, ...],
                    remat: str):
    config = cringe.get_config()
    data = config.data
    data.stream = "bot"
    data.text_truncate = text_truncate
    data.label_truncate = label_truncate
    data.context_buckets = context_buckets
    data.label_buckets = (32, 64, label_truncate)
    data.batch_size = 64  # global
    data.tokenizer.kind = "auto"  # the checkpoint's own
    data.context_framing = "auto"
    data.label_framing = "auto"

    config.model.preset = preset  # what --mode=plan plans; train.init_from's architecture wins
    config.model.dropout = 0.1
    config.model.dtype = "bfloat16"
    config.model.scan_layers = True
    config.model.remat = remat

    train = config.train
    train.objective = "cringe"
    train.alpha = 1.0
    train.k = 1
    train.learning_rate = 1e-6
    train.warmup_steps = 100
    train.clip_norm = 1.0
    train.weight_decay = 0.01
    train.steps = 3000
    train.log_every = 10
    train.eval_every = 250
    train.eval_batches = 40
    config.checkpoint.every_steps = 250
    config.checkpoint.keep = 3

    config.generation.update({"method": "beam", "beam_size": 10, "min_len": 20, "block_ngram": 3,
                              "context_block_ngram": 3, "max_len": label_truncate})
    config.bench.update({"batch": 64, "context": text_truncate, "label": label_truncate})
    return config
