"""The co-located side of LoRA training: a train step's state in pages of the unified arena.

This module owns `ArenaSteps`, which `Trainer.use_arena` attaches to a trainer. It leases the pages
a step needs to the job's owner when the step is planned (`reserve`), plans the step's micro-steps
with the `arena_*` programs of `harli_jax.lora.programs`, which keep its boundary activations, its
spans' residuals, its running gradient and its gradient sums in those pages, and gives the pages
back on `release`, which drops the open step: it is planned again from the start, never
half-applied. The LoRA parameters and optimiser moments stay in the trainer, outside the arena
(small, and they must survive a release).

A step is planned on the host while serving waits (a co-located start: ~2-4 ms of Python on the
GPU hosts, where the host is free for ~1.2 ms during a heavy-load inference step), and a cut's
micro-steps in one lease are the same at every step but for the batch, the step number and the
running loss. So each lease builds a cut's micro-steps once, with their programs, pages and
frozen views bound (its skeleton, of `Unbound` micro-steps), and each step's plan binds that
skeleton to the step's own arguments (`StepArgs`). The start's device work, clearing the gradient
sums and cutting the batch into row chunks, is one program (`_start`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.lora.layout import HEAD, Leaves, Span
from harli_jax.lora.plan import MicroStep, ProgramKey, SpanCall, TrainPlan, Unbound, row_chunks
from harli_jax.lora.programs import FIELDS, ArenaSlots, Batch
from harli_jax.memory import arena as pages_io
from harli_jax.memory.arena import Arena
from harli_jax.memory.kv_cache import KVCache
from harli_jax.memory.page_table import OutOfPages, Owner

if TYPE_CHECKING:
    from harli_jax.lora.train import Trainer


@dataclasses.dataclass(slots=True)
class StepArgs:
    """What one step's micro-steps take beyond their skeleton: each row chunk's batch arguments
    (`Trainer._chunks`), the loss's denominator, the masked-token count, and the running loss
    (each loss head's output, the next head's and the update's input)."""

    chunks: list[tuple]
    denominator: np.float32
    count: int
    loss: jax.Array


def _start(
    token_chunks: int, arena: KVCache, acc_pages: jax.Array, batch: Batch
) -> tuple[KVCache, list[dict[str, jax.Array]]]:
    """A step's start on the device, as one program: clears the step's gradient sums and cuts
    its batch into ``token_chunks`` row chunks. Its one dispatch, with the batch's arrays as
    arguments, replaced a clearing program and a transfer per chunk and field (20 at 4 chunks,
    ~1.7 ms of host time on a 2-core CPU)."""
    return pages_io.zero(arena, acc_pages), row_chunks(batch, token_chunks, jnp.split)


def _in_turn(program: Callable, arena: KVCache, *calls: tuple) -> KVCache:
    """``program`` on ``arena`` once per argument tuple of ``calls``, each on the last's arena:
    adjacent middle spans' forwards (or backwards) as one program."""
    for args in calls:
        arena = program(arena, *args)
    return arena


def _cut(rows: int, seq_len: int, token_chunks: int, spans: Sequence[Span]) -> tuple:
    """A step's shape and cut, as a key."""
    return rows, seq_len, token_chunks, tuple((s.place, *s.view_key) for s in spans)


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
        self._open_skeleton: tuple[Unbound, ...] = ()  # its micro-steps, unbound
        # (mode, residual pages of each span, pages per slot, pages per layer's gradient sums)
        self._lease_shape: tuple[str, tuple[int, ...], int, int] | None = None
        self._shapes: dict[tuple, tuple[tuple[str, tuple[int, ...], int, int], int]] = {}
        self._skeletons: dict[tuple, tuple[Unbound, ...]] = {}  # the lease's, by `_cut`
        self._zero_loss = jnp.zeros((), jnp.float32)  # each step's running loss starts here

    def _slots(self, rows: int, seq_len: int) -> ArenaSlots:
        t = self._trainer
        one_layer = (t._lora[i] for i in t._p.lora.in_layers(slice(0, 1)))
        return ArenaSlots(
            t.hidden_spec(rows, seq_len),
            tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in one_layer),
        )

    def _lease_shape_for(
        self, rows: int, seq_len: int, token_chunks: int, spans: Sequence[Span]
    ) -> tuple[tuple[str, tuple[int, ...], int, int], int]:
        """The lease shape (residual mode, residual pages of each span, pages per slot, pages
        per layer's gradient sums) of a step of this shape and cut in this arena, and the pages
        it needs: worked out once, not at every start (twice a start, over every span's
        residuals, on the co-located step's host side)."""
        table = self._arena.pages
        capacity = table.num_pages - table.reserved
        key = (*_cut(rows, seq_len, token_chunks, spans), capacity)
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

    def reserve(self, rows: int, seq_len: int, token_chunks: int, spans: Sequence[Span]) -> bool:
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
            self._slot_pages, self._saved_pages, self._acc = jax.device_put(
                (slot_pages, saved_pages, self._acc_pages)
            )
            self._lease_shape, self._skeletons = shape, {}
        return True

    def release(self) -> None:
        """`Trainer.release`, co-located."""
        self._open = None
        if self.holds_pages:
            self._arena.pages.free(self._owner)
        self._lease_shape = None

    @property
    def holds_pages(self) -> bool:
        return self._owner in self._arena.pages

    def plan(self, batch: Batch, token_chunks: int, spans: Sequence[Span]) -> TrainPlan:
        """`Trainer.plan`, co-located: raises `OutOfPages` if the step's pages cannot be had."""
        t = self._trainer
        rows, seq_len = np.shape(batch["tokens"])
        if not self.reserve(rows, seq_len, token_chunks, spans):
            raise OutOfPages(self.lease_size, self._arena.pages.num_free)
        skeleton = self._skeleton(rows, seq_len, token_chunks, spans)
        arrays = {name: np.asarray(batch[name], np.int32) for name in FIELDS}
        start, buffer = functools.partial(_start, token_chunks), self._arena.buffer
        key = ("start", rows, seq_len, token_chunks)
        self._arena.buffer, chunks = t._call(key, start, (0,), buffer, self._acc, arrays)
        count = int(np.sum(batch["loss_mask"]))
        denominator = np.float32(max(count, 1))
        args = StepArgs(t._chunks(chunks, t.step), denominator, count, self._zero_loss)
        self._open = TrainPlan.bind(t.step, skeleton, args)
        self._open_skeleton = skeleton
        return self._open

    def fused(self, plan: TrainPlan, count: int) -> MicroStep | None:
        """The next ``count`` micro-steps of ``plan`` as one, if they are all forwards or all
        backwards of middle spans: one program that runs them in turn, so one dispatch (~0.5 ms
        of host time on the H100's host, against ~0.8 ms of device time for a one-layer
        forward) where there were ``count``. None where they are not."""
        if plan is not self._open:
            return None
        index = plan._next
        parts = self._open_skeleton[index : index + count]
        kinds = {(unbound.kind, unbound.key) for unbound in parts}
        if len(parts) < count or len(kinds) != 1 or any(u.call is None for u in parts):
            return None
        kind, key = parts[0].kind, (*parts[0].key, f"x{count}")
        program = functools.partial(_in_turn, parts[0].call.program)

        def run() -> KVCache:
            args = tuple(self._span_args(u.call, plan) for u in parts)
            return self._run(plan, key, program, (), args)

        return MicroStep(kind, key, functools.partial(plan._run, index, run, count=count))

    def _skeleton(
        self, rows: int, seq_len: int, token_chunks: int, spans: Sequence[Span]
    ) -> tuple[Unbound, ...]:
        """The micro-steps of a step of this shape and cut in the lease, with every argument
        bound but the step's own (`StepArgs`); built once per lease and cut. Span s writes its
        output to slot s and its residuals to its own pages, and reads slot s - 1; the last slot
        holds the running gradient."""
        cut = _cut(rows, seq_len, token_chunks, spans)
        if cut in self._skeletons:
            return self._skeletons[cut]
        t = self._trainer
        rows //= token_chunks  # each chunk's, which its programs see
        slots = self._slots(rows, seq_len)
        act, grad, saved = self._slot_pages[:-1], self._slot_pages[-1], self._saved_pages
        # The gradient-sum pages of each span's layers, as its backward program reads them.
        n = t.num_layers
        layers = [[(i + s.shift) % n for i in range(s.layers.start, s.layers.stop)] for s in spans]
        span_acc = jax.device_put([self._acc_pages[ls] for ls in layers])
        forward, backward = [], []  # (kind, key, span, program, fixed arguments) of each span
        for s, span in enumerate(spans):
            shape = (span.place, span.length, rows, seq_len, self.mode)
            residuals = t.residuals(span, rows, seq_len, self.mode)
            frozen, inputs = t._frozen_view(span), act[s - 1] if s else None
            program = functools.partial(t._p.arena_forward, span, slots, residuals)
            fixed = (frozen, inputs, act[s], saved[s])
            forward.append(("fwd", ("fwd", *shape), span, program, fixed))
            program = functools.partial(t._p.arena_backward, span, slots, residuals)
            fixed = (frozen, inputs, saved[s], grad, span_acc[s])
            backward.append(("bwd", ("bwd", *shape), span, program, fixed))
        head = (
            "head",
            ("head", rows, seq_len),
            HEAD,
            functools.partial(t._p.arena_head, slots),
            (t._frozen_view(HEAD), act[-1], grad),
        )
        skeleton = []
        for chunk in range(token_chunks):
            for kind, key, span, program, fixed in (*forward, head, *reversed(backward)):
                if kind == "head":
                    run = functools.partial(self._head, key, span, program, fixed, chunk)
                    skeleton.append(Unbound(kind, key, run))
                    continue
                call = SpanCall(program, span, fixed, chunk)
                run = functools.partial(self._span_step, key, call)
                fusable = call if span.place == "middle" else None
                skeleton.append(Unbound(kind, key, run, fusable))
        program = functools.partial(t._p.arena_update, slots)
        update = functools.partial(self._update, program, self._acc)
        skeleton.append(Unbound("update", ("update",), update))
        self._skeletons[cut] = tuple(skeleton)
        return self._skeletons[cut]

    def _span_step(self, key: ProgramKey, call: SpanCall, plan: TrainPlan) -> KVCache:
        """A span's forward or backward (``call``) on its row chunk of ``plan``'s step."""
        return self._run(plan, key, call.program, (), self._span_args(call, plan))

    def _span_args(self, call: SpanCall, plan: TrainPlan) -> tuple:
        """What ``call``'s program takes beside the arena, for ``plan``'s step."""
        lora = self._trainer._p.lora.take(self._trainer._lora, call.span)
        return (lora, *call.fixed, *plan.args.chunks[call.chunk])

    def _head(
        self, key: ProgramKey, span: Span, program: Callable, fixed: tuple, chunk: int,
        plan: TrainPlan,
    ) -> jax.Array:  # fmt: skip
        """The loss head (``span`` is `HEAD`) on row chunk ``chunk`` of ``plan``'s step: adds
        the chunk's loss to the step's."""
        t, args = self._trainer, plan.args
        lora, chunk_arrays = t._p.lora.take(t._lora, span), args.chunks[chunk][0]
        inputs = (lora, *fixed, chunk_arrays, args.denominator, args.loss)
        (args.loss,) = self._run(plan, key, program, (), inputs)
        return args.loss

    def _update(self, program: Callable, acc: jax.Array, plan: TrainPlan) -> Leaves:
        """The optimiser update from the step's gradient sums (``acc``, their pages)."""
        t, args = self._trainer, plan.args
        lora, opt, metrics = self._run(
            plan, ("update",), program, (0, 1), (t._lora, t._opt, acc, args.loss)
        )
        self._open = None
        return t._finish(plan, lora, opt, metrics, args.count)

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
