"""The compiled inference programs of an engine, over the shapes a step can take.

Owns a step's device side: the (rows, tokens per row, pages per row) buckets a step is padded
to; the host arrays, program key and device arguments of a step over a batch of sequences (or of
an all-padding one); and the registry of compiled programs with their costs (XLA's, else the
analytic one). A program compiles on first use, or at start-up (:meth:`StepPrograms.compile_all`)
for the sampler variants a plain request runs; :meth:`StepPrograms.largest_temp_bytes` sizes the
temporaries the arena must leave room for. The device state (model state, KV cache) stays with
the engine: calls here take it, and :meth:`StepPrograms.run_blank`, the one that runs a program,
returns the cache it donated into.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx

from harli_jax.engine.sampling import FULL, GREEDY, PLAIN, SamplerInputs, SamplerVariant
from harli_jax.engine.sequence import Sequence
from harli_jax.engine.steps import bucket, make_forward_step
from harli_jax.memory.kv_cache import SCRATCH_PAGE, KVCache, PagedBatch
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


class StepPrograms:
    """The packed forward step (:func:`~harli_jax.engine.steps.make_forward_step`) compiled per
    shape bucket and sampler variant: ``compiled`` and ``costs`` are keyed alike,
    ``forward/r{rows}/t{tokens}/p{pages}`` plus the variant's suffix."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        model_config: ModelConfig,
        config: EngineConfig,
        pages_per_seq: int,
        lora: bool,
    ):
        """``lora``: the model carries an adapter bank, so every step takes each row's slot."""
        self.forward = make_forward_step(graphdef, packed=True)
        self.compiled: dict[str, jax.stages.Compiled] = {}
        self.costs: dict[str, dict[str, float]] = {}
        self._model_config = model_config
        self._config = config
        self._pages_per_seq = pages_per_seq
        self._lora = lora

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
        state: nnx.State,
        cache: KVCache,
        pages: PageTable,
        seqs: list[Sequence],
        chunks: list[int],
        width: int,
    ) -> tuple[str, tuple, SamplerVariant]:
        """The program key (sampler variant included), device arguments and sampler variant of a
        step that processes the next ``chunks[i]`` (at most ``width``) uncached tokens of
        ``seqs[i]``.

        This host side is on every token's critical path (TPOT): the inputs are built with numpy
        over rows and handed to the compiled call as host arrays."""
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
        sampler = SamplerInputs.build(
            params, [s.seed for s in seqs], [len(s.output.token_ids) for s in seqs], rows
        )
        variant = SamplerVariant.of(params)
        adapter_slots = [s.adapter_slot for s in seqs]
        key, args = self._step_args(
            state, cache, tokens, positions, slots, table, last, sampler, adapter_slots
        )
        return key + variant.suffix, args, variant

    def _step_args(
        self,
        state: nnx.State,
        cache: KVCache,
        tokens: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        table: np.ndarray,
        last: np.ndarray,
        sampler: SamplerInputs,
        adapter_slots: list[int],
    ) -> tuple[str, tuple]:
        """The program key (without the sampler variant) and device arguments of one step from
        its host arrays."""
        rows, width = tokens.shape
        slot_ids = None
        if self._lora:
            slot_ids = np.zeros(rows, np.int32)
            slot_ids[: len(adapter_slots)] = adapter_slots
        # Host arrays go to the compiled call as they are: its C++ path transfers them all, which
        # measured 5x cheaper on the CPU than one jax.device_put of the tuple (or jnp.asarray each).
        args = (state, cache, tokens, positions, PagedBatch(slots, table), last, sampler)
        return f"forward/r{rows}/t{width}/p{table.shape[1]}", (*args, slot_ids)

    def _blank_args(self, state: nnx.State, cache: KVCache, shape: Shape) -> tuple[str, tuple]:
        """:meth:`_step_args` of a step of padding rows only."""
        blank = self._blank_inputs(*shape)
        sampler = SamplerInputs.build([], [], [], shape[0])
        return self._step_args(state, cache, *blank, sampler, [])

    def program(self, key: str, args: tuple, variant: SamplerVariant = FULL) -> jax.stages.Compiled:
        """The compiled program for ``key`` (compiled now if it is new) with sampler ``variant``
        (which ``key`` must name)."""
        if key not in self.compiled:
            self._add(key, args, self.forward.lower(*args, variant=variant).compile())
        return self.compiled[key]

    def _add(self, key: str, args: tuple, compiled: jax.stages.Compiled) -> None:
        """Keeps ``compiled`` under ``key`` with its cost (XLA's, else the analytic one)."""
        rows, width = args[2].shape
        context = args[4].page_table.shape[1] * self._config.page_size
        itemsize = args[1].k.dtype.itemsize
        fallback = forward_cost(self._model_config, rows, width, context, itemsize)
        self.compiled[key] = compiled
        self.costs[key] = compiled_cost(compiled, fallback)

    def compile_all(
        self,
        state: nnx.State,
        cache: KVCache,
        progress: Callable[[int, int], None],
        workers: int | None,
    ) -> None:
        """Compiles :data:`PRECOMPILED_VARIANTS` of every shape bucket (those not compiled yet).

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
                key, args = self._blank_args(state, cache, shape)
                for variant in PRECOMPILED_VARIANTS:
                    if key + variant.suffix in self.compiled:
                        continue
                    lowered = self.forward.lower(*args, variant=variant)
                    futures[pool.submit(lowered.compile)] = (index, key + variant.suffix, args)
                    left[index] += 1
            done = sum(count == 0 for count in left)
            if done:
                progress(done, len(shapes))
            for future in concurrent.futures.as_completed(futures):
                index, key, args = futures[future]
                self._add(key, args, future.result())
                left[index] -= 1
                if left[index] == 0:
                    done += 1
                    progress(done, len(shapes))

    def run_blank(
        self, state: nnx.State, cache: KVCache, shape: Shape, variant: SamplerVariant
    ) -> KVCache:
        """One step of padding rows (they write the scratch page only) through a compiled
        program; returns the cache it donated ``cache`` into."""
        key, args = self._blank_args(state, cache, shape)
        cache, packed = self.compiled[key + variant.suffix](*args)
        jax.block_until_ready(packed)
        return cache

    def largest_temp_bytes(self, state: nnx.State, cache: KVCache) -> int:
        """The temporaries of the largest decode program or of the largest prefill program,
        whichever needs more. They are compiled for this and not kept: ``cache`` may be shapes
        only (every program donates the cache, so its page count does not change them)."""
        shapes = self.shape_buckets()
        largest = {max(s for s in shapes if s[1] == width) for width in (1, shapes[-1][1])}
        return max(
            temp_bytes(self.forward.lower(*self._blank_args(state, cache, shape)[1]).compile())
            for shape in largest
        )
