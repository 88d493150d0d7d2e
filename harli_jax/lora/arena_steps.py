"""The co-located side of LoRA training: a train step's state in pages of the unified arena.

This module owns `ArenaSteps`, which `Trainer.use_arena` attaches to a trainer. It leases the pages
a step needs to the job's owner when the step is planned (`reserve`), plans the step's micro-steps
with the `arena_*` programs of `harli_jax.lora.programs`, which keep its boundary activations, its
spans' residuals, its running gradient and its gradient sums in those pages, and gives the pages
back on `release`, which drops the open step: it is planned again from the start, never
half-applied. The LoRA parameters and optimiser moments stay in the trainer, outside the arena
(small, and they must survive a release).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.lora.plan import ProgramKey, TrainPlan
from harli_jax.lora.programs import HEAD, ArenaSlots, Batch, Leaves, Span
from harli_jax.memory import arena as pages_io
from harli_jax.memory.arena import Arena
from harli_jax.memory.kv_cache import KVCache
from harli_jax.memory.page_table import OutOfPages, Owner

if TYPE_CHECKING:
    from harli_jax.lora.train import Trainer


class ArenaSteps:
    """Plans ``trainer``'s steps in pages of ``arena`` leased to ``owner``.

    It is the trainer's co-located half: it reads the trainer's flat state, runs programs through
    the trainer's cache and hands each update back to the trainer; only the lease and the open
    step are its own.
    """

    lease_size: int  # pages the last reserved step shape needs
    mode: str  # the last reserved step's residuals: "kept" or "recomputed" (see POLICIES)

    def __init__(self, trainer: Trainer, arena: Arena, owner: Owner) -> None:
        # Every span's gradient sums are pages per layer: a LoRA weight outside the layers would
        # have none.
        if any(path[0] != "layers" for path in trainer._p.lora.paths):
            raise ValueError("arena micro-steps need every LoRA weight inside model.layers")
        self._trainer = trainer
        self._arena, self._owner = arena, owner
        self._open: TrainPlan | None = None  # the plan whose pages are leased
        # (mode, residual pages of each span, pages per slot, pages per layer's gradient sums)
        self._lease_shape: tuple[str, tuple[int, ...], int, int] | None = None
        self._span_acc: dict[tuple[tuple[int, int, int], ...], list[jax.Array]] = {}
        self._shapes: dict[tuple, tuple[tuple[str, tuple[int, ...], int, int], int]] = {}

    def _slots(self, rows: int, seq_len: int) -> ArenaSlots:
        t = self._trainer
        one_layer = (t._lora[i] for i in t._p.lora.in_layers(slice(0, 1)))
        return ArenaSlots(
            t.hidden_spec(rows, seq_len),
            tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in one_layer),
        )

    def _lease_shape_for(
        self, rows: int, seq_len: int, token_chunks: int, spans: list[Span]
    ) -> tuple[tuple[str, tuple[int, ...], int, int], int]:
        """The lease shape (residual mode, residual pages of each span, pages per slot, pages
        per layer's gradient sums) of a step of this shape and cut in this arena, and the pages
        it needs: worked out once, not at every start (twice a start, over every span's
        residuals, on the co-located step's host side)."""
        table = self._arena.pages
        capacity = table.num_pages - table.reserved
        key = (rows, seq_len, token_chunks, capacity, tuple((s.place, *s.view_key) for s in spans))
        if key in self._shapes:
            return self._shapes[key]
        t = self._trainer
        slots = self._slots(rows // token_chunks, seq_len)
        per_slot = self._arena.pages_for(slots.hidden)
        per_layer = self._arena.pages_for(slots.layer_grads)
        fixed = (len(spans) + 1) * per_slot + t.num_layers * per_layer
        # Chunks run one after another: each span's residual pages serve every chunk in turn.
        # Residuals are kept where they take at most half the arena (serving keeps the rest),
        # else recomputed.
        for mode in ("kept", "recomputed"):
            residuals = [t.residuals(s, rows // token_chunks, seq_len, mode) for s in spans]
            saved = tuple(self._arena.pages_for(r.saved) for r in residuals)
            need = fixed + sum(saved)
            if 2 * need <= capacity:
                break
        if need > capacity:  # waiting would never help: fail the job
            raise ValueError(
                f"a train step of {rows}x{seq_len} tokens needs {need} arena pages, the arena has "
                f"{capacity}: give the engine more memory "
                "(--memory-fraction, num_pages) or train with a smaller batch or sequence length"
            )
        self._shapes[key] = ((mode, saved, per_slot, per_layer), need)
        return self._shapes[key]

    def reserve(self, rows: int, seq_len: int, token_chunks: int, spans: list[Span]) -> bool:
        """`Trainer.reserve`, co-located."""
        shape, need = self._lease_shape_for(rows, seq_len, token_chunks, spans)
        (self.mode, saved, per_slot, per_layer), self.lease_size = shape, need
        table = self._arena.pages
        if self._owner in table and self._lease_shape != shape:
            self.release()
        if self._owner not in table:
            if not self._arena.lease(self._owner, need):
                return False
            # The page arrays go to the device once per lease, in one transfer: one per slot
            # and per span, every step, cost 7-22 ms of host time per step on the H100 host.
            pages = self._arena.page_array(self._owner)
            slot_end = (len(spans) + 1) * per_slot
            saved_ends = slot_end + np.cumsum(saved)
            self._acc_pages = pages[saved_ends[-1] :].reshape(self._trainer.num_layers, per_layer)
            slot_pages = list(pages[:slot_end].reshape(len(spans) + 1, per_slot))
            saved_pages = np.split(pages[slot_end : saved_ends[-1]], saved_ends[:-1] - slot_end)
            self._slot_pages, self._saved_pages, self._acc_device = jax.device_put(
                (slot_pages, saved_pages, self._acc_pages)
            )
            self._lease_shape, self._span_acc = shape, {}
        return True

    def _span_acc_pages(self, spans: list[Span]) -> list[jax.Array]:
        """The gradient-sum pages of each span's layers (as its backward program reads them),
        on the device; transferred once per lease and cut."""
        cut = tuple(s.view_key for s in spans)
        if cut not in self._span_acc:
            n = self._trainer.num_layers
            layers = [
                [(i + s.shift) % n for i in range(s.layers.start, s.layers.stop)] for s in spans
            ]
            self._span_acc[cut] = jax.device_put([self._acc_pages[ls] for ls in layers])
        return self._span_acc[cut]

    def release(self) -> None:
        """`Trainer.release`, co-located."""
        self._open = None
        if self.holds_pages:
            self._arena.pages.free(self._owner)
        self._lease_shape = None

    @property
    def holds_pages(self) -> bool:
        return self._owner in self._arena.pages

    def plan(self, batch: Batch, token_chunks: int, spans: list[Span]) -> TrainPlan:
        """`Trainer.plan`, co-located: raises `OutOfPages` if the step's pages cannot be had."""
        t = self._trainer
        rows, seq_len = np.shape(batch["tokens"])
        if not self.reserve(rows, seq_len, token_chunks, spans):
            raise OutOfPages(self.lease_size, self._arena.pages.num_free)
        plan = self._open = TrainPlan(t.step)
        acc = self._acc_device
        buffer = self._arena.buffer
        self._arena.buffer = t._call(("zero-grads",), pages_io.zero, (0,), buffer, acc)
        self._loss = jnp.zeros((), jnp.float32)
        count = int(np.sum(batch["loss_mask"]))
        slots = self._slots(rows // token_chunks, seq_len)
        for batch_args in t._chunks(batch, token_chunks, plan.step):
            self._plan_chunk(plan, spans, slots, batch_args, np.float32(max(count, 1)))

        def update() -> Leaves:
            args = (t._lora, t._opt, acc, self._loss)
            program = functools.partial(t._p.arena_update, slots)
            lora, opt, metrics = self._run(plan, ("update",), program, (0, 1), args)
            self._open = None
            return t._finish(plan, lora, opt, metrics, count)

        plan._add("update", ("update",), update)
        return plan

    def _plan_chunk(
        self,
        plan: TrainPlan,
        spans: list[Span],
        slots: ArenaSlots,
        batch_args: tuple,
        denominator: np.float32,
    ) -> None:
        """Span s writes its output to slot s and its residuals to its own pages, and reads
        slot s - 1; the last slot holds the running gradient."""
        t = self._trainer
        act, grad, saved = self._slot_pages[:-1], self._slot_pages[-1], self._saved_pages
        span_acc = self._span_acc_pages(spans)
        rows, seq_len = batch_args[0]["tokens"].shape

        def fwd(s: int, span: Span, key: ProgramKey) -> KVCache:
            lora = t._p.lora.take(t._lora, span)
            inputs = act[s - 1] if s else None
            args = (lora, t._frozen_view(span), inputs, act[s], saved[s], *batch_args)
            residuals = t.residuals(span, rows, seq_len, self.mode)
            program = functools.partial(t._p.arena_forward, span, slots, residuals)
            return self._run(plan, key, program, (), args)

        def head() -> jax.Array:
            lora, frozen = t._p.lora.take(t._lora, HEAD), t._frozen_view(HEAD)
            args = (lora, frozen, act[-1], grad, batch_args[0], denominator, self._loss)
            program = functools.partial(t._p.arena_head, slots)
            (self._loss,) = self._run(plan, ("head", rows, seq_len), program, (), args)
            return self._loss

        def bwd(s: int, span: Span, key: ProgramKey) -> KVCache:
            lora = t._p.lora.take(t._lora, span)
            inputs = act[s - 1] if s else None
            args = (lora, t._frozen_view(span), inputs, saved[s], grad, span_acc[s])
            residuals = t.residuals(span, rows, seq_len, self.mode)
            program = functools.partial(t._p.arena_backward, span, slots, residuals)
            return self._run(plan, key, program, (), (*args, *batch_args))

        for s, span in enumerate(spans):
            key = ("fwd", span.place, span.length, rows, seq_len, self.mode)
            plan._add("fwd", key, functools.partial(fwd, s, span, key))
        plan._add("head", ("head", rows, seq_len), head)
        for s, span in reversed(list(enumerate(spans))):
            key = ("bwd", span.place, span.length, rows, seq_len, self.mode)
            plan._add("bwd", key, functools.partial(bwd, s, span, key))

    def _run(
        self, plan: TrainPlan, key: ProgramKey, fn: Callable, donate: tuple[int, ...], args: tuple
    ) -> Any:
        """Runs an arena program of ``plan`` with the arena donated; keeps the new buffer and
        returns the program's other outputs (or the buffer, if it has none)."""
        if self._open is not plan:
            raise RuntimeError("this plan was abandoned (its pages were released): plan again")
        donate = (0, *(i + 1 for i in donate))
        out = self._trainer._call(key, fn, donate, self._arena.buffer, *args)
        if isinstance(out, KVCache):
            self._arena.buffer = out
            return out
        self._arena.buffer, *rest = out
        return rest
