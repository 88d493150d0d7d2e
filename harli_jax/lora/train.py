"""LoRA training: a one-program train step, and the same step cut into micro-steps.

This module owns `Trainer`, the host side of training (its device programs live in
`harli_jax.lora.programs`). A trainer holds a LoRA-injected model as (graphdef, trainable LoRA
state, frozen state) plus the optimiser state. The frozen state is never donated or copied: it is
the same base arrays that serving uses. `Trainer.train_step` runs a whole step as one program.

The co-location scheduler cannot afford a whole step between two decode steps, so `Trainer.plan`
cuts one step into `MicroStep`s whose size the scheduler chooses: the batch's rows are split into
token chunks, the decoder's layers into spans, and for each chunk the plan runs the spans' forward
passes (keeping only the activations at span boundaries), the loss head, then each span's backward
in reverse (a `jax.vjp` that recomputes the span's forward), accumulating LoRA gradients; the
optimiser update follows the last chunk. Gradients are weighted by the whole batch's masked-token
count, so any split computes the unsplit mean loss and its gradient.

Each micro-step calls a jitted program whose key depends only on (rows, seq_len, span length)
and where the span sits (first, middle, last), so steady state never compiles. Programs take flat
lists of arrays, which keeps a micro-step's host overhead to a list permutation and one dispatch.
Co-located (`Trainer.use_arena`), a plan keeps its boundary activations, its running gradient and
its gradient sums in pages of the unified arena, leased to the job's owner when the plan is made
(`Trainer.reserve`) and given back on `Trainer.release`, which drops the open step: it is planned
again from the start, never half-applied. The LoRA parameters and optimiser moments stay outside
the arena (small, and they must survive a release).

The model must follow `Llama`'s protocol: ``model.layers``, ``model(tokens, positions,
segment_ids=, layers=slice, hidden=)`` and ``model.logits(hidden)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from harli_jax.lora.programs import (
    ArenaSlots,
    Batch,
    Leaves,
    Span,
    StateLayout,
    TrainPrograms,
    loss_fn,
)
from harli_jax.memory import arena as pages_io
from harli_jax.memory.arena import Arena
from harli_jax.memory.kv_cache import KVCache
from harli_jax.memory.page_table import OutOfPages, Owner

ProgramKey = tuple
__all__ = ["MicroStep", "ProgramCache", "TrainPlan", "Trainer", "loss_fn"]


@dataclasses.dataclass(frozen=True)
class MicroStep:
    """One bounded piece of a train step: ``kind`` is "fwd", "bwd", "head" or "update"; ``key``
    names its compiled program (see `Trainer.executable`)."""

    kind: str
    key: ProgramKey
    _run: Callable[[], Any] = dataclasses.field(repr=False)

    def run(self) -> Any:
        """Dispatches the program; returns its outputs, for a caller timing it to block on."""
        return self._run()


class TrainPlan:
    """The micro-steps of one train step, to run in order; `metrics` is set by the last one."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.steps: list[MicroStep] = []
        self.metrics: dict[str, Any] | None = None
        self._next = 0

    def __iter__(self) -> Iterator[MicroStep]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def _add(self, kind: str, key: ProgramKey, run: Callable[[], Any]) -> None:
        index = len(self.steps)

        def checked() -> Any:
            if self._next != index:
                raise RuntimeError(f"micro-step {index} run out of order (next is {self._next})")
            outputs = run()
            self._next += 1
            return outputs

        self.steps.append(MicroStep(kind, key, checked))


# Jitted programs by (graphdef, optimizer or None, program key). A program is a pure function of
# those (jit keys it further by argument types), so trainers of one model and optimizer that share
# a cache (a job's restarts, a second job on the same base) compile nothing.
ProgramCache = dict


class Trainer:
    """Trains the LoRA parameters of ``model`` with ``optimizer``; the base weights stay frozen.

    The model's state is taken at construction. `lora`, `opt_state` and `step` are the job's
    state (what a checkpoint saves and restores); `model` is a module view of the parameters.
    """

    def __init__(
        self,
        model: nnx.Module,
        optimizer: optax.GradientTransformation,
        *,
        seed: int = 0,
        programs: ProgramCache | None = None,
        remat: bool = False,
    ) -> None:
        self.graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
        if not jax.tree.leaves(lora):
            raise ValueError("the model has no LoRA parameters; call inject_lora first")
        self.num_layers = len(model.layers)
        self.optimizer = optimizer
        # `train_step` recomputes each layer in its backward pass (`loss_fn`'s ``remat``): for
        # shapes whose activations do not fit in device memory; the micro-steps never need it.
        self.remat = remat
        self.step = 0
        self._lora, self._frozen = jax.tree.leaves(lora), jax.tree.leaves(frozen)
        self._opt, opt_def = jax.tree.flatten(optimizer.init(lora))
        self._p = TrainPrograms(
            self.graphdef,
            optimizer,
            StateLayout(lora, self.num_layers),
            StateLayout(frozen, self.num_layers),
            opt_def,
        )
        self._key = jax.random.key(seed)
        self._cache = ProgramCache() if programs is None else programs
        self._jitted: dict[ProgramKey, tuple[Callable, Any]] = {}
        self._frozen_relabelled: dict[int, Leaves] = {}
        self._arena: Arena | None = None
        self._owner: Owner | None = None
        self._open: TrainPlan | None = None  # co-located: the plan whose pages are leased
        self._lease_shape: tuple[int, int, int] | None = None  # (spans, pages per slot, per layer)
        self._span_acc: dict[tuple[tuple[int, ...], ...], list[jax.Array]] = {}
        self._grads, self._loss = self._call(("zeros",), self._p.zeros, (), self._lora)
        self._accumulating = False

    @property
    def lora(self) -> nnx.State:
        """The trainable LoRA state; the next update donates (deletes) its arrays."""
        return jax.tree.unflatten(self._p.lora.treedef, self._lora)

    @lora.setter
    def lora(self, state: nnx.State) -> None:
        self._lora = _leaves_of(state, self._p.lora.treedef, "lora")

    @property
    def opt_state(self) -> optax.OptState:
        return jax.tree.unflatten(self._p.opt_def, self._opt)

    @opt_state.setter
    def opt_state(self, state: optax.OptState) -> None:
        self._opt = _leaves_of(state, self._p.opt_def, "opt_state")

    @property
    def frozen(self) -> nnx.State:
        return jax.tree.unflatten(self._p.frozen.treedef, self._frozen)

    @property
    def model(self) -> nnx.Module:
        """A module view of the current parameters. It shares their arrays, and the next update
        donates the LoRA ones: copy what must outlive it, e.g. `adapter_weights`."""
        return nnx.merge(self.graphdef, self.lora, self.frozen)

    def executable(self, key: ProgramKey) -> jax.stages.Compiled:
        """The compiled program of a key this trainer has run, for cost and memory analysis."""
        jitted, args = self._jitted[key]
        return jitted.lower(*args).compile()

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One whole step as one program; returns ``loss``, ``grad_norm`` (device scalars) and
        ``tokens`` (the masked-token count)."""
        (arrays,) = _device_chunks(batch, 1)
        args = (self._lora, self._opt, self._frozen, arrays, self._key, np.int32(self.step))
        key = ("step", *arrays["tokens"].shape, *(("remat",) if self.remat else ()))
        program = functools.partial(self._p.whole_step, remat=self.remat)
        self._lora, self._opt, metrics = self._call(key, program, (0, 1), *args)
        self.step += 1
        return {**metrics, "tokens": int(np.sum(batch["loss_mask"]))}

    # -- co-location: a step's state in arena pages ---------------------------------------------

    def use_arena(self, arena: Arena, owner: Owner) -> None:
        """From the next plan on, keeps a step's state in pages of ``arena`` leased to ``owner``."""
        if any(path[0] != "layers" for path in self._p.lora.paths):
            raise ValueError("arena micro-steps need every LoRA weight inside model.layers")
        self.release()
        self._arena, self._owner = arena, owner
        self._jitted.clear()  # the micro-step keys now name the arena programs

    def _slots(self, rows: int, seq_len: int) -> ArenaSlots:
        embed = self._frozen[self._p.frozen.paths.index(("embed_tokens",))]
        hidden = jax.ShapeDtypeStruct((rows, seq_len, embed.shape[-1]), embed.dtype)
        one_layer = self._p.lora.in_layers(slice(0, 1))
        grads = tuple(_shape_of(self._lora[i]) for i in one_layer)
        return ArenaSlots(hidden, grads)

    def reserve(self, rows: int, seq_len: int, token_chunks: int, spans: int) -> bool:
        """Leases the pages a step of ``rows`` x ``seq_len`` cut into ``token_chunks`` and
        ``spans`` layer spans needs (keeping a lease of the right size); False if they cannot be
        had now, ValueError if they never could. Always True outside co-location."""
        if self._arena is None:
            return True
        slots = self._slots(rows // token_chunks, seq_len)
        per_slot = self._arena.pages_for(slots.hidden)
        per_layer = self._arena.pages_for(slots.layer_grads)
        need = self._lease_size = (spans + 1) * per_slot + self.num_layers * per_layer
        table = self._arena.pages
        if need > table.num_pages - table.reserved:  # waiting would never help: fail the job
            raise ValueError(
                f"a train step of {rows}x{seq_len} tokens needs {need} arena pages, the arena has "
                f"{table.num_pages - table.reserved}: give the engine more memory "
                "(--memory-fraction, num_pages) or train with a smaller batch or sequence length"
            )
        if self._owner in table and self._lease_shape != (spans, per_slot, per_layer):
            self.release()
        if self._owner not in table:
            if not self._arena.lease(self._owner, need):
                return False
            # The page arrays go to the device once per lease, in one transfer: one per slot
            # and per span, every step, cost 7-22 ms of host time per step on the H100 host.
            pages = self._arena.page_array(self._owner)
            split = (spans + 1) * per_slot
            self._acc_pages = pages[split:].reshape(self.num_layers, per_layer)
            slot_pages = list(pages[:split].reshape(spans + 1, per_slot))
            self._slot_pages, self._acc_device = jax.device_put((slot_pages, self._acc_pages))
            self._lease_shape, self._span_acc = (spans, per_slot, per_layer), {}
        return True

    def _span_acc_pages(self, spans: list[Span]) -> list[jax.Array]:
        """The gradient-sum pages of each span's layers (as its backward program reads them),
        on the device; transferred once per lease and cut."""
        n = self.num_layers
        layers = tuple(
            tuple((i + s.shift) % n for i in range(s.layers.start, s.layers.stop)) for s in spans
        )
        if layers not in self._span_acc:
            self._span_acc[layers] = jax.device_put([self._acc_pages[list(ls)] for ls in layers])
        return self._span_acc[layers]

    def release(self) -> None:
        """Drops the open co-located step (it is planned again later) and frees its pages."""
        self._open = None
        if self._arena is not None and self._owner in self._arena.pages:
            self._arena.pages.free(self._owner)
        self._lease_shape = None

    @property
    def holds_pages(self) -> bool:
        return self._arena is not None and self._owner in self._arena.pages

    def plan(
        self, batch: Batch, token_chunks: int, layer_spans: list[tuple[int, int]]
    ) -> TrainPlan:
        """The next train step on ``batch`` as micro-steps: rows split into ``token_chunks``
        equal chunks, layers into ``layer_spans`` (contiguous ``(start, stop)`` covering all).
        A plan runs to completion before the next one starts."""
        rows = np.shape(batch["tokens"])[0]
        if token_chunks < 1 or rows % token_chunks:
            raise ValueError(f"token_chunks={token_chunks} must divide the batch's {rows} rows")
        spans = self._spans(layer_spans)
        if self._arena is not None:
            return self._plan_in_arena(batch, token_chunks, spans)
        if self._accumulating:  # an earlier plan stopped before its update: drop its sums
            self._grads, self._loss = self._call(("zeros",), self._p.zeros, (), self._lora)
        plan = TrainPlan(self.step)
        count = int(np.sum(batch["loss_mask"]))
        chunk_rows = rows // token_chunks
        for first_row, chunk in zip(
            range(0, rows, chunk_rows), _device_chunks(batch, token_chunks)
        ):
            self._plan_chunk(plan, spans, chunk, first_row, np.float32(max(count, 1)))
        plan._add("update", ("update",), functools.partial(self._run_update, plan, count))
        return plan

    def run_plan(self, plan: TrainPlan) -> dict[str, Any]:
        """Runs every remaining micro-step of ``plan``; returns its metrics."""
        for step in plan.steps[plan._next :]:
            step.run()
        return plan.metrics

    # -- micro-step plumbing ------------------------------------------------------------------

    def _plan_chunk(
        self, plan: TrainPlan, spans: list[Span], chunk: dict, first_row: int, denominator
    ) -> None:
        rows, seq_len = chunk["tokens"].shape
        batch_args = (chunk, self._key, np.int32(plan.step), np.int32(first_row))
        # Span s reads hidden[s] (None for the first span, which embeds the tokens) and appends
        # its output; backward pops them in reverse, so each activation dies once used.
        hidden: list[jax.Array | None] = [None]
        grad: list[jax.Array | None] = [None]  # d loss / d (the current span's output)

        def fwd(span: Span, key: ProgramKey) -> jax.Array:
            lora = self._p.lora.relabel(self._lora, span.shift)
            args = (lora, self._frozen_for(span.shift), hidden[-1], *batch_args)
            hidden.append(self._call(key, functools.partial(self._p.span_forward, span), (), *args))
            return hidden[-1]

        def head() -> jax.Array:
            self._accumulating = True
            args = (self._lora, self._frozen, hidden.pop(), chunk, denominator, self._loss)
            self._loss, grad[0] = self._call(("head", rows, seq_len), self._p.head, (2,), *args)
            return grad[0]

        def bwd(span: Span, key: ProgramKey) -> Leaves:
            lora = self._p.lora.relabel(self._lora, span.shift)
            grads = self._p.lora.relabel(self._grads, span.shift)
            args = (lora, self._frozen_for(span.shift), grads, hidden.pop(), grad[0], *batch_args)
            # The output gradient's buffer becomes the input gradient's; the first span has
            # none (it starts from tokens).
            donate = (2,) if span.place in ("first", "whole") else (2, 4)
            program = functools.partial(self._p.span_backward, span)
            grads, grad[0] = self._call(key, program, donate, *args)
            self._grads = self._p.lora.relabel(grads, -span.shift)
            return grads

        for span in spans:
            key = ("fwd", span.place, span.length, rows, seq_len)
            plan._add("fwd", key, functools.partial(fwd, span, key))
        plan._add("head", ("head", rows, seq_len), head)
        for span in reversed(spans):
            key = ("bwd", span.place, span.length, rows, seq_len)
            plan._add("bwd", key, functools.partial(bwd, span, key))

    def _plan_in_arena(self, batch: Batch, token_chunks: int, spans: list[Span]) -> TrainPlan:
        rows, seq_len = np.shape(batch["tokens"])
        if not self.reserve(rows, seq_len, token_chunks, len(spans)):
            raise OutOfPages(self._lease_size, self._arena.pages.num_free)
        plan = self._open = TrainPlan(self.step)
        acc = self._acc_device
        buffer = self._arena.buffer
        self._arena.buffer = self._call(("zero-grads",), pages_io.zero, (0,), buffer, acc)
        self._loss = jnp.zeros((), jnp.float32)
        count = int(np.sum(batch["loss_mask"]))
        chunk_rows = rows // token_chunks
        slots = self._slots(chunk_rows, seq_len)
        for first_row, chunk in zip(
            range(0, rows, chunk_rows), _device_chunks(batch, token_chunks)
        ):
            args = (chunk, self._key, np.int32(plan.step), np.int32(first_row))
            self._plan_chunk_in_arena(plan, spans, slots, args, np.float32(max(count, 1)))

        def update() -> Leaves:
            args = (self._lora, self._opt, acc, self._loss)
            program = functools.partial(self._p.arena_update, slots)
            outputs = self._in_arena(plan, ("update",), program, (0, 1), args)
            self._lora, self._opt, metrics = outputs
            self._open = None
            self.step += 1
            plan.metrics = {**metrics, "tokens": count}
            return self._lora

        plan._add("update", ("update",), update)
        return plan

    def _plan_chunk_in_arena(
        self, plan: TrainPlan, spans: list[Span], slots: ArenaSlots, batch_args, denominator
    ) -> None:
        """Span s writes its output to slot s and reads slot s - 1; the last slot holds the
        running gradient."""
        act, grad = self._slot_pages[:-1], self._slot_pages[-1]
        span_acc = self._span_acc_pages(spans)
        rows, seq_len = batch_args[0]["tokens"].shape

        def fwd(s: int, span: Span, key: ProgramKey) -> KVCache:
            lora = self._p.lora.relabel(self._lora, span.shift)
            inputs = act[s - 1] if s else None
            args = (lora, self._frozen_for(span.shift), inputs, act[s], *batch_args)
            program = functools.partial(self._p.arena_forward, span, slots)
            return self._in_arena(plan, key, program, (), args)

        def head() -> jax.Array:
            args = (self._lora, self._frozen, act[-1], grad, batch_args[0], denominator, self._loss)
            program = functools.partial(self._p.arena_head, slots)
            (self._loss,) = self._in_arena(plan, ("head", rows, seq_len), program, (), args)
            return self._loss

        def bwd(s: int, span: Span, key: ProgramKey) -> KVCache:
            lora = self._p.lora.relabel(self._lora, span.shift)
            inputs = act[s - 1] if s else None
            frozen = self._frozen_for(span.shift)
            args = (lora, frozen, inputs, grad, span_acc[s], *batch_args)
            program = functools.partial(self._p.arena_backward, span, slots)
            return self._in_arena(plan, key, program, (), args)

        for s, span in enumerate(spans):
            key = ("fwd", span.place, span.length, rows, seq_len)
            plan._add("fwd", key, functools.partial(fwd, s, span, key))
        plan._add("head", ("head", rows, seq_len), head)
        for s, span in reversed(list(enumerate(spans))):
            key = ("bwd", span.place, span.length, rows, seq_len)
            plan._add("bwd", key, functools.partial(bwd, s, span, key))

    def _in_arena(self, plan: TrainPlan, key: ProgramKey, fn: Callable, donate, args):
        """Runs an arena program of ``plan`` with the arena donated; keeps the new buffer and
        returns the program's other outputs (or the buffer, if it has none)."""
        if self._open is not plan:
            raise RuntimeError("this plan was abandoned (its pages were released): plan again")
        donate = (0, *(i + 1 for i in donate))
        out = self._call(key, fn, donate, self._arena.buffer, *args)
        if isinstance(out, KVCache):
            self._arena.buffer = out
            return out
        self._arena.buffer, *rest = out
        return rest

    def _run_update(self, plan: TrainPlan, count: int) -> Leaves:
        if plan.step != self.step:
            raise RuntimeError(f"plan for step {plan.step} is stale (trainer is at {self.step})")
        args = (self._lora, self._opt, self._grads, self._loss)
        outputs = self._call(("update",), self._p.update, (0, 1, 2), *args)
        self._lora, self._opt, self._grads, self._loss, metrics = outputs
        self._accumulating = False
        self.step += 1
        plan.metrics = {**metrics, "tokens": count}
        return self._lora

    def _spans(self, layer_spans: list[tuple[int, int]]) -> list[Span]:
        n_layers = self.num_layers
        starts = [0, *(b for _, b in layer_spans)]
        if (
            not layer_spans
            or starts[-1] != n_layers
            or any(a != start or a >= b for (a, b), start in zip(layer_spans, starts))
        ):
            raise ValueError(
                f"layer_spans {layer_spans} must be contiguous non-empty (start, stop) pairs "
                f"covering layers 0..{n_layers}"
            )
        spans = []
        for a, b in layer_spans:
            if a == 0:
                spans.append(Span("whole" if b == n_layers else "first", slice(0, b), 0))
            elif b == n_layers:
                spans.append(Span("last", slice(a, b), 0))
            else:
                spans.append(Span("middle", slice(0, b - a), a))
        return spans

    def _frozen_for(self, shift: int) -> Leaves:
        if shift not in self._frozen_relabelled:
            self._frozen_relabelled[shift] = self._p.frozen.relabel(self._frozen, shift)
        return self._frozen_relabelled[shift]

    def _call(self, key: ProgramKey, fn: Callable, donate: tuple[int, ...], *args):
        """Runs the program ``key`` (``fn`` jitted on first use) on ``args``."""
        if key not in self._jitted:
            uses_optimizer = key[0] in ("step", "update")
            # Arena programs share their micro-step's key but not its signature.
            in_arena = self._arena is not None and key[0] != "step"
            owner = (self.graphdef, self.optimizer if uses_optimizer else None, in_arena)
            if (*owner, key) not in self._cache:
                self._cache[(*owner, key)] = jax.jit(fn, donate_argnums=donate)
            jitted = self._cache[(*owner, key)]
            # Shapes, not arrays, so `executable` can lower it again without keeping them alive.
            self._jitted[key] = (jitted, jax.tree.map(_shape_of, args))
        return self._jitted[key][0](*args)


def _shape_of(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _leaves_of(tree: Any, treedef: jax.tree_util.PyTreeDef, name: str) -> Leaves:
    leaves, got = jax.tree.flatten(tree)
    if got != treedef:
        raise ValueError(f"{name} does not have this trainer's structure: {got} != {treedef}")
    return leaves


def _device_chunks(batch: Batch, chunks: int) -> list[dict[str, jax.Array]]:
    """``batch`` split into ``chunks`` equal row chunks, on the device in one transfer (one per
    array cost ~0.2 ms each on the H100's host, on the co-located step's critical path)."""
    names = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    split = {name: np.split(np.asarray(batch[name], np.int32), chunks) for name in names}
    return jax.device_put([{name: split[name][i] for name in names} for i in range(chunks)])
