"""The test suite; mirrors the package (tests/data for bb3x_jax/data, and so on)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: main.py, configs/, benchmarks/

# Less codegen effort for the tests' programs: they are tiny, so compiling dominates running them.
# The tests' tolerances hold at either level. As jit's compiler_options, and as XLA_FLAGS for a child.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_FLAGS = " ".join(f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE.items())
