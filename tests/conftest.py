"""Session setup (CPU JAX, 2 torch threads) and the `checkpoint` factory of tiny HF checkpoints."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Before any test module imports jax: tests run on the CPU even where a GPU is visible.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (the demo engine's steps, a job's micro-steps) through
# fresh function objects, which JAX's in-memory caches do not share: a persistent cache, fresh
# per session and inherited by the CLI subprocesses, compiles each distinct program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="harli-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The test models are tiny: LLVM's optimisations cost far more compile time (~40% of a
# co-located run's start-up) than the programs gain at run time.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit it
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
# The CI machine has two cores; torch's default thread pool would oversubscribe them.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`checkpoint("qwen2", sharded=True)`: the directory `checkpoints.save_checkpoint` writes for
    those arguments, made once per session and shared, so tests must not modify it."""
    from checkpoints import save_checkpoint  # transformers is slow to import; only pay when used

    made: dict[str, Path] = {}

    def make(family: str, **kwargs: Any) -> Path:
        key = repr((family, sorted(kwargs.items())))
        if key not in made:
            made[key] = save_checkpoint(tmp_path_factory.mktemp(family), family, **kwargs)
        return made[key]

    return make
