"""The compiled inference programs of an engine, over the shapes a step can take.

Owns a step's device side: the (rows, tokens per row, pages per row) buckets a step is padded
to; the host arrays, program key and device arguments of a step over a batch of sequences (or of
an all-padding one); and the registry of compiled programs with their costs (XLA's, else the
analytic one). A program compiles on first use, or at start-up (:meth:`StepPrograms.compile_all`)
for the sampler variants a plain request runs; :meth:`StepPrograms.largest_temp_bytes` sizes the
temporaries the arena must leave room for. The device state (model state, KV cache) stays with
the engine: calls here take it, and those that run programs (:meth:`StepPrograms.run_blank`,
:meth:`StepPrograms.compile_all`) return the cache they donated it into.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np
from flax import nnx

from harli_jax.engine.sampling import (
    FULL,
    GREEDY,
    PLAIN,
    LogitBias,
    SamplerInputs,
    SamplerVariant,
)
from harli_jax.engine.sequence import Sequence
from harli_jax.engine.step_inputs import pack_inputs
from harli_jax.engine.steps import bucket, make_engine_step
from harli_jax.memory.kv_cache import SCRATCH_PAGE, KVCache
from harli_jax.memory.page_table import PageTable
from harli_jax.memory.sizing import temp_bytes
from harli_jax.models.config import ModelConfig
from harli_jax.sched.costs import compiled_cost, forward_cost

if TYPE_CHECKING:  # core builds a StepPrograms, so it can only be imported for annotations
    from harli_jax.engine.core import EngineConfig

# Compiled for every shape bucket at start-up: what a request without top-k/top-p or top
# logprobs runs (temperature sampling and greedy); other variants compile on first use.
PRECOMPILED_VARIANTS = (PLAIN, GREEDY)

Shape = tuple[int, int, int]  # (rows, tokens per row, pages per row)
Weights = tuple[jax.Array, ...]  # the model state's arrays (steps.state_arrays)


class Step(NamedTuple):
    """One step as the device runs it: its program's key (sampler variant included), shape
    bucket and sampler variant, and the compiled program's arguments (weights, cache, inputs)."""

    key: str
    shape: Shape
    variant: SamplerVariant
    args: tuple


def _step(
    weights: Weights, cache: KVCache, inputs: np.ndarray, shape: Shape, variant: SamplerVariant
) -> Step:
    rows, width, pages = shape
    key = f"forward/r{rows}/t{width}/p{pages}{variant.suffix}"
    return Step(key, shape, variant, (weights, cache, inputs))


class StepPrograms:
    """The engine's step (:func:`~harli_jax.engine.steps.make_engine_step`) compiled per shape
    bucket and sampler variant: ``compiled`` and ``costs`` are keyed alike,
    ``forward/r{rows}/t{tokens}/p{pages}`` plus the variant's suffix."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        state_def: jax.tree_util.PyTreeDef,
        model_config: ModelConfig,
        config: EngineConfig,
        pages_per_seq: int,
        lora: bool,
    ):
        """``state_def``: the structure of the model state whose arrays (``weights``,
        :func:`~harli_jax.engine.steps.state_arrays`) every call here takes; ``lora``: the model
        carries an adapter bank, so every step takes each row's slot."""
        self.forward = make_engine_step(graphdef, state_def, lora)
        self.compiled: dict[str, jax.stages.Compiled] = {}
        self.costs: dict[str, dict[str, float]] = {}
        self._model_config = model_config
        self._config = config
        self._pages_per_seq = pages_per_seq

    def _page_bucket(self, pages: int) -> int:
        """The page-table width a row reaching ``pages`` pages is padded to."""
        return min(bucket(pages), self._pages_per_seq)

    def shape_buckets(self) -> list[Shape]:
        """Every shape a step can run: decode, then prefill."""
        config = self._config
        pages = sorted({self._page_bucket(n) for n in range(1, self._pages_per_seq + 1)})
        decode_rows = sorted({bucket(n) for n in range(1, config.max_num_seqs + 1)})
        prefill_rows = sorted({bucket(n) for n in range(1, config.prefill_rows + 1)})
        return [(r, 1, p) for r in decode_rows for p in pages] + [
            (r, config.prefill_chunk, p) for r in prefill_rows for p in pages
        ]

    def _blank_inputs(self, rows: int, width: int, pages: int) -> tuple[np.ndarray, ...]:
        """Host arrays of one step, every row padding: tokens, positions, slots, table, last."""
        return (
            np.zeros((rows, width), np.int32),
            np.zeros((rows, width), np.int32),
            np.full((rows, width), SCRATCH_PAGE * self._config.page_size, np.int32),
            np.full((rows, pages), SCRATCH_PAGE, np.int32),
            np.zeros(rows, np.int32),
        )

    def step_inputs(
        self,
        weights: Weights,
        cache: KVCache,
        pages: PageTable,
        seqs: list[Sequence],
        chunks: list[int],
        width: int,
    ) -> Step:
        """The step that processes the next ``chunks[i]`` (at most ``width``) uncached tokens of
        ``seqs[i]``.

        This host side is on every token's critical path (TPOT): the inputs are built with numpy
        over rows and packed into one array for the compiled call."""
        n, page_size = len(seqs), self._config.page_size
        starts = np.fromiter((s.num_cached for s in seqs), np.int32, n)
        sizes = np.array(chunks, np.int32)
        needed = (starts + sizes + page_size - 1) // page_size  # pages each row reaches
        rows = bucket(n)
        tokens, positions, slots, table, last = self._blank_inputs(
            rows, width, self._page_bucket(int(needed.max()))
        )
        page_rows = [
            s.table_row(pages, self._pages_per_seq, need) for s, need in zip(seqs, needed.tolist())
        ]
        table[:n] = np.stack(page_rows)[:, : table.shape[1]]
        for row, (seq, chunk) in enumerate(zip(seqs, chunks)):
            tokens[row, :chunk] = seq.token_slice(seq.num_cached, seq.num_cached + chunk)
        offsets = np.arange(width, dtype=np.int32)
        real = offsets < sizes[:, None]  # [n, width]: the row's tokens, not padding
        pos = starts[:, None] + offsets
        positions[:n] = np.where(real, pos, 0)
        # Padding positions may lie past the row's pages: clamp, then send them to scratch.
        page = np.take_along_axis(table[:n], np.minimum(pos // page_size, table.shape[1] - 1), 1)
        slots[:n] = np.where(real, page * page_size + pos % page_size, slots[:n])
        last[:n] = sizes - 1
        params = [s.params for s in seqs]
        generated = [len(s.output.token_ids) for s in seqs]
        sampler = SamplerInputs.build(params, [s.seed for s in seqs], generated, rows)
        biases = [s.output.logit_bias() for s in seqs]
        variant = SamplerVariant.of(params, max(map(len, biases)))
        bias = LogitBias.build(biases, rows, variant.bias_window) if variant.bias_window else None
        adapter_slots = np.zeros(rows, np.int32)
        adapter_slots[:n] = [s.adapter_slot for s in seqs]
        inputs = pack_inputs(tokens, positions, slots, table, last, sampler, adapter_slots, bias)
        shape = (rows, width, table.shape[1])
        return _step(weights, cache, inputs, shape, variant)

    def _blank_step(
        self, weights: Weights, cache: KVCache, shape: Shape, variant: SamplerVariant
    ) -> Step:
        """A step of ``shape`` whose rows are all padding (they write the scratch page only)."""
        rows = shape[0]
        sampler = SamplerInputs.build([], [], [], rows)
        inputs = pack_inputs(*self._blank_inputs(*shape), sampler, np.zeros(rows, np.int32))
        return _step(weights, cache, inputs, shape, variant)

    def _lower(self, step: Step) -> jax.stages.Lowered:
        return self.forward.lower(*step.args, width=step.shape[1], variant=step.variant)

    def program(self, step: Step) -> jax.stages.Compiled:
        """The compiled program of ``step`` (compiled now if it is new)."""
        if step.key not in self.compiled:
            self._add(step, self._lower(step).compile())
        return self.compiled[step.key]

    def _add(self, step: Step, compiled: jax.stages.Compiled) -> None:
        """Keeps ``compiled`` under ``step.key`` with its cost (XLA's, else the analytic one)."""
        rows, width, pages = step.shape
        itemsize = step.args[1].k.dtype.itemsize
        context = pages * self._config.page_size
        fallback = forward_cost(self._model_config, rows, width, context, itemsize)
        self.compiled[step.key] = compiled
        self.costs[step.key] = compiled_cost(compiled, fallback)

    def compile_all(
        self,
        weights: Weights,
        cache: KVCache,
        progress: Callable[[int, int], None],
        workers: int | None,
    ) -> KVCache:
        """Compiles :data:`PRECOMPILED_VARIANTS` of every shape bucket (those not compiled yet)
        and runs each once; returns the cache the runs donated ``cache`` into.

        ``progress(done, total)`` counts shape buckets, on the calling thread. Tracing and
        lowering are Python and run here; XLA's compilation releases the GIL, so the programs
        compile in ``workers`` threads (default: one per CPU core; 1 compiles serially).
        """
        shapes = self.shape_buckets()
        workers = workers or os.cpu_count() or 1
        left = [0] * len(shapes)  # programs of each bucket still compiling
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {}
            for index, shape in enumerate(shapes):
                for variant in PRECOMPILED_VARIANTS:
                    step = self._blank_step(weights, cache, shape, variant)
                    if step.key in self.compiled:
                        continue
                    futures[pool.submit(self._lower(step).compile)] = (index, step)
                    left[index] += 1
            done = sum(count == 0 for count in left)
            if done:
                progress(done, len(shapes))
            for future in concurrent.futures.as_completed(futures):
                index, step = futures[future]
                self._add(step, future.result())
                left[index] -= 1
                if left[index] == 0:
                    done += 1
                    progress(done, len(shapes))
        # A program's first run loads its kernels (on the H100, 20-80 ms more than its later
        # runs): that belongs here, not on the TPOT of the first request to reach its bucket.
        for shape in shapes:
            for variant in PRECOMPILED_VARIANTS:
                cache = self.run_blank(weights, cache, shape, variant)
        return cache

    def run_blank(
        self, weights: Weights, cache: KVCache, shape: Shape, variant: SamplerVariant
    ) -> KVCache:
        """One step of padding rows through a compiled program; returns the cache it donated
        ``cache`` into."""
        step = self._blank_step(weights, cache, shape, variant)
        cache, packed = self.compiled[step.key](*step.args)
        jax.block_until_ready(packed)
        return cache

    def largest_temp_bytes(self, weights: Weights, cache: KVCache) -> int:
        """The temporaries of the largest decode program or of the largest prefill program,
        whichever needs more. They are compiled for this and not kept: ``cache`` may be shapes
        only (every program donates the cache, so its page count does not change them)."""
        shapes = self.shape_buckets()
        largest = {max(s for s in shapes if s[1] == width) for width in (1, shapes[-1][1])}
        return max(
            temp_bytes(self._lower(self._blank_step(weights, cache, shape, FULL)).compile())
            for shape in largest
        )
