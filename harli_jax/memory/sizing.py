"""How many pages the arena gets: the device's memory, less what weights and programs need.

``memory_fraction`` has vLLM's ``gpu_memory_utilization`` meaning: the share of the device's memory
(the allocator's ``bytes_limit``) harli may use in all, weights + program temporaries + arena. The
weights (and anything else already allocated) are ``bytes_in_use`` at sizing time; the temporaries
come from ``compiled.memory_analysis()`` of the largest programs. They do not depend on the arena's
page count, because every program donates the arena (input and output share one buffer), so the
programs can be compiled against a small nominal arena first.
"""

from __future__ import annotations

import jax


def check_memory_fraction(memory_fraction: float | None) -> None:
    if memory_fraction is not None and not 0 < memory_fraction <= 1:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {memory_fraction}")


def device_memory(device: jax.Device | None = None) -> tuple[int, int] | None:
    """(bytes_limit, bytes_in_use) of ``device`` (default: the first), None where the backend
    does not report them (the CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # backends without allocator statistics raise or return None
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))


def temp_bytes(compiled: jax.stages.Compiled) -> int:
    """The program's own temporaries, per XLA (0 where it does not say)."""
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0) or 0)


def arena_pages(
    memory_fraction: float,
    page_bytes: int,
    temporaries: int,
    device: jax.Device | None = None,
) -> int | None:
    """The pages that fit in ``memory_fraction`` of the device once the current allocations and
    ``temporaries`` are counted; None where the device does not report its memory."""
    check_memory_fraction(memory_fraction)
    memory = device_memory(device)
    if memory is None:
        return None
    limit, in_use = memory
    budget = memory_fraction * limit - in_use - temporaries
    return max(0, int(budget // page_bytes))
