"""Session setup (CPU JAX, 2 torch threads) and the `checkpoint` factory of tiny HF checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Before any test module imports jax: tests run on the CPU even where a GPU is visible.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
