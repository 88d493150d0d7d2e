"""Which arrays of a flattened state a span of layers' program takes.

A state flattens to a list of arrays (`Leaves`); `StateLayout` cuts from it the view a span's
program takes: that span's layers' arrays, relabelled, and the arrays outside the layers.
Relabelling presents a middle span's layers as layers [0, n) (no copy), so every middle span of
length n shares one program.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from harli_jax.lora.inject import LoraBatch

Leaves = list  # a state flattened to its arrays, in its treedef's order


@dataclasses.dataclass(frozen=True)
class Span:
    """A span of layers as its program sees it: ``place`` picks embedding / final norm."""

    place: str  # "whole" | "first" | "middle" | "last"
    layers: slice  # in relabelled numbering
    shift: int  # relabelling: layer i is presented as layer (i - shift) % num_layers

    @property
    def length(self) -> int:
        return self.layers.stop - self.layers.start

    @property
    def view_key(self) -> tuple[int, int, int]:
        """What picks the arrays its program takes (`StateLayout.take`)."""
        return self.layers.start, self.layers.stop, self.shift


HEAD = Span("head", slice(0, 0), 0)  # the loss head reads no layer's arrays


class StateLayout:
    """A state's treedef, the module path of each of its arrays, and the views of it that span
    programs take: a span's layers, relabelled, and every array outside the layers. The shared
    `LoraContext` keeps its place and is in every view: it is no one layer's state."""

    def __init__(self, state: nnx.State, num_layers: int) -> None:
        self.treedef = jax.tree.structure(state)
        variables = jax.tree_util.tree_flatten_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )[0]
        self.paths = [tuple(key.key for key in path) for path, _ in variables]
        self._moves = [not isinstance(var, LoraBatch) for _, var in variables]
        self._num_layers = num_layers
        self._views: dict[tuple[int, int, int], tuple[list[int], list[int]]] = {}

    def in_layers(self, layers: slice) -> list[int]:
        """Indices of the arrays of layers ``layers``."""
        return [
            i
            for i, path in enumerate(self.paths)
            if path[0] == "layers" and layers.start <= path[1] < layers.stop
        ]

    def positions(self, span: Span) -> list[int]:
        """Where the arrays of ``span``'s view sit in a whole state's list, relabelled."""
        return self._view(span)[0]

    def take(self, leaves: Leaves, span: Span) -> Leaves:
        """``span``'s view of a whole state's ``leaves``: what its program takes. A program
        that took every array would pay for all of them at each dispatch (~0.7 ms for a
        1.1B model's, on the H100's host) though it reads a few layers'."""
        return [leaves[i] for i in self._view(span)[1]]

    def put(self, leaves: Leaves, view: Leaves, span: Span) -> Leaves:
        """``leaves`` with ``span``'s ``view`` written back in place of its arrays."""
        leaves = list(leaves)
        for i, array in zip(self._view(span)[1], view):
            leaves[i] = array
        return leaves

    def expand(self, view: Leaves, span: Span) -> Leaves:
        """A whole state's list, relabelled, from ``span``'s ``view``: None for the arrays
        outside it, which its program never reads."""
        leaves: Leaves = [None] * len(self.paths)
        for position, array in zip(self.positions(span), view):
            leaves[position] = array
        return leaves

    def _view(self, span: Span) -> tuple[list[int], list[int]]:
        """(positions in the relabelled list, indices in the state's own list) of the arrays of
        ``span``'s view. Relabelling presents layer i as layer (i - shift) % num_layers."""
        key = span.view_key
        if key not in self._views:
            index = {path: i for i, path in enumerate(self.paths)}
            positions, indices = [], []
            for i, (path, moves) in enumerate(zip(self.paths, self._moves)):
                if path[0] != "layers" or not moves:
                    positions.append(i)
                    indices.append(i)
                elif span.layers.start <= path[1] < span.layers.stop:
                    positions.append(i)
                    layer = (path[1] + span.shift) % self._num_layers
                    indices.append(index[("layers", layer, *path[2:])])
            self._views[key] = positions, indices
        return self._views[key]
