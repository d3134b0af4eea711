"""The main job's configuration: one ml_collections tree, validated at start-up.

Override any leaf on the command line, e.g.
    python main.py --config configs/cringe.py --config.data.batch_size=32
An unknown key or a value of the wrong type fails at start-up with its name
(ml_collections), and bb3x_jax.config.validate checks values and their
relations (also naming the key).
"""

from ml_collections import config_dict

from bb3x_jax.data import schema
from bb3x_jax.data.feedback import DEFAULT_POLICY


def get_config() -> config_dict.ConfigDict:
    config = config_dict.ConfigDict()
    config.seed = 0

    data = config_dict.ConfigDict()
    # '' -> the synthetic release is written into the workdir and used.
    data.manual_dir = ""
    # Where the synthetic release and the prepared data (TFDS files, tokenizer, token
    # caches) are kept; '' -> the workdir. Runs sharing a release may share this.
    data.dir = ""
    data.stream = "bot"
    data.skip_malformed = False
    # Expected sha256 of a release tarball; 'none' skips the check (self-made tarballs).
    data.tarball_sha256 = schema.TARBALL_SHA256
    data.num_workers = -1  # parser processes for preparation (-1: auto, 0: inline; releases under 16 MiB: inline)
    data.synthetic = config_dict.ConfigDict({"conversations": 2000, "seed": 0})
    data.policy = config_dict.ConfigDict(DEFAULT_POLICY.to_dict())
    # reward thresholds are floats or None; tell ml_collections their type.
    data.policy.reward_negative_threshold = config_dict.placeholder(float)
    data.policy.reward_positive_threshold = config_dict.placeholder(float)
    # The tokenizer. kind: auto (the checkpoint's own when train.init_from is set, else
    # sentencepiece) | sentencepiece | checkpoint | parlai | hf | metaseq
    # (bb3x_jax/data/tokenizers/files.py says where each format keeps its files).
    data.tokenizer = config_dict.ConfigDict(
        {
            "kind": "auto",
            # sentencepiece: a .model file ('' -> trained on the train split, cached beside
            # the prepared data); parlai: a ParlAI model file (with .opt and .dict beside it);
            # hf: a transformers OPT directory; metaseq: a checkpoint file or folder;
            # checkpoint: any of these or a workdir of this project ('' -> train.init_from).
            "path": "",
            "bpe_dir": "",  # where GPT-2's BPE files are when not beside the checkpoint
            "vocab_size": 4000,  # a trained sentencepiece model's size
            "max_sentences": 200_000,
        }
    )
    data.text_truncate = 128
    # How contexts and labels become token rows (bb3x_jax/data/framing.py). auto: as the
    # tokenizer's checkpoint was trained (a ParlAI checkpoint's agent, BB3's OPT prompt),
    # plain contexts and end_kept labels for this project's own models. Or force one:
    # context plain | bart | bb3_opt_prompt; label end_kept | parlai.
    data.context_framing = "auto"
    data.label_framing = "auto"
    data.label_truncate = 32
    data.context_buckets = (32, 64, 128)
    data.label_buckets = (32,)
    data.batch_size = 32  # global batch, split over processes and the batch mesh axes
    data.prefetch = 2  # batches prepared ahead in a background thread
    data.pipeline_workers = 0  # processes that build batches (0: in the main process)
    # Tokenize each split once into memory-mapped token files (reused while the
    # tokenizer and truncation stay the same); False tokenizes on the fly.
    data.token_cache = True
    # Generated splits (bb3x_jax.data.generated) read after the train split; set by
    # --mode=iterate for each iteration's training run.
    data.extra_train = config_dict.placeholder(tuple)
    config.data = data

    # Device mesh: axis sizes; -1 takes the devices the other axes leave.
    config.mesh = config_dict.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    # The network: a named preset (bb3x_jax/model/config.py) with the vocabulary
    # and special ids taken from the tokenizer.
    config.model = config_dict.ConfigDict(
        {
            "preset": "tiny",
            "dropout": 0.1,
            "dtype": "float32",  # compute dtype (bfloat16 on accelerators)
            "param_dtype": "float32",  # parameters and optimizer state stay float32
            "scan_layers": False,  # one scanned layer per stack: compile time independent of depth
            "remat": "none",  # none | full | dots | dots_no_batch: activations recomputed in backward
        }
    )

    # --mode=train: the objective, the optimizer, validation, and where to start.
    config.train = config_dict.ConfigDict(
        {
            "objective": "cringe",  # cringe | mle | mle_positive_only | unlikelihood
            "alpha": 1.0,
            "k": 1,
            # > 0: add this times a KL per target token to the model the run starts from
            # (train.init_from; in --mode=iterate the previous iteration), the bad token of negative
            # examples left out (cringe.anchor_kl): where the probability the negative term frees
            # goes, so that sampling stays as fluent as the start. forward: KL(start || model);
            # reverse: KL(model || start), which charges most for mass moved to unlikely tokens.
            "kl_anchor": 0.0,
            "kl_anchor_direction": "forward",
            # The anchor's weights when they are not the start's: a checkpoint as init_from reads
            # it, with the trained model's parameter shapes ('' -> the model the run starts from).
            "kl_anchor_from": "",
            "detach_positives": False,
            "train_ce_on_positive": True,
            "steps": 300,
            "learning_rate": 1e-3,
            "warmup_steps": 30,
            "weight_decay": 0.01,
            "clip_norm": 1.0,
            "grad_accum": 1,
            "log_every": 10,
            "eval_every": 100,  # validate every this many steps (0: only at the end)
            "eval_batches": 20,  # batches of the valid split per validation (0: all)
            # A model to start from instead of random weights: a ParlAI checkpoint
            # file, a transformers directory, a metaseq file or an orbax checkpoint
            # of this project (bb3x_jax.load); its vocabulary must be the tokenizer's.
            "init_from": "",
            # Read init_from's pickles with the full unpickler, which can run code from the
            # file (bb3x_jax/model/formats/pickles.py): only for files from a source you trust.
            "trust_pickle": False,
        }
    )

    # Checkpoints in <workdir>/checkpoints; a run restarts from the newest whole one.
    config.checkpoint = config_dict.ConfigDict(
        {
            "every_steps": 100,  # also saved at every validation and at the end
            "keep": 2,  # newest checkpoints kept (plus the best)
            "best_metric": "ppl_positive",  # validation metric of the best checkpoint ('' = none)
            "best_mode": "min",
            "async_save": True,  # write in the background while training goes on
        }
    )

    # --mode=eval: likelihood metrics of a trained model on a split, and metrics of
    # its generations (F1, and a judge's good-response rate by bad reason) for
    # generate_examples contexts spread evenly over the split (0: none).
    config.eval = config_dict.ConfigDict(
        {
            "split": "valid",
            "checkpoint": "best",  # best | latest | a step number
            "batches": 0,  # 0: the whole split
            "generate_examples": 200,
            "generate_batch": 32,
            # auto: the synthetic world's ground truth on the synthetic release, else the
            # feedback classifier (judge.path) when one was trained, else none
            "judge": "auto",  # auto | synthetic | classifier | none
        }
    )

    # How the model generates (eval, chat, iterate): BB3's beam search with
    # n-gram blocking of the response and of the context. BB3's min length of 20
    # BPE tokens is 0 here: the synthetic world's responses are short.
    config.generation = config_dict.ConfigDict(
        {
            "method": "beam",  # greedy | beam | sample
            "max_len": 32,
            "min_len": 0,
            "beam_size": 10,
            "block_ngram": 3,
            "context_block_ngram": 3,
            "top_k": 0,
            "top_p": 1.0,
            "temperature": 1.0,
            "length_penalty": 1.0,
        }
    )

    # --mode=iterate: iterative CRINGE from the workdir's trained model (iteration 0).
    # Each iteration generates (config.generation) for `contexts` training contexts,
    # judges them, balances them 50/50 into a generated split, and trains `steps`
    # CRINGE steps (config.train otherwise) from the previous iteration's model on
    # the train split plus every generated split so far, `generated_repeat` times
    # each; then it is evaluated (config.eval) like --mode=eval. All of it lives in
    # <workdir>/iterations/<i>/; an interrupted iteration resumes.
    config.iterate = config_dict.ConfigDict(
        {
            "iterations": 3,
            "contexts": 2000,  # training contexts generated for per iteration (0: all)
            "steps": 300,
            "generated_repeat": 1,  # how many times each generated split is read per epoch
            # With train.kl_anchor > 0, what each iteration is anchored to: previous (the model it
            # starts from) or baseline (iteration 0's model, for every iteration: the drift of all
            # iterations together is charged, not each iteration's own).
            "anchor": "previous",  # previous | baseline
            # auto: the synthetic world's judge on the synthetic release, else the
            # feedback classifier of --mode=train_judge (judge.path)
            "judge": "auto",  # auto | synthetic | classifier
            # A deployment folder (release_data_00..99.jsonl in the release's format) of people's
            # rated chats with the newest iteration's model: the run then makes ONE iteration, the
            # next, whose split is the rated bot messages of its train chunks instead of judged
            # generations ('' -> generate and judge).
            "deployment": "",
        }
    )

    # --mode=serve: a web chat with the workdir's model (its eval.checkpoint, best by
    # default; train.init_from when the workdir has none) that records every
    # conversation and rating in the release's format in <workdir>/deployment
    # (or `folder`), ready for --config.data.manual_dir or iterate.deployment.
    config.serve = config_dict.ConfigDict(
        {
            "host": "127.0.0.1",  # loopback only unless set otherwise
            "port": 8080,
            "folder": "",  # '' -> <workdir>/deployment
            "checkpoints": "",  # a folder of checkpoints to serve instead ('' -> <workdir>/checkpoints)
            "max_chars": 1000,  # longest message accepted (longer: HTTP 413)
            "max_batch": 8,  # requests decoded together in one search (powers of 2 up to this)
            "batch_wait_ms": 20.0,  # how long the first request of a batch waits for others
            "warm_up": True,  # compile every batch size before accepting requests
            "compact_every_s": 2.0,  # the chunk files follow the durable log within this time
            # shown above the chat; say what is recorded and why
            "notice": "Conversations and ratings on this page are recorded for research, without "
                      "your name or address. Do not share personal information.",
            # the reasons a thumbs down offers, stored as the message's dislike_type
            "reasons": "inappropriate,nonsensical,off_topic,ignoring_last_turn,repeating,other",
            # comma-separated words or phrases: a message containing one is flagged unsafe in its
            # safety verdicts (the server's string matcher); '' flags nothing
            "blocked_words": "",
            # the canned reply to a flagged message ('' -> the model replies anyway)
            "safety_response": "",
        }
    )

    # --mode=train_judge: a feedback classifier (good / bad response) trained on the
    # release's labelled bot messages (config.data.policy decides the labels),
    # with its held-out accuracy on eval.split; written to <workdir>/judge.
    config.judge = config_dict.ConfigDict(
        {
            "path": "",  # where the classifier is written / read ('' -> <workdir>/judge)
            # A dialogue model (encoder-decoder) to start from: its encoder reads the context,
            # its decoder the response, and a linear layer its decoder states
            # (model/classifier.py); it must use the run's tokenizer. A path bb3x_jax.load
            # reads (a training workdir, a checkpoint), 'workdir' for this run's workdir
            # (the model --mode=train trained there), '' for the small encoder below from
            # random weights. d_model .. max_len then come from the model and its framing, and
            # fine-tuning wants fewer steps at a lower rate (configs/bb3x_table.py: 150 at 3e-4).
            "init_from": "",
            # Canned system responses (safety deflections, crash messages) keep their own
            # feedback as judge labels; the policy's canned rule leaves them unlabeled for
            # CRINGE (not model generations), and a judge that never saw one calls them bad.
            "label_canned": True,
            # Sized for CPU (about 1 min of training on 2 cores); on the real release
            # (~150k labelled messages) raise steps, max_len and the width.
            "d_model": 32,
            "n_heads": 4,
            "ffn_dim": 128,
            "n_layers": 2,
            "max_len": 64,  # context tail + separator + response tokens seen by the classifier
            "steps": 600,
            "batch_size": 64,
            "learning_rate": 1e-3,
            "weight_decay": 0.01,
            "dropout": 0.1,
        }
    )

    # --mode=bench: timed train steps of the real step on synthetic batches, then
    # timed decoding (decode_len new tokens per context; 0 skips it) with
    # decode_beam beams (1: greedy).
    config.bench = config_dict.ConfigDict(
        {"batch": 8, "context": 128, "label": 32, "negative_fraction": 0.5, "warmup": 3, "steps": 20,
         "decode_len": 32, "decode_beam": 1}
    )

    # --mode=plan: compile the train step for simulated CPU devices from abstract
    # shapes (batch shapes from the bench section) and report per-device memory.
    # devices 0: the product of the explicit mesh sizes (a -1 axis gets 1); with
    # devices N, a -1 axis takes what the others leave of N.
    config.plan = config_dict.ConfigDict({"devices": 0, "device_memory_gb": 80.0})

    # Multi-host runs (TPU pods, GPU clusters): every host runs the same command.
    # With enabled=True, jax.distributed.initialize() is called first; empty /
    # -1 values let JAX detect them (TPU, SLURM, Open MPI).
    config.distributed = config_dict.ConfigDict(
        {"enabled": False, "coordinator_address": "", "num_processes": -1, "process_id": -1}
    )

    # --mode=data: how many batches the sharded data check runs through.
    config.data_check = config_dict.ConfigDict({"batches": 50})
    return config
