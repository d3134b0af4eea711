#!/usr/bin/env bash
# GPU check: the train step and the decoder of a BB3-3B-shaped model in bb3x-jax and in PyTorch.
#
#   bash benchmarks/gpu_check.sh                  # one H100 / H200: at most --budget-s (450 s) of measurements
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # the same code paths with tiny shapes on the CPU
#
# Any other flag goes to benchmarks/gpu_check.py (--layers, --batch, --context, --label, --steps, --budget-s, ...;
# its docstring says what each measurement runs). Stdout holds only the JSON lines, one per measurement;
# progress goes to stderr. Exit status: 0 when every measurement succeeded, 1 when any failed (its line has an
# "error" field), 2 when the environment cannot run the check (one line on stderr says why).
#
# Nothing is installed here: the machines lent with a GPU reach no package index, so the environment must
# already hold the project's dependencies with GPU support -- `pip install -e ".[test]"` with jax[cuda12] and a
# CUDA build of torch. The checkout itself goes on PYTHONPATH, so bb3x_jax needs no install of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Imports, and unless --cpu-dry-run a GPU that both frameworks see (without JAX taking its memory).
if ! problem=$(XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" - "$@" 2>&1 <<'EOF'
import sys

try:
    import flax, jax, torch, transformers  # noqa: F401
    import bb3x_jax.modes.bench  # noqa: F401
except Exception as error:
    sys.exit(f"cannot import what the check needs ({type(error).__name__}: {error}); install the project with "
             'pip install -e ".[test]", jax[cuda12] and a CUDA build of torch')
if "--cpu-dry-run" not in sys.argv[1:]:
    if jax.default_backend() != "gpu" or not torch.cuda.is_available():
        sys.exit(f"no GPU: JAX {jax.__version__} runs on {jax.default_backend()}, torch {torch.__version__} sees "
                 f"CUDA: {torch.cuda.is_available()} (use --cpu-dry-run to check the script on a CPU)")
EOF
); then
  echo "gpu_check: ${problem##*$'\n'}" >&2
  exit 2
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
