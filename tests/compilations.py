"""Counting XLA compilations in a test: what "compiles nothing" is checked with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def counting_compilations() -> Iterator[list[int]]:
    """Counts XLA compilations (of any program, jitted or eager) inside the block."""
    count = [0]

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
