"""The device programs of LoRA training, as pure functions of flat lists of arrays.

This module owns what runs inside `jax.jit` for `harli_jax.lora.train`: the loss, the whole train
step, a span of layers' forward and backward (`jax.vjp`, recomputing the forward), the loss head
and the optimiser update, plus `StateLayout`, which flattens a state to the list of arrays the
programs take and relabels its layers. Relabelling presents a middle span's layers as layers
[0, n) by permuting that list (no copy), so every middle span of length n shares one program.
The programs depend only on the model's structure and the optimiser, never on a trainer's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from harli_jax.lora.inject import LoraBatch, set_dropout_keys

Batch = Mapping[str, Any]  # PackedBatches' dict: tokens, targets, loss_mask, segment_ids, positions
Leaves = list  # a state flattened to its arrays, in its treedef's order


def masked_loss_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of float32 next-token cross-entropy over the tokens where ``mask`` is set."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(losses * mask)


def loss_fn(model: nnx.Module, batch: Batch) -> jax.Array:
    """Mean masked next-token cross-entropy; packed examples attend only within their segment."""
    hidden, _ = model(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
    count = jnp.maximum(jnp.sum(batch["loss_mask"]), 1)
    return masked_loss_sum(model.logits(hidden), batch["targets"], batch["loss_mask"]) / count


@dataclasses.dataclass(frozen=True)
class Span:
    """A span of layers as its program sees it: ``place`` picks embedding / final norm."""

    place: str  # "whole" | "first" | "middle" | "last"
    layers: slice  # in relabelled numbering
    shift: int  # relabelling: layer i is presented as layer (i - shift) % num_layers

    @property
    def length(self) -> int:
        return self.layers.stop - self.layers.start


class StateLayout:
    """A state's treedef, the module path of each of its arrays, and the array permutations that
    relabel its layers. The shared `LoraContext` keeps its place: it is no one layer's state."""

    def __init__(self, state: nnx.State, num_layers: int) -> None:
        self.treedef = jax.tree.structure(state)
        variables = jax.tree_util.tree_flatten_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )[0]
        self.paths = [tuple(key.key for key in path) for path, _ in variables]
        self._moves = [not isinstance(var, LoraBatch) for _, var in variables]
        self._num_layers = num_layers
        self._permutations: dict[int, list[int]] = {}

    def relabel(self, leaves: Leaves, shift: int) -> Leaves:
        """Layer i's arrays presented as layer (i - shift) % num_layers's."""
        if shift == 0:
            return leaves
        if shift not in self._permutations:
            index = {path: i for i, path in enumerate(self.paths)}
            self._permutations[shift] = [
                index[("layers", (path[1] + shift) % self._num_layers, *path[2:])]
                if path[0] == "layers" and moves
                else i
                for i, (path, moves) in enumerate(zip(self.paths, self._moves))
            ]
        return [leaves[i] for i in self._permutations[shift]]

    def in_layers(self, layers: slice) -> list[int]:
        """Indices of the arrays of layers ``layers``."""
        return [
            i
            for i, path in enumerate(self.paths)
            if path[0] == "layers" and layers.start <= path[1] < layers.stop
        ]


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

    def whole_step(self, lora, opt, frozen, batch, key, step):
        rows = batch["tokens"].shape[0]
        loss, grads = jax.value_and_grad(
            lambda lora: loss_fn(self.merged(lora, frozen, key, step, 0, rows), batch)
        )(lora)
        return self.apply(lora, opt, grads, loss)

    def apply(self, lora, opt, grads, loss):
        # The optimizer sees the LoRA state as an nnx.State, so path-based optax masks work.
        params, updates = (jax.tree.unflatten(self.lora.treedef, x) for x in (lora, grads))
        updates, opt_state = self.optimizer.update(
            updates, jax.tree.unflatten(self.opt_def, opt), params
        )
        lora = jax.tree.leaves(optax.apply_updates(params, updates))
        metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(jnp.vdot(g, g) for g in grads))}
        return lora, jax.tree.leaves(opt_state), metrics

    def span_forward(self, span: Span, lora, frozen, hidden, chunk, key, step, offset):
        model = self.merged(lora, frozen, key, step, offset, chunk["tokens"].shape[0])
        return run_span(model, span, hidden, chunk)

    def span_backward(
        self, span: Span, lora, frozen, grads, hidden, grad_out, chunk, key, step, offset
    ):
        trained = self.lora.in_layers(span.layers)
        rows = chunk["tokens"].shape[0]

        def forward(trained_leaves, hidden):
            leaves = list(lora)
            for i, leaf in zip(trained, trained_leaves):
                leaves[i] = leaf
            model = self.merged(leaves, frozen, key, step, offset, rows)
            return run_span(model, span, hidden, chunk)

        _, vjp = jax.vjp(forward, [lora[i] for i in trained], hidden)
        grad_trained, grad_in = vjp(grad_out)
        grads = list(grads)
        for i, grad in zip(trained, grad_trained):
            grads[i] = grads[i] + grad
        return grads, grad_in

    def head(self, lora, frozen, hidden, chunk, denominator, loss):
        model = self.model(lora, frozen)

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


def run_span(model: nnx.Module, span: Span, hidden: jax.Array | None, chunk) -> jax.Array:
    out, _ = model(
        chunk["tokens"],
        chunk["positions"],
        segment_ids=chunk["segment_ids"],
        layers=span.layers,
        hidden=hidden,
    )
    return out


def row_keys(key: jax.Array, step, offset, rows: int) -> jax.Array:
    """Raw dropout keys for batch rows offset..offset+rows of step ``step``: a row's key does
    not depend on how the batch is split."""
    step_key = jax.random.fold_in(key, step)
    keys = jax.vmap(lambda row: jax.random.fold_in(step_key, row))(offset + jnp.arange(rows))
    return jax.random.key_data(keys)
