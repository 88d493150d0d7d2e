"""The fine-tuning optimiser: AdamW, warm-up + cosine learning rate, clipping, accumulation.

This module owns the optax transformation a LoRA job trains with. Steps here are optimiser
updates: with gradient accumulation, `total_steps` and `warmup_steps` count applied updates, not
micro-batches, so changing `accumulate_steps` does not stretch the schedule.

The whole transformation runs on one flat vector (`optax.flatten`): a LoRA state is hundreds of
small arrays (22 layers x 7 modules x A, B for TinyLlama), and per-array clipping, moments and
accumulation would be thousands of tiny kernels. Flat, they are a handful of fused loops over
one vector; the updates are the same, and the optimiser state is a few flat vectors.
"""

from __future__ import annotations

import optax


def make_schedule(lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`.

    This is the schedule of HF ``get_cosine_schedule_with_warmup``, so learning rates carry over
    from PEFT recipes unchanged.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )


def make_optimizer(
    lr: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    accumulate_steps: int = 1,
) -> optax.GradientTransformation:
    """AdamW on `make_schedule`, after global-norm clipping (``None`` disables it).

    With ``accumulate_steps > 1`` the gradients of that many calls are averaged and one update is
    applied on the last of them (optax.MultiSteps); the calls in between return zero updates.
    Weight decay applies to every parameter (no mask), as torch's AdamW over a PEFT adapter does;
    the result is wrapped in `optax.flatten`, so its state holds flat vectors, not the params'
    tree (a path-based weight-decay mask needs an unflattened optimizer).
    """
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
    adamw = optax.adamw(make_schedule(lr, total_steps, warmup_steps), weight_decay=weight_decay)
    optimizer = (
        adamw
        if max_grad_norm is None
        else optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    )
    if accumulate_steps > 1:
        optimizer = optax.MultiSteps(
            optimizer, every_k_schedule=accumulate_steps
        ).gradient_transformation()
    return optax.flatten(optimizer)
