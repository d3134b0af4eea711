"""PyTorch reference for the training benchmark: train-step tokens/s on CPU (a script, not a test).

    python benchmarks/torch_reference.py --model bench_small [--backend hf|parlai] [--objective cringe|mle]
        [--batch 8 --context 128 --label 32 --steps 20 --warmup 3 --threads N --dropout 0.1]

Measures what the JAX train step does, in PyTorch on the same machine: one
full optimisation step on a synthetic batch -- forward (dropout on),
the objective, backward, global-norm clipping to 1.0, an AdamW update -- and
reports the median step time as tokens/s. It is a fair reference because
everything but the framework is the same:

* architecture: the same preset (``bb3x_jax.model.config``), built as
  transformers' ``BlenderbotForConditionalGeneration`` / ``OPTForCausalLM``
  through ``bb3x_jax.model.formats.hf.hf_config_dict`` (the mapping our checkpoint
  export uses), or (``--backend parlai``) ParlAI's own
  ``TransformerGeneratorModel`` (prelayernorm encoder-decoder, or its
  decoder-only form with ``TransformerDecoderOnly``);
* shapes: batch x context encoder tokens and batch x label decoder tokens, all
  rows full length (no padding). Decoder-only models read context + label as
  one sequence; logits are computed for the label positions only, as ParlAI's
  decoder-only model and ``logits_to_keep`` do;
* objective: CRINGE with k = 1, alpha = 1 (CE on positive examples, softplus(s- - s+)
  against the best non-gold token on negative ones, divided by the number of
  target tokens), half the examples negative. ``--backend hf`` uses the
  compact implementation below, checked equal to ``bb3x_jax.cringe.cringe_loss``
  in tests/test_benchmarks_torch_reference.py; ``--backend parlai`` uses
  ParlAI's ``ContrastiveCrossEntropyLoss`` with its agent's reduction.
  ``--objective mle`` is plain token-level cross entropy;
* optimizer: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0.01; the fused
  CPU kernel where torch has it), clipping at global norm 1.0, as the JAX step.

Batches are generated before timing (fixed seed), so the numbers are the
step alone. ``--steps`` steps are timed after ``--warmup`` untimed ones.
Prints ONE JSON line; ``tokens_per_s`` counts context + label tokens.
Times are printed to four significant digits at any speed, and the rates are
computed from the printed median, so ``tokens_per_s * step_s_median`` is the
batch's token count to within the rounding of the last digit.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from bb3x_jax.model.config import PRESETS, ModelConfig  # noqa: E402

# The decoder-only benchmark model (OPT conventions, bench_small's size); the
# JAX side names it bench_small_opt in bb3x_jax.model.config, which wins when present.
BENCH_SMALL_OPT = ModelConfig(
    arch="decoder_only", vocab_size=8008, d_model=512, n_heads=8, ffn_dim=2048, n_encoder_layers=0,
    n_decoder_layers=6, n_positions=512, variant="prelayernorm", activation="relu", embeddings_scale=False,
    position_offset=2, pad_id=1, start_id=2, end_id=2, decoder_start=(2,),
)  # fmt: skip
MODELS: dict[str, ModelConfig] = {"bench_small_opt": BENCH_SMALL_OPT, **PRESETS}

FIRST_TOKEN = 4  # synthetic tokens avoid the special ids (pad, start, end, unk) of both families


def model_config(name: str, dropout: float) -> ModelConfig:
    return MODELS[name].replace(dropout=dropout)


# --- the objective -----------------------------------------------------------------


def cringe_loss(logits: torch.Tensor, targets: torch.Tensor, feedback: torch.Tensor, *, alpha: float = 1.0,
                pad_id: int = 0) -> torch.Tensor:
    """CRINGE, k = 1, as bb3x_jax.cringe.cringe_loss: (sum CE + alpha * sum CT) / counted tokens.

    logits [B, T, V] score targets [B, T]; feedback [B]: 1 positive, 0 negative, -1 unlabeled.
    """
    x = logits.float()
    gold = x.gather(-1, targets[..., None]).squeeze(-1)
    ce = torch.logsumexp(x, dim=-1) - gold
    top2 = x.detach().topk(2, dim=-1).indices
    candidate = torch.where(top2[..., 0] == targets, top2[..., 1], top2[..., 0])  # best non-gold token
    ct = F.softplus(gold - x.gather(-1, candidate[..., None]).squeeze(-1))
    nonpad = targets != pad_id
    ce_mask = nonpad & ((feedback == 1) | (feedback == -1))[:, None]
    ct_mask = nonpad & (feedback == 0)[:, None]
    total = torch.where(ce_mask, ce, 0.0).sum() + alpha * torch.where(ct_mask, ct, 0.0).sum()
    return total / (ce_mask | ct_mask).sum().clamp(min=1)


def mle_loss(logits: torch.Tensor, targets: torch.Tensor, feedback: torch.Tensor, *, pad_id: int = 0) -> torch.Tensor:
    """Mean token cross entropy over non-pad targets, feedback ignored."""
    del feedback
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad_id)


def parlai_cringe_class():
    """ParlAI's ContrastiveCrossEntropyLoss: its class statement, run from projects/cringe/cringe_loss.py.

    Importing that module imports ParlAI's agents and with them scikit-learn,
    whose own copy of the OpenMP runtime (a second libgomp next to torch's)
    makes every torch op here milliseconds slower; the class needs only torch.
    """
    spec = importlib.util.find_spec("projects.cringe.cringe_loss")
    if spec is None or spec.origin is None:
        raise ImportError("ParlAI's projects/cringe is not installed")
    with open(spec.origin) as f:
        tree = ast.parse(f.read(), spec.origin)
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ContrastiveCrossEntropyLoss"]
    namespace = {"torch": torch, "CrossEntropyLoss": torch.nn.CrossEntropyLoss,
                 "Categorical": torch.distributions.Categorical}
    exec(compile(ast.Module([node], type_ignores=[]), spec.origin, "exec"), namespace)
    return namespace["ContrastiveCrossEntropyLoss"]


def parlai_loss(objective: str, pad_id: int = 0):
    """ParlAI's criterion and its agents' reduction (sum over tokens / counted tokens)."""
    if objective == "mle":
        return lambda logits, targets, feedback: mle_loss(logits, targets, feedback, pad_id=pad_id)
    criterion = parlai_cringe_class()(ct_loss_weight=1.0, num_pos_predictions=1, ignore_index=pad_id,
                                            reduction="none")

    def loss(logits, targets, feedback):
        t = targets.shape[1]
        total, _, _, ce_mask, ct_mask = criterion(logits.flatten(0, 1), targets.flatten(),
                                                  feedback[:, None].repeat(1, t).flatten())
        counted = (targets != pad_id) & (ce_mask.view(-1, t).bool() | ct_mask.view(-1, t).bool())
        return total.sum() / counted.sum()

    return loss


# --- the models --------------------------------------------------------------------


def build_hf(cfg: ModelConfig, attn: str):
    """(model, forward) with forward(context, label) -> logits [B, label, V] scoring label."""
    import transformers

    from bb3x_jax.model.formats.hf import hf_config_dict

    fields = hf_config_dict(cfg)
    kind = fields.pop("model_type")
    if kind == "blenderbot":
        model = transformers.BlenderbotForConditionalGeneration(
            transformers.BlenderbotConfig(**fields, attn_implementation=attn))
        start = cfg.decoder_start[0]

        def forward(context, label):
            decoder_in = torch.cat([torch.full_like(label[:, :1], start), label[:, :-1]], dim=1)
            return model(input_ids=context, attention_mask=torch.ones_like(context),
                         decoder_input_ids=decoder_in, use_cache=False).logits
    else:
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**fields, attn_implementation=attn))

        def forward(context, label):
            sequence = torch.cat([context, label[:, :-1]], dim=1)
            return model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False,
                         logits_to_keep=label.shape[1]).logits
    return model, forward


class _Dictionary:
    """The few members ParlAI's TransformerGeneratorModel reads from a dictionary."""

    null_token, start_token, end_token, unk_token = "__null__", "__start__", "__end__", "__unk__"

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, token):
        return {"__null__": 0, "__start__": 1, "__end__": 2, "__unk__": 3}[token]


def build_parlai(cfg: ModelConfig):
    """ParlAI's prelayernorm TransformerGeneratorModel (decoder-only: ParlAI's DecoderAgent model)."""
    from parlai.agents.transformer.modules import PassThroughEncoder, TransformerDecoderOnly, TransformerGeneratorModel

    opt = {
        "embedding_size": cfg.d_model, "n_heads": cfg.n_heads, "ffn_size": cfg.ffn_dim,
        "n_layers": cfg.n_decoder_layers, "n_decoder_layers": cfg.n_decoder_layers,
        "n_encoder_layers": cfg.n_encoder_layers if cfg.arch == "encoder_decoder" else -1,
        "n_positions": cfg.n_positions, "variant": "prelayernorm", "activation": cfg.activation,
        "embeddings_scale": cfg.embeddings_scale, "learn_positional_embeddings": True, "n_segments": 0,
        "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout, "relu_dropout": cfg.activation_dropout,
        "output_scaling": 1.0, "model": "transformer/generator",
    }  # fmt: skip
    cls = TransformerGeneratorModel
    if cfg.arch == "decoder_only":
        cls = TransformerGeneratorModel.with_components(encoder=PassThroughEncoder, decoder=TransformerDecoderOnly)
    model = cls(opt, _Dictionary(cfg.vocab_size))

    def forward(context, label):  # ParlAI prepends __start__ to the label itself (decode_forced)
        return model(context, ys=label)[0]

    return model, forward


# --- the benchmark -----------------------------------------------------------------


def synthetic_batches(n: int, batch: int, context: int, label: int, vocab: int, seed: int):
    """n batches of full-length random rows; feedback alternates positive (1) and negative (0)."""
    g = torch.Generator().manual_seed(seed)
    feedback = (torch.arange(batch) % 2 == 0).long()  # 1, 0, 1, 0, ...: half negative
    return [
        (torch.randint(FIRST_TOKEN, vocab, (batch, context), generator=g),
         torch.randint(FIRST_TOKEN, vocab, (batch, label), generator=g), feedback)
        for _ in range(n)
    ]  # fmt: skip


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = model_config(args.model, args.dropout)
    if args.backend == "hf":
        model, forward = build_hf(cfg, args.attn)
        loss_fn = cringe_loss if args.objective == "cringe" else mle_loss
        pad_id = cfg.pad_id
        objective = lambda logits, y, fb: loss_fn(logits, y, fb, pad_id=pad_id)  # noqa: E731
    else:
        model, forward = build_parlai(cfg)
        objective = parlai_loss(args.objective)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if args.fused else {}
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, **fused)
    batches = synthetic_batches(4, args.batch, args.context, args.label, cfg.vocab_size, args.seed)

    def step(context, label, feedback) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = objective(forward(context, label), label, feedback)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(step(*batches[i % len(batches)]))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = significant(statistics.median(times))
    tokens = args.batch * (args.context + args.label)
    return {
        "backend": args.backend, "model": args.model, "objective": args.objective, "batch": args.batch,
        "context": args.context, "label": args.label, "params": sum(p.numel() for p in params),
        "step_s_median": median, "step_s_mean": significant(statistics.fmean(times)),
        "tokens_per_s": significant(tokens / median),
        "label_tokens_per_s": significant(args.batch * args.label / median),
        "threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "steps": args.steps, "warmup": args.warmup, "dropout": args.dropout,
        "attn": args.attn if args.backend == "hf" else "parlai", "fused_adamw": bool(fused),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
    }  # fmt: skip


def significant(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: a fixed number of decimals would erase a
    fast machine's step time (0.1 ms of a 4 ms step is 2.5%)."""
    return float(f"{x:.{digits}g}")


def _fused_adamw_available() -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except (RuntimeError, TypeError):
        return False


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench_small", choices=sorted(MODELS))
    parser.add_argument("--backend", default="hf", choices=("hf", "parlai"))
    parser.add_argument("--objective", default="cringe", choices=("cringe", "mle"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--label", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--dropout", type=float, default=0.1, help="as the train config (model.dropout)")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention")
    parser.add_argument("--no_fused", dest="fused", action="store_false", help="AdamW without the fused kernel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.backend == "parlai" and importlib.util.find_spec("parlai") is None:
        parser.error('--backend parlai needs ParlAI (pip install --no-deps parlai==1.7.2 "setuptools<81" iopath '
                     "requests Pillow)")
    args.fused = args.fused and _fused_adamw_available()
    return args


def main(argv=None) -> None:
    print(json.dumps(run(parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()
