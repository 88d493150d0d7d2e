"""LoRA training: a one-program train step, and the same step cut into micro-steps.

This module owns `Trainer`, the host side of training, and the `ProgramCache` its programs are
jitted into. The device programs live in `harli_jax.lora.programs`, the plan types (`MicroStep`,
`TrainPlan`, re-exported here) in `harli_jax.lora.plan`, and the co-located side, where a step's
state lives in arena pages, in `harli_jax.lora.arena_steps`. A trainer holds a LoRA-injected
model as (graphdef, trainable LoRA state, frozen state) plus the optimiser state. The frozen state
is never donated or copied: it is the same base arrays that serving uses. `Trainer.train_step`
runs a whole step as one program.

The co-location scheduler cannot afford a whole step between two decode steps, so `Trainer.plan`
cuts one step into `MicroStep`s whose size the scheduler chooses: the batch's rows are split into
token chunks, the decoder's layers into spans, and for each chunk the plan runs the spans' forward
passes (keeping the activations at span boundaries and each span's projection outputs), the loss
head, then each span's backward in reverse (the span's `jax.vjp` pullback, rebuilt from what its
forward kept), accumulating LoRA gradients; the
optimiser update follows the last chunk. Gradients are weighted by the whole batch's masked-token
count, so any split computes the unsplit mean loss and its gradient.

Each micro-step calls a jitted program whose key depends only on (rows, seq_len, span length)
and where the span sits (first, middle, last), so steady state never compiles. A span's program
takes flat lists of only its view of the state (its layers' arrays and those outside the
layers), which keeps a micro-step's host overhead to picking them and one dispatch.
Here a plan keeps its boundary activations and gradient sums in the trainer's own buffers;
co-located (`Trainer.use_arena`), an `ArenaSteps` plans it in leased arena pages instead.

The model must follow `Llama`'s protocol: ``model.layers``, ``model(tokens, positions,
segment_ids=, layers=slice, hidden=)`` and ``model.logits(hidden)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from harli_jax.lora.arena_steps import ArenaSteps
from harli_jax.lora.layout import HEAD, Leaves, Span, StateLayout
from harli_jax.lora.plan import MicroStep, ProgramKey, TrainPlan, row_chunks, spans_of
from harli_jax.lora.programs import FIELDS, Batch, Residuals, TrainPrograms, loss_fn
from harli_jax.memory.arena import Arena
from harli_jax.memory.page_table import Owner

__all__ = ["MicroStep", "ProgramCache", "TrainPlan", "Trainer", "loss_fn"]


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
        self._ahead: dict[ProgramKey, jax.stages.Compiled] = {}  # compiled before a first run
        self._frozen_views: dict[tuple[int, int, int], Leaves] = {}
        self._residuals: dict[tuple, Residuals] = {}  # by span place, length and chunk shape
        self._arena_steps: ArenaSteps | None = None  # co-located: plans in arena pages
        self.done: jax.Array  # ready once the last program dispatched has run (see `_call`)
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
        if key in self._ahead:
            return self._ahead[key]
        jitted, args = self._jitted[key]
        return jitted.lower(*args).compile()

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One whole step as one program; returns ``loss``, ``grad_norm`` (device scalars) and
        ``tokens`` (the masked-token count)."""
        (arrays,) = _device_chunks(batch, 1)
        args = self._step_args(arrays)
        key, program = self._step_program(*arrays["tokens"].shape)
        self._lora, self._opt, metrics = self._call(key, program, (0, 1), *args)
        self.step += 1
        return {**metrics, "tokens": int(np.sum(batch["loss_mask"]))}

    def step_executable(self, rows: int, seq_len: int) -> jax.stages.Compiled:
        """`train_step`'s program on ``rows`` x ``seq_len`` batches, compiled ahead of its first
        run (which then uses it): its memory analysis says whether it fits before it runs."""
        key, program = self._step_program(rows, seq_len)
        if key not in self._jitted:
            batch = {name: jax.ShapeDtypeStruct((rows, seq_len), np.int32) for name in FIELDS}
            args = jax.tree.map(_shape_of, self._step_args(batch))
            self._ahead[key] = self._jit(key, program, (0, 1), args).lower(*args).compile()
        return self.executable(key)

    def _step_program(self, rows: int, seq_len: int) -> tuple[ProgramKey, Callable]:
        key = ("step", rows, seq_len, *(("remat",) if self.remat else ()))
        return key, functools.partial(self._p.whole_step, remat=self.remat)

    def _step_args(self, batch: Batch) -> tuple:
        return (self._lora, self._opt, self._frozen, batch, self._key, np.int32(self.step))

    # -- co-location: a step's state in arena pages (see `ArenaSteps`) ---------------------------

    def use_arena(self, arena: Arena, owner: Owner) -> None:
        """From the next plan on, keeps a step's state in pages of ``arena`` leased to ``owner``."""
        arena_steps = ArenaSteps(self, arena, owner)
        self.release()
        self._arena_steps = arena_steps
        self._jitted.clear()  # the micro-step keys now name the arena programs

    def reserve(
        self, rows: int, seq_len: int, token_chunks: int, layer_spans: list[tuple[int, int]]
    ) -> bool:
        """Leases the pages a step of ``rows`` x ``seq_len`` cut into ``token_chunks`` and
        ``layer_spans`` needs (keeping a lease of the right size); False if they cannot be had
        now, ValueError if they never could. Always True outside co-location."""
        if self._arena_steps is None:
            return True
        spans = spans_of(layer_spans, self.num_layers)
        return self._arena_steps.reserve(rows, seq_len, token_chunks, spans)

    def release(self) -> None:
        """Drops the open co-located step (it is planned again later) and frees its pages."""
        if self._arena_steps is not None:
            self._arena_steps.release()

    @property
    def holds_pages(self) -> bool:
        return self._arena_steps is not None and self._arena_steps.holds_pages

    def plan(
        self, batch: Batch, token_chunks: int, layer_spans: list[tuple[int, int]]
    ) -> TrainPlan:
        """The next train step on ``batch`` as micro-steps: rows split into ``token_chunks``
        equal chunks, layers into ``layer_spans`` (contiguous ``(start, stop)`` covering all).
        A plan runs to completion before the next one starts."""
        rows = np.shape(batch["tokens"])[0]
        if token_chunks < 1 or rows % token_chunks:
            raise ValueError(f"token_chunks={token_chunks} must divide the batch's {rows} rows")
        spans = spans_of(layer_spans, self.num_layers)
        if self._arena_steps is not None:
            return self._arena_steps.plan(batch, token_chunks, spans)
        if self._accumulating:  # an earlier plan stopped before its update: drop its sums
            self._grads, self._loss = self._call(("zeros",), self._p.zeros, (), self._lora)
        plan = TrainPlan(self.step)
        count = int(np.sum(batch["loss_mask"]))
        for batch_args in self._chunks(_device_chunks(batch, token_chunks), plan.step):
            self._plan_chunk(plan, spans, batch_args, np.float32(max(count, 1)))
        plan._add("update", ("update",), functools.partial(self._run_update, plan, count))
        return plan

    def fused(self, plan: TrainPlan, count: int) -> MicroStep | None:
        """``plan``'s next ``count`` micro-steps as one program, where they are adjacent middle
        spans' forwards or backwards of a co-located step (`ArenaSteps.fused`); else None."""
        return None if self._arena_steps is None else self._arena_steps.fused(plan, count)

    def run_plan(self, plan: TrainPlan) -> dict[str, Any]:
        """Runs every remaining micro-step of ``plan``; returns its metrics."""
        for step in plan.steps[plan._next :]:
            step.run()
        return plan.metrics

    # -- micro-step plumbing ------------------------------------------------------------------

    def _chunks(self, chunks: list[dict[str, jax.Array]], step: int) -> list[tuple]:
        """The batch arguments of the micro-step programs for each of a batch's row ``chunks``
        (on the device): (the chunk, the dropout key, ``step``, the chunk's first row)."""
        rows = chunks[0]["tokens"].shape[0]
        return [(c, self._key, np.int32(step), np.int32(i * rows)) for i, c in enumerate(chunks)]

    def _plan_chunk(
        self, plan: TrainPlan, spans: Sequence[Span], batch_args: tuple, denominator: np.float32
    ) -> None:
        chunk = batch_args[0]
        rows, seq_len = chunk["tokens"].shape
        # Span s reads hidden[s] (None for the first span, which embeds the tokens) and appends
        # its output and residuals; backward pops them in reverse, so each dies once used.
        hidden: list[jax.Array | None] = [None]
        saved: list[Leaves] = []
        grad: list[jax.Array | None] = [None]  # d loss / d (the current span's output)

        def fwd(span: Span, key: ProgramKey) -> jax.Array:
            lora = self._p.lora.take(self._lora, span)
            args = (lora, self._frozen_view(span), hidden[-1], *batch_args)
            residuals = self.residuals(span, rows, seq_len, "kept")
            program = functools.partial(self._p.span_forward, span, residuals)
            out, kept = self._call(key, program, (), *args)
            hidden.append(out)
            saved.append(kept)
            return out

        def head() -> jax.Array:
            self._accumulating = True
            lora, frozen = self._p.lora.take(self._lora, HEAD), self._frozen_view(HEAD)
            args = (lora, frozen, hidden.pop(), chunk, denominator, self._loss)
            self._loss, grad[0] = self._call(("head", rows, seq_len), self._p.head, (2,), *args)
            return grad[0]

        def bwd(span: Span, key: ProgramKey) -> Leaves:
            lora = self._p.lora.take(self._lora, span)
            grads = self._p.lora.take(self._grads, span)
            args = (lora, self._frozen_view(span), grads, hidden.pop(), saved.pop(), grad[0])
            # The output gradient's buffer becomes the input gradient's; the first span has
            # none (it starts from tokens).
            donate = (2,) if span.place in ("first", "whole") else (2, 5)
            residuals = self.residuals(span, rows, seq_len, "kept")
            program = functools.partial(self._p.span_backward, span, residuals)
            grads, grad[0] = self._call(key, program, donate, *args, *batch_args)
            self._grads = self._p.lora.put(self._grads, grads, span)
            return grads

        for span in spans:
            key = ("fwd", span.place, span.length, rows, seq_len, "kept")
            plan._add("fwd", key, functools.partial(fwd, span, key))
        plan._add("head", ("head", rows, seq_len), head)
        for span in reversed(spans):
            key = ("bwd", span.place, span.length, rows, seq_len, "kept")
            plan._add("bwd", key, functools.partial(bwd, span, key))

    def _run_update(self, plan: TrainPlan, count: int) -> Leaves:
        if plan.step != self.step:
            raise RuntimeError(f"plan for step {plan.step} is stale (trainer is at {self.step})")
        args = (self._lora, self._opt, self._grads, self._loss)
        outputs = self._call(("update",), self._p.update, (0, 1, 2), *args)
        lora, opt, self._grads, self._loss, metrics = outputs
        self._accumulating = False
        return self._finish(plan, lora, opt, metrics, count)

    def _finish(
        self, plan: TrainPlan, lora: Leaves, opt: Leaves, metrics: dict[str, Any], tokens: int
    ) -> Leaves:
        """Takes the parameters and optimiser state that ``plan``'s update returned: the step is
        done. Both planners end here, so a step counts the same in or out of the arena."""
        self._lora, self._opt = lora, opt
        self.step += 1
        plan.metrics = {**metrics, "tokens": tokens}
        return self._lora

    def hidden_spec(self, rows: int, seq_len: int) -> jax.ShapeDtypeStruct:
        """The shape of the activations between layers, for ``rows`` x ``seq_len`` tokens."""
        embed = self._frozen[self._p.frozen.paths.index(("embed_tokens",))]
        return jax.ShapeDtypeStruct((rows, seq_len, embed.shape[-1]), embed.dtype)

    def residuals(self, span: Span, rows: int, seq_len: int, mode: str) -> Residuals:
        """What ``span``'s forward keeps for its backward in ``mode`` (`programs.POLICIES`), on
        row chunks of ``rows`` x ``seq_len`` tokens."""
        key = (span.place, span.length, rows, seq_len, mode)
        if key not in self._residuals:
            self._residuals[key] = self._p.residuals(
                span,
                mode,
                self._p.lora.take(self._lora, span),
                self._frozen_view(span),
                None if span.place in ("first", "whole") else self.hidden_spec(rows, seq_len),
                {name: jax.ShapeDtypeStruct((rows, seq_len), np.int32) for name in FIELDS},
                self._key,
                np.int32(0),
                np.int32(0),
            )
        return self._residuals[key]

    def _frozen_view(self, span: Span) -> Leaves:
        """``span``'s view of the frozen state (`StateLayout.take`), which never changes."""
        if span.view_key not in self._frozen_views:
            self._frozen_views[span.view_key] = self._p.frozen.take(self._frozen, span)
        return self._frozen_views[span.view_key]

    def _call(self, key: ProgramKey, fn: Callable, donate: tuple[int, ...], *args):
        """Dispatches the program ``key`` (``fn`` jitted on first use) on ``args`` and returns
        its outputs without waiting for them; `done` becomes its completion marker."""
        if key in self._ahead:
            outputs, self.done = self._ahead[key](*args)
            return outputs
        if key not in self._jitted:
            self._jit(key, fn, donate, jax.tree.map(_shape_of, args))
        outputs, self.done = self._jitted[key][0](*args)
        return outputs

    def _jit(self, key: ProgramKey, fn: Callable, donate: tuple[int, ...], shapes: Any) -> Callable:
        """``fn`` jitted as program ``key`` (from the shared cache where it is there), recorded
        with the ``shapes`` of its arguments so that `executable` can lower it again."""
        uses_optimizer = key[0] in ("step", "update")
        # Arena programs share their micro-step's key but not its signature.
        in_arena = self._arena_steps is not None and key[0] != "step"
        owner = (self.graphdef, self.optimizer if uses_optimizer else None, in_arena)
        if (*owner, key) not in self._cache:
            self._cache[(*owner, key)] = jax.jit(_with_marker(fn), donate_argnums=donate)
        self._jitted[key] = (self._cache[(*owner, key)], shapes)
        return self._jitted[key][0]


def _with_marker(fn: Callable) -> Callable:
    """``fn`` with a scalar appended to its outputs. All outputs of a program become ready
    together, and this one is never donated to a later program: a host that has passed the
    others on (an arena buffer to the next micro-step) can still wait for this program."""

    def program(*args):
        return fn(*args), jnp.zeros((), jnp.int8)

    return program


def _shape_of(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _leaves_of(tree: Any, treedef: jax.tree_util.PyTreeDef, name: str) -> Leaves:
    leaves, got = jax.tree.flatten(tree)
    if got != treedef:
        raise ValueError(f"{name} does not have this trainer's structure: {got} != {treedef}")
    return leaves


def _device_chunks(batch: Batch, chunks: int) -> list[dict[str, jax.Array]]:
    """``batch`` split into ``chunks`` equal row chunks, on the device in one transfer (one per
    array cost ~0.2 ms each on the H100's host). A co-located step cuts its batch on the device
    instead (`arena_steps._start`)."""
    arrays = {name: np.asarray(batch[name], np.int32) for name in FIELDS}
    return jax.device_put(row_chunks(arrays, chunks))
