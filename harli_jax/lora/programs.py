"""The device programs of LoRA training, as pure functions of flat lists of arrays.

This module owns what runs inside `jax.jit` for `harli_jax.lora.train`: the loss, the whole train
step, a span of layers' forward and backward (one `jax.vjp` split into two programs: `Residuals`
says what passes between them), the loss head and the optimiser update. A span's program takes
its view of the state (`harli_jax.lora.layout`), so every middle span of a length shares one
program.
The programs depend only on the model's structure and the optimiser, never on a trainer's state.

Co-located, the micro-step programs have `arena_*` twins that keep a step's boundary activations,
its spans' residuals, its running gradient and its gradient sums in pages of the unified arena
(`ArenaSlots` says what one slot holds): they take the arena buffer donated plus the page indices
to read and write, and return the new buffer, so a job's pages can move between calls without
recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from harli_jax.lora.inject import set_dropout_keys
from harli_jax.lora.layout import HEAD, Leaves, Span, StateLayout
from harli_jax.memory.arena import load, store
from harli_jax.memory.kv_cache import KVCache

FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")  # a `Batch`'s arrays
Batch = Mapping[str, Any]  # PackedBatches' dict of the FIELDS, int32 [rows, seq_len] each


def masked_loss_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of float32 next-token cross-entropy over the tokens where ``mask`` is set."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(losses * mask)


def loss_fn(model: nnx.Module, batch: Batch) -> jax.Array:
    """Mean masked next-token cross-entropy; packed examples attend only within their segment."""
    hidden, _ = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
    count = jnp.maximum(jnp.sum(batch["loss_mask"]), 1)
    return masked_loss_sum(model.logits(hidden), batch["targets"], batch["loss_mask"]) / count


@dataclasses.dataclass(frozen=True, eq=False)
class ArenaSlots:
    """What a step keeps in arena pages: activations and the running gradient (each ``hidden``)
    and, per layer, the LoRA gradient sums (``layer_grads``, one layer's leaves in order)."""

    hidden: jax.ShapeDtypeStruct
    layer_grads: tuple[jax.ShapeDtypeStruct, ...]


# What a span's forward keeps for its backward, by mode. "kept": the outputs of its matrix
# products with no batch dimension (the projections, LoRA's included), where attention scores and
# elementwise results are recomputed; "recomputed": nothing, the backward runs the forward again
# (a third more work per step, for a fraction of the memory).
POLICIES = {
    "kept": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "recomputed": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True, eq=False)
class Residuals:
    """A span's `jax.vjp` pullback taken apart, so the forward and backward can be separate
    programs: its structure, and for each of its arrays either the position of the span program's
    input it is (the frozen weights, the LoRA leaves, the input activation: never stored twice) or
    None, for an array the forward computed (`saved`, in order: what the forward returns and the
    backward takes back)."""

    mode: str  # a key of POLICIES
    treedef: jax.tree_util.PyTreeDef
    sources: tuple[int | None, ...]
    saved: tuple[jax.ShapeDtypeStruct, ...]

    def pullback(self, inputs: tuple, saved: list) -> Any:
        """The pullback again, from the span program's ``inputs`` and the ``saved`` arrays."""
        flat, saved = jax.tree.leaves(inputs), iter(saved)
        leaves = [next(saved) if source is None else flat[source] for source in self.sources]
        return jax.tree.unflatten(self.treedef, leaves)


def _sources(leaves: list, inputs: tuple) -> tuple[int | None, ...]:
    """For each of ``leaves`` (traced), the position of the input it is, else None."""
    position = {id(x): i for i, x in enumerate(jax.tree.leaves(inputs))}
    return tuple(position.get(id(leaf)) for leaf in leaves)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainPrograms:
    """The device programs, as pure functions of their array arguments. They depend only on the
    model's structure and the optimizer (not on a trainer), so trainers can share them."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    lora: StateLayout
    frozen: StateLayout
    opt_def: jax.tree_util.PyTreeDef

    def model(self, lora: Leaves, frozen: Leaves) -> nnx.Module:
        lora_state = jax.tree.unflatten(self.lora.treedef, lora)
        frozen_state = jax.tree.unflatten(self.frozen.treedef, frozen)
        # Fresh Variables at this trace level: the keys are set inside jax.grad / jax.vjp.
        return nnx.merge(self.graphdef, lora_state, frozen_state, copy=True)

    def merged(self, lora: Leaves, frozen: Leaves, key, step, offset, rows: int) -> nnx.Module:
        model = self.model(lora, frozen)
        set_dropout_keys(model, row_keys(key, step, offset, rows))
        return model

    def whole_step(self, lora, opt, frozen, batch, key, step, remat: bool = False):
        """Forward, backward and update in one program; with ``remat`` (static: one program
        each way) the backward pass recomputes each layer (`remat_value_and_grad`)."""
        rows = batch["tokens"].shape[0]
        if remat:
            loss, grads = self.remat_value_and_grad(lora, frozen, batch, key, step)
        else:
            loss, grads = jax.value_and_grad(
                lambda lora: loss_fn(self.merged(lora, frozen, key, step, 0, rows), batch)
            )(lora)
        return self.apply(lora, opt, grads, loss)

    def remat_value_and_grad(self, lora, frozen, batch, key, step):
        """`loss_fn` and its LoRA gradients, keeping only each layer's input hidden state: the
        forward pass runs layer by layer, then each layer's backward (`jax.vjp`) recomputes its
        forward, so activation memory is one layer's plus [layers + 1, B, T, hidden].

        This is the micro-step plan's split (one-layer spans) inside one program. A layer's
        recomputation reads its input tied to the gradient arriving from above (plus 0 times
        one element of it): it cannot run before that gradient exists, and XLA cannot merge it
        with the identical forward computation (CSE), either of which would keep every layer's
        activations alive, as `jax.checkpoint` in an unrolled loop of layers lets XLA do.
        (An `optimization_barrier` over the pair measured no saving on CPU.)
        """
        rows = batch["tokens"].shape[0]
        model = self.merged(lora, frozen, key, step, 0, rows)
        hiddens = [run_span(model, _layers(0, 0), None, batch)]  # the embedded tokens
        for index in range(len(model.layers)):
            hiddens.append(run_span(model, _layers(index, index + 1), hiddens[-1], batch))
        count = jnp.maximum(jnp.sum(batch["loss_mask"]), 1)

        def head_loss(hidden):
            logits = model.logits(hidden)
            return masked_loss_sum(logits, batch["targets"], batch["loss_mask"]) / count

        loss, grad = jax.value_and_grad(head_loss)(hiddens.pop())
        grads: list = [None] * len(lora)
        for index in reversed(range(len(model.layers))):
            trained = self.lora.in_layers(slice(index, index + 1))

            def layer(trained_leaves, hidden, index=index, trained=trained):
                leaves = list(lora)
                for i, leaf in zip(trained, trained_leaves):
                    leaves[i] = leaf
                model = self.merged(leaves, frozen, key, step, 0, rows)
                return run_span(model, _layers(index, index + 1), hidden, batch)

            hidden = hiddens.pop()
            hidden = hidden + (jnp.ravel(grad)[0] * 0).astype(hidden.dtype)
            if index:
                _, vjp = jax.vjp(layer, [lora[i] for i in trained], hidden)
                grad_trained, grad = vjp(grad)
            else:  # the embedded tokens are frozen: no gradient to them
                frozen_input = functools.partial(layer, hidden=hidden)
                _, vjp = jax.vjp(frozen_input, [lora[i] for i in trained])
                (grad_trained,) = vjp(grad)
            for i, leaf_grad in zip(trained, grad_trained):
                grads[i] = leaf_grad
        if any(g is None for g in grads):
            raise ValueError("remat needs every LoRA weight inside model.layers")
        return loss, grads

    def apply(self, lora, opt, grads, loss):
        # The optimizer sees the LoRA state as an nnx.State, so path-based optax masks work.
        params, updates = (jax.tree.unflatten(self.lora.treedef, x) for x in (lora, grads))
        updates, opt_state = self.optimizer.update(
            updates, jax.tree.unflatten(self.opt_def, opt), params
        )
        lora = jax.tree.leaves(optax.apply_updates(params, updates))
        metrics = {"loss": loss, "grad_norm": global_norm(grads)}
        return lora, jax.tree.leaves(opt_state), metrics

    def residuals(self, span: Span, mode: str, *inputs) -> Residuals:
        """What the span's forward keeps for its backward in ``mode``, traced (not run) on
        ``inputs`` (``lora, frozen, hidden, chunk, key, step, offset``; arrays or specs)."""
        found = []

        def probe(*inputs):
            _, pullback = self._span_pullback(span, mode, *inputs)
            leaves, treedef = jax.tree.flatten(pullback)
            sources = _sources(leaves, inputs)
            found.append((treedef, sources))
            return [leaf for leaf, source in zip(leaves, sources) if source is None]

        saved = jax.eval_shape(probe, *inputs)
        treedef, sources = found[0]
        return Residuals(mode, treedef, sources, tuple(saved))

    def span_forward(self, span: Span, residuals: Residuals, lora, frozen, hidden, *batch_args):
        """The span's output, and the residuals its backward needs that are not its inputs."""
        inputs = (lora, frozen, hidden, *batch_args)
        out, pullback = self._span_pullback(span, residuals.mode, *inputs)
        leaves = jax.tree.leaves(pullback)
        if _sources(leaves, inputs) != residuals.sources:
            raise RuntimeError(f"the {span.place} span's residuals changed between traces")
        return out, [leaf for leaf, source in zip(leaves, residuals.sources) if source is None]

    def span_backward(
        self, span: Span, residuals: Residuals, lora, frozen, grads, hidden, saved, grad_out,
        *batch_args,
    ):  # fmt: skip
        pullback = residuals.pullback((lora, frozen, hidden, *batch_args), saved)
        grad_trained, grad_in = pullback(grad_out)
        at = {position: n for n, position in enumerate(self.lora.positions(span))}
        grads = list(grads)
        for i, grad in zip(self.lora.in_layers(span.layers), grad_trained):
            grads[at[i]] = grads[at[i]] + grad
        return grads, grad_in

    def _span_pullback(self, span: Span, mode: str, lora, frozen, hidden, chunk, key, step, offset):
        """The span's output and its `jax.vjp` pullback with respect to the span's LoRA leaves
        (in `in_layers` order) and its input, keeping what ``mode``'s policy saves. ``lora`` and
        ``frozen`` are the span's views (`StateLayout.take`)."""
        trained = self.lora.in_layers(span.layers)
        rows = chunk["tokens"].shape[0]
        lora, frozen = self.lora.expand(lora, span), self.frozen.expand(frozen, span)

        def forward(trained_leaves, hidden):
            leaves = list(lora)
            for i, leaf in zip(trained, trained_leaves):
                leaves[i] = leaf
            model = self.merged(leaves, frozen, key, step, offset, rows)
            return run_span(model, span, hidden, chunk)

        forward = jax.checkpoint(forward, policy=POLICIES[mode])
        return jax.vjp(forward, [lora[i] for i in trained], hidden)

    def head(self, lora, frozen, hidden, chunk, denominator, loss):
        """The loss of one chunk from the last span's output, and its gradient; ``lora`` and
        ``frozen`` are the `HEAD` views."""
        model = self.model(self.lora.expand(lora, HEAD), self.frozen.expand(frozen, HEAD))

        def chunk_loss(hidden):
            logits = model.logits(hidden)
            return masked_loss_sum(logits, chunk["targets"], chunk["loss_mask"]) / denominator

        part, grad = jax.value_and_grad(chunk_loss)(hidden)
        return loss + part, grad

    def update(self, lora, opt, grads, loss):
        lora, opt, metrics = self.apply(lora, opt, grads, loss)
        return (lora, opt, *self.zeros(grads), metrics)

    @staticmethod
    def zeros(lora: Leaves):
        return [jnp.zeros_like(x) for x in lora], jnp.zeros((), jnp.float32)

    # -- the same micro-steps with their state in arena pages -----------------------------------
    # Page arguments: ``hidden_pages`` / ``out_pages`` / ``grad_pages`` are one slot's pages [n];
    # ``acc_pages`` [layers, n] the gradient sums of the span's layers (in its relabelled order).

    def arena_forward(
        self, span: Span, slots: ArenaSlots, residuals: Residuals, arena: KVCache, lora, frozen,
        hidden_pages, out_pages, saved_pages, chunk, key, step, offset,
    ):  # fmt: skip
        hidden = None if hidden_pages is None else load(arena, hidden_pages, slots.hidden)
        out, saved = self.span_forward(
            span, residuals, lora, frozen, hidden, chunk, key, step, offset
        )
        return store(store(arena, out_pages, out), saved_pages, saved)

    def arena_head(
        self, slots: ArenaSlots, arena: KVCache, lora, frozen, hidden_pages, grad_pages, chunk,
        denominator, loss,
    ):  # fmt: skip
        hidden = load(arena, hidden_pages, slots.hidden)
        loss, grad = self.head(lora, frozen, hidden, chunk, denominator, loss)
        return store(arena, grad_pages, grad), loss

    def arena_backward(
        self, span: Span, slots: ArenaSlots, residuals: Residuals, arena: KVCache, lora, frozen,
        hidden_pages, saved_pages, grad_pages, acc_pages, chunk, key, step, offset,
    ):  # fmt: skip
        hidden = None if hidden_pages is None else load(arena, hidden_pages, slots.hidden)
        saved = load(arena, saved_pages, list(residuals.saved))
        grad_out = load(arena, grad_pages, slots.hidden)
        pullback = residuals.pullback((lora, frozen, hidden, chunk, key, step, offset), saved)
        grad_trained, grad_in = pullback(grad_out)
        position = {i: n for n, i in enumerate(self.lora.in_layers(span.layers))}
        for row, layer in enumerate(range(span.layers.start, span.layers.stop)):
            sums = load(arena, acc_pages[row], list(slots.layer_grads))
            leaves = self.lora.in_layers(slice(layer, layer + 1))
            sums = [total + grad_trained[position[i]] for total, i in zip(sums, leaves)]
            arena = store(arena, acc_pages[row], sums)
        if grad_in is not None:  # the first span starts from tokens: nothing flows further
            arena = store(arena, grad_pages, grad_in)
        return arena

    def arena_update(self, slots: ArenaSlots, arena: KVCache, lora, opt, acc_pages, loss):
        grads = list(lora)
        for layer in range(acc_pages.shape[0]):
            sums = load(arena, acc_pages[layer], list(slots.layer_grads))
            for i, total in zip(self.lora.in_layers(slice(layer, layer + 1)), sums):
                grads[i] = total
        lora, opt, metrics = self.apply(lora, opt, grads, loss)
        return arena, lora, opt, metrics


def run_span(model: nnx.Module, span: Span, hidden: jax.Array | None, chunk) -> jax.Array:
    out, _ = model(
        chunk["tokens"],
        chunk["positions"],
        segment_ids=chunk["segment_ids"],
        layers=span.layers,
        hidden=hidden,
    )
    return out


def _layers(start: int, stop: int) -> Span:
    """Layers [start, stop) in the model's own numbering."""
    return Span("whole", slice(start, stop), 0)


def row_keys(key: jax.Array, step, offset, rows: int) -> jax.Array:
    """Raw dropout keys for batch rows offset..offset+rows of step ``step``: a row's key does
    not depend on how the batch is split."""
    step_key = jax.random.fold_in(key, step)
    keys = jax.vmap(lambda row: jax.random.fold_in(step_key, row))(offset + jnp.arange(rows))
    return jax.random.key_data(keys)


def global_norm(leaves: Leaves) -> jax.Array:
    """The float32 L2 norm of all ``leaves`` together, as one reduction over their concatenation
    (the same concatenation a flattened optimizer, `optax.flatten`, makes, which XLA shares)
    rather than one small reduction kernel per leaf."""
    flat = jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves])
    return jnp.sqrt(jnp.vdot(flat, flat))
