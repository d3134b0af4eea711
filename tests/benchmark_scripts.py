"""The scripts under ``benchmarks/`` as modules, for their tests (they are scripts, not a package)."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

from tests import REPO


def load(name: str) -> ModuleType:
    """``benchmarks/<name>.py``, imported under ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
