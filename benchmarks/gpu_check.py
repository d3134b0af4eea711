"""GPU check: the train step and the decoder of a BB3-3B-shaped model in bb3x-jax and PyTorch.

    bash benchmarks/gpu_check.sh [--cpu-dry-run] [--layers 22 --batch 4 --context 1024 --label 128
        --decode-len 32 --warmup 2 --steps 10 --decode-runs 5 --budget-s 450 --remat none]

Why: a lent GPU is rare and short, so one command measures everything the
project's GPU goals need (MFU of the train step, bb3x-jax against PyTorch) and
never stops at the first failure. ``--cpu-dry-run`` runs the same code with
tiny shapes on the CPU, so the script is known to work before a GPU appears.

Model: BB3-3B's widths, heads, FFN and vocabulary (``bb3x_jax.model.config.BB3_3B``)
with ``--layers`` encoder and ``--layers`` decoder layers (BB3-3B has 22 each)
and a one-token decoder start, which transformers' Blenderbot holds; random
weights, dropout 0.1, float32 parameters and Adam moments, bfloat16 compute.

Measurements, each in its own process (one's crash or out-of-memory leaves the
GPU's memory to the next) under a share of ``--budget-s``:

* ``device``: both frameworks' device names and versions;
* ``train_step`` / jax: ``--mode=bench`` itself (``bb3x_jax.modes.bench.run``,
  the project's jitted CRINGE step, layers scanned); ``train_step`` / torch:
  transformers' ``BlenderbotForConditionalGeneration`` under bfloat16 autocast,
  the CRINGE loss, clipping and AdamW of ``benchmarks/torch_reference.py``;
* ``decode`` / jax: bench mode's decoder timing (``bench.decode_speed``, greedy,
  every row ``--decode-len`` tokens); ``decode`` / torch: ``generate``, greedy,
  ``min_new_tokens`` = ``max_new_tokens``, under the same autocast.

When a train step runs out of memory it is retried with half the layers while
time is left, and the PyTorch step starts from the depth the JAX step fitted;
each line says its layers. Prints one JSON line per measurement on stdout
(progress goes to stderr); a failed measurement prints its line with an
``error`` field, and the script then exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # bb3x_jax/ and configs/ from this checkout
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # torch_reference

# Dense bfloat16 peak FLOP/s per GPU (vendor datasheets, without sparsity). The
# first row whose words all occur in the lower-cased device name wins, so the
# PCIe / NVL variants come before their SXM parts.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h100", "pcie"), 756e12),
    (("h100", "nvl"), 835e12),
    (("h200", "nvl"), 835e12),
    (("h100",), 989e12),
    (("h200",), 989e12),  # H200 SXM and GH200
    (("a100",), 312e12),
    (("l40s",), 362e12),
    (("tpu v4",), 275e12),
    (("tpu v5 lite",), 197e12),
    (("tpu v5",), 459e12),
    (("tpu v6 lite",), 918e12),
)

# The measurements in the order they run (the most wanted first): (measurement, framework).
MEASUREMENTS = (("device", None), ("train_step", "jax"), ("train_step", "torch"), ("decode", "jax"),
                ("decode", "torch"))
# Upper bound of each measurement's process on a GPU, seconds (compiles included; the dry run has only the budget).
CAPS_S = {"device": 90, "train_step/jax": 240, "train_step/torch": 150, "decode/jax": 150, "decode/torch": 120}
MIN_START_S = 20  # a measurement with less time left is reported as skipped
# Tiny shapes of --cpu-dry-run: the same code paths in seconds.
DRY_RUN = dict(layers=2, batch=2, context=16, label=8, decode_len=4, warmup=1, steps=2, decode_runs=2, budget_s=600)
DRY_RUN_WIDTHS = dict(d_model=64, n_heads=4, ffn_dim=256, vocab_size=1024)
OOM_MARKERS = ("resource_exhausted", "out of memory", "outofmemory")


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bfloat16 peak of a device by name; None for CPUs and unknown devices (no MFU then)."""
    name = device_name.lower()
    for words, flops in PEAK_BF16_FLOPS:
        if all(word in name for word in words):
            return flops
    return None


def model_config(args):
    """BB3-3B's widths at ``args.layers`` layers per stack (tiny widths for the dry run)."""
    from bb3x_jax.model.config import BB3_3B

    widths = DRY_RUN_WIDTHS if args.cpu_dry_run else {}
    return BB3_3B.replace(n_encoder_layers=args.layers, n_decoder_layers=args.layers, decoder_start=(1,),
                          dropout=args.dropout, **widths)


def record(measurement: str, framework: str | None, args, device: str | None = None, **fields) -> dict[str, Any]:
    """One output line: the same leading keys on every line, then the measurement's own."""
    base = {"measurement": measurement, "framework": framework, "device": device, "dry_run": args.cpu_dry_run}
    if measurement != "device":
        cfg = model_config(args)
        base.update(model="bb3_3b", encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
                    d_model=cfg.d_model, n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, vocab_size=cfg.vocab_size,
                    dtype="bfloat16", batch=args.batch, context=args.context, label=args.label)
        if measurement == "decode":
            base.update(decode_len=args.decode_len, method="greedy")
        base.update(step_s_median=None, tokens_per_s=None, mfu=None)
    base.update(fields)
    return base


def rates(cfg, args, step_s: float, device: str) -> dict[str, Any]:
    """tokens/s and MFU of a train step: bench mode's model FLOPs over the device's peak."""
    from bb3x_jax.modes.bench import model_flops_per_step

    flops = model_flops_per_step(cfg, args.batch, args.context, args.label)
    peak = peak_bf16_flops(device)
    return {"step_s_median": step_s, "tokens_per_s": args.batch * (args.context + args.label) / step_s,
            "mfu": None if peak is None else flops / step_s / peak, "model_flops_per_step": flops,
            "model_tflops_per_s": flops / step_s / 1e12, "peak_bf16_flops": peak}


# --- bb3x-jax ----------------------------------------------------------------------


def jax_run_config(args):
    """configs/cringe.py with the check's model and shapes. Bench mode builds its model from a preset
    name, so the check's model is registered as a preset in this process only."""
    from bb3x_jax.model import config as presets
    from configs import cringe

    presets.PRESETS["gpu_check_bb3_3b"] = model_config(args)
    config = cringe.get_config()
    config.model.update(preset="gpu_check_bb3_3b", dropout=args.dropout, dtype="bfloat16", param_dtype="float32",
                        scan_layers=True, remat=args.remat)
    config.bench.update(batch=args.batch, context=args.context, label=args.label, negative_fraction=0.5,
                        warmup=args.warmup, steps=args.steps, decode_len=0)
    return config


def jax_device() -> str:
    import jax

    return jax.devices()[0].device_kind


def jax_train(args) -> dict[str, Any]:
    """The project's own bench mode (its jitted CRINGE step), its JSON line rephrased."""
    from bb3x_jax.modes import bench

    config = jax_run_config(args)
    with tempfile.TemporaryDirectory() as workdir:
        result = bench.run(config, workdir)  # bench's own line goes to stderr (see child)
    device = jax_device()
    return record("train_step", "jax", args, device, **rates(model_config(args), args, result["step_s_median"], device),
                  params=result["params"], steps_timed=result["steps_timed"], warmup=args.warmup,
                  compile_s=result["compile_s"], peak_memory_bytes=result["peak_memory_bytes"],
                  loss=result["loss"], remat=args.remat, jax_version=result["jax_version"])


def jax_decode(args) -> dict[str, Any]:
    """Bench mode's decoder timing on freshly built weights (no optimizer state in memory)."""
    import jax.numpy as jnp
    from flax import nnx

    from bb3x_jax.modes import bench
    from bb3x_jax.train import runtime

    config = jax_run_config(args)
    with tempfile.TemporaryDirectory() as workdir:
        setup = runtime.Setup(config, workdir, with_data=False, with_optimizer=False)
    network = nnx.merge(setup.graphdef, setup.params, setup.rest)
    context = bench.synthetic_batch(setup.model_cfg, args.batch, args.context, args.label, 0.5, config.seed)
    result = bench.decode_speed(network, jnp.asarray(context["context_ids"]), args.decode_len, 1, args.decode_runs)
    return record("decode", "jax", args, jax_device(), step_s_median=result["decode_s_median"],
                  tokens_per_s=result["decode_tokens_per_s"], compile_s=result["decode_compile_s"],
                  runs_timed=args.decode_runs, params=setup.parameter_count)


# --- PyTorch -----------------------------------------------------------------------


def torch_setup(args):
    """(torch, torch_reference, device, cfg, model, forward): transformers' model built on the device."""
    import torch
    import torch_reference

    device = "cpu" if args.cpu_dry_run or not torch.cuda.is_available() else "cuda"
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model, forward = torch_reference.build_hf(cfg, "sdpa")
    return torch, torch_reference, device, cfg, model, forward


def torch_device_name(torch, device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def torch_train(args) -> dict[str, Any]:
    """torch_reference's step (CRINGE, clipping at 1.0, AdamW) on the device under bfloat16 autocast."""
    torch, ref, device, cfg, model, forward = torch_setup(args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device == "cuda" or ref._fused_adamw_available()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=fused)
    batches = [tuple(t.to(device) for t in b)
               for b in ref.synthetic_batches(4, args.batch, args.context, args.label, cfg.vocab_size, args.seed)]

    def step(context, label, feedback) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = forward(context, label)
        loss = ref.cringe_loss(logits, label, feedback, pad_id=cfg.pad_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()  # waits for the step

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(step(*batches[i % len(batches)]))
        times.append(time.perf_counter() - start)
    name = torch_device_name(torch, device)
    peak_memory = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return record("train_step", "torch", args, name, **rates(cfg, args, statistics.median(times[args.warmup:]), name),
                  params=sum(p.numel() for p in params), steps_timed=args.steps, warmup=args.warmup,
                  first_step_s=times[0], peak_memory_bytes=peak_memory, loss=losses[-1], attn="sdpa",
                  fused_adamw=fused, torch_version=torch.__version__)


def torch_decode(args) -> dict[str, Any]:
    """transformers' greedy ``generate``, every row ``decode_len`` new tokens, median of the timed runs."""
    torch, ref, device, cfg, model, _ = torch_setup(args)
    model.eval()
    context = ref.synthetic_batches(1, args.batch, args.context, args.label, cfg.vocab_size, args.seed)[0][0]
    context = context.to(device)
    settings = dict(max_new_tokens=args.decode_len, min_new_tokens=args.decode_len, num_beams=1, do_sample=False,
                    no_repeat_ngram_size=0, forced_eos_token_id=None, forced_bos_token_id=None)

    def generate() -> int:
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = model.generate(input_ids=context, attention_mask=torch.ones_like(context), **settings)
        return out.shape[1] - 1  # new tokens: the decoder start token comes first

    start = time.perf_counter()
    new = generate()
    first_s = time.perf_counter() - start
    if new != args.decode_len:
        raise RuntimeError(f"generate made {new} tokens per row, not {args.decode_len}")
    times = []
    for _ in range(args.decode_runs):
        start = time.perf_counter()
        generate()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return record("decode", "torch", args, torch_device_name(torch, device), step_s_median=median,
                  tokens_per_s=args.batch * args.decode_len / median, first_run_s=first_s,
                  runs_timed=args.decode_runs, params=sum(p.numel() for p in model.parameters()))


# --- the device line ---------------------------------------------------------------


def device_line(args) -> dict[str, Any]:
    """Both frameworks' view of the device, with their versions."""
    import jax
    import torch
    import transformers

    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    torch_name = torch.cuda.get_device_name() if cuda else "cpu"
    kind = jax.devices()[0].device_kind
    return record("device", None, args, kind, jax_device_kind=kind, jax_backend=jax.default_backend(),
                  jax_devices=jax.device_count(), torch_device_name=torch_name,
                  torch_cuda=torch.version.cuda if cuda else None, peak_bf16_flops=peak_bf16_flops(kind),
                  jax_version=jax.__version__, torch_version=torch.__version__,
                  transformers_version=transformers.__version__, python=sys.version.split()[0])


CHILDREN = {"device": device_line, "train_step/jax": jax_train, "train_step/torch": torch_train,
            "decode/jax": jax_decode, "decode/torch": torch_decode}


def run_child(args) -> int:
    """One measurement in this process: its line alone goes to the real stdout, everything else to stderr."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries' prints (bench's own line, transformers' notices) become progress
    measurement, _, framework = args.child.partition("/")
    try:
        line, status = CHILDREN[args.child](args), 0
    except Exception as error:  # reported as this measurement's line; the driver goes on
        line, status = record(measurement, framework or None, args, error=f"{type(error).__name__}: {error}"[:2000]), 1
    out.write(json.dumps(line) + "\n")
    out.flush()
    return status


# --- the driver --------------------------------------------------------------------


def child_env(args, key: str) -> dict[str, str]:
    """The device check sees the GPU without taking its memory; JAX may use nearly all of it alone."""
    env = dict(os.environ)
    if args.cpu_dry_run:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    elif key == "device":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    return env


def measure(key: str, command: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any] | str:
    """The child's JSON line, or a one-line reason why there is none (crash, timeout)."""
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, env=env, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s"
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return f"exit status {result.returncode} without a result line (see stderr)"
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as error:
        return f"unreadable result line: {error}"


def is_oom(line: dict[str, Any]) -> bool:
    return any(marker in str(line.get("error", "")).lower() for marker in OOM_MARKERS)


def child_command(key: str, args, layers: int) -> list[str]:
    """This script with the driver's own flags, for one measurement at ``layers`` (later flags win)."""
    return [sys.executable, os.path.abspath(__file__), *args.argv, "--child", key, "--layers", str(layers)]


def run_measurement(key: str, args, layers: int, deadline: float) -> dict[str, Any]:
    """One measurement's line; train steps that run out of memory are retried at half the layers."""
    measurement, _, framework = key.partition("/")
    oom_at = []
    while True:
        left = deadline - time.monotonic()
        if left < MIN_START_S:
            line = record(measurement, framework or None, args, error=f"skipped: {left:.0f} s of --budget-s left")
            break
        print(f"gpu_check: {key}, {layers} layers ({left:.0f} s of the budget left)", file=sys.stderr, flush=True)
        cap = left if args.cpu_dry_run else min(CAPS_S[key], left)  # a busy CPU may compile slowly
        line = measure(key, child_command(key, args, layers), child_env(args, key), cap)
        if isinstance(line, str):
            line = record(measurement, framework or None, args, error=line)
        if not (measurement == "train_step" and is_oom(line) and layers > 1):
            break
        oom_at.append(layers)
        layers //= 2
    if oom_at:
        line["out_of_memory_at_layers"] = oom_at
    return line


def check_line(line: dict[str, Any]) -> bool:
    """A measurement succeeded when it has no error and its rates are finite and positive."""
    if "error" in line:
        return False
    numbers = [line.get(k) for k in ("step_s_median", "tokens_per_s")] if line["measurement"] != "device" else []
    return all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in numbers)


def drive(args) -> int:
    """Every measurement in order, one line each; 1 when any failed."""
    deadline = time.monotonic() + args.budget_s
    train_layers, failed = args.layers, []
    for measurement, framework in MEASUREMENTS:
        key = measurement if framework is None else f"{measurement}/{framework}"
        layers = train_layers if measurement == "train_step" else args.layers
        line = run_measurement(key, args, layers, deadline)
        if measurement == "train_step" and "error" not in line:
            train_layers = line["encoder_layers"]  # the PyTorch step starts where the JAX one fitted
        if not check_line(line):
            line.setdefault("error", "a rate is missing, not finite or not positive")
            failed.append(key)
        print(json.dumps(line), flush=True)
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU: the same code paths")
    parser.add_argument("--layers", type=int, default=22, help="encoder and decoder layers each (BB3-3B: 22)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024, help="encoder tokens per row (BB3-3B's positions)")
    parser.add_argument("--label", type=int, default=128, help="decoder tokens per row")
    parser.add_argument("--decode-len", type=int, default=32, help="new tokens per row when decoding")
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps (JAX: after compiling)")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps")
    parser.add_argument("--decode-runs", type=int, default=5, help="timed decoding runs")
    parser.add_argument("--budget-s", type=float, default=450, help="wall time for all measurements")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"),
                        help="bb3x-jax's rematerialisation (PyTorch keeps every activation)")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in args.argv if a.startswith("--")}
    if args.cpu_dry_run:  # tiny shapes, unless a flag asks otherwise
        for name, value in DRY_RUN.items():
            if name not in explicit:
                setattr(args, name, value)
    if min(args.layers, args.batch, args.context, args.label, args.decode_len, args.steps, args.decode_runs) < 1:
        parser.error("--layers, --batch, --context, --label, --decode-len, --steps and --decode-runs must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_child(args) if args.child else drive(args)


if __name__ == "__main__":
    sys.exit(main())
