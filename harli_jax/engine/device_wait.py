"""Waiting for the device: the host thread that serves decode spins on a GPU result instead of
sleeping until it is ready.

A thread that sleeps in ``block_until_ready`` is woken by the runtime once the device is done;
after fine-tune work that wake-up, and the next decode step with it, was sometimes late by
5-12 ms on the H100's host. With 16 rows decoding (TinyLlama shape), 10 of 400 decode steps
right after a train micro-step took over 8 ms when both waits slept, 2 of 400 when both spun;
the median step spun was 0.2 ms slower. It does not remove the stalls: on another machine, spinning,
the p99 step after a micro-step was still 14.8 ms (bench/NOTES.md, session 11). Off the GPU the
device is the host's own cores, so there the thread sleeps and leaves them to XLA.
"""

from __future__ import annotations

import functools

import jax


@functools.cache
def _spins() -> bool:
    return jax.default_backend() == "gpu"


def wait_until_ready(array: jax.Array) -> jax.Array:
    """Returns ``array`` once the device has computed it."""
    if not _spins():
        return jax.block_until_ready(array)
    while not array.is_ready():  # the interpreter still hands the GIL to other threads
        pass
    return array
