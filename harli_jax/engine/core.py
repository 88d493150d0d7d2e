"""The inference core: continuous batching with chunked prefill over the paged KV cache.

Owns the running set of sequences and the device state they touch (model state, KV cache). One
:meth:`EngineCore.step` admits waiting requests, runs one prefill chunk batch and one decode batch,
samples, and returns what each request gained. A sequence is ``tokens = prompt + output`` of which
the first ``num_cached`` are in the cache; every step processes uncached tokens and, once a
sequence is fully cached, samples its next token. Recompute-preemption (vLLM's) falls out of the
same rule: a preempted sequence simply has ``num_cached = 0``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import os
import time
from collections import deque
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from harli_jax.engine.adapters import AdapterBank
from harli_jax.engine.output import OutputBuilder, RequestOutput
from harli_jax.engine.sampling import (
    FULL,
    GREEDY,
    PLAIN,
    SamplerInputs,
    SamplerVariant,
    SamplingParams,
    unpack,
)
from harli_jax.engine.steps import bucket, make_forward_step
from harli_jax.memory.arena import Arena
from harli_jax.memory.kv_cache import SCRATCH_PAGE, KVCache, PagedBatch
from harli_jax.memory.page_table import Owner, PageTable
from harli_jax.memory.sizing import arena_pages, check_memory_fraction, temp_bytes
from harli_jax.sched.costs import StepReport, compiled_cost, forward_cost

# Compiled for every shape bucket at start-up: what a request without top-k/top-p or top
# logprobs runs (temperature sampling and greedy); other variants compile on first use.
PRECOMPILED_VARIANTS = (PLAIN, GREEDY)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32  # the largest decode batch
    page_size: int = 16
    num_pages: int | None = None  # default: every sequence at max_model_len, twice
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    prefill_chunk: int = 256  # the longest prompt piece one sequence prefills per step
    max_prefill_tokens: int = 1024  # rows x chunk of one prefill batch
    max_loras: int = 0  # adapters servable at once (0: no LoRA bank, the plain base model)
    max_lora_rank: int = 16
    # The share of device memory for weights + programs + arena (vLLM's gpu_memory_utilization);
    # sizes the arena when num_pages is not given (None: the num_pages default).
    memory_fraction: float | None = None
    reserve_bytes: int = 0  # other programs' temporaries to leave room for (fine-tune micro-steps)

    def __post_init__(self):
        check_memory_fraction(self.memory_fraction)


@dataclasses.dataclass(eq=False)  # identity: `in` and `remove` on the running list stay cheap
class _Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output: OutputBuilder
    seed: int
    adapter_slot: int = 0
    num_cached: int = 0
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: bool = False
    # The lease's pages as a step's page-table row, grown in place (see EngineCore._page_row).
    page_row: np.ndarray | None = None
    pages_known: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_token_ids + self.output.token_ids

    @property
    def pending(self) -> int:
        return len(self.prompt_token_ids) + len(self.output.token_ids) - self.num_cached

    def token_slice(self, start: int, stop: int) -> list[int]:
        """``tokens[start:stop]`` without building ``tokens`` (a list as long as the context)."""
        prompt = self.prompt_token_ids
        if stop <= len(prompt):
            return prompt[start:stop]
        return (
            prompt[start:stop]
            + self.output.token_ids[max(0, start - len(prompt)) : stop - len(prompt)]
        )


class EngineCore:
    """Inference over one model on one device (or one mesh)."""

    def __init__(
        self,
        model: nnx.Module,
        tokenizer=None,
        config: EngineConfig = EngineConfig(),
        cache_sharding: jax.sharding.Sharding | None = None,
    ):
        """``cache_sharding`` places the KV cache (on a mesh, beside a model sharded to match)."""
        mc = model.config
        self.model_config = mc
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.config = config
        self.pages_per_seq = math.ceil(self.max_model_len / config.page_size)
        self.base_model = model  # without the serving LoRA bank: what fine-tune jobs build on
        self.adapters = None
        if config.max_loras:
            self.adapters = AdapterBank(config.max_loras, config.max_lora_rank)
            model = self.adapters.inject(model)
        self.graphdef, self.state = nnx.split(model)
        dtype = model.embed_tokens[...].dtype
        self._forward = make_forward_step(self.graphdef, packed=True)
        num_pages = config.num_pages
        if num_pages is None and config.memory_fraction is not None:
            num_pages = self._pages_from_memory(dtype, cache_sharding)
        # Without a memory size to go by, room for every sequence's full context and as much
        # again for fine-tune state (which yields it to decode under pressure).
        num_pages = num_pages or 2 * config.max_num_seqs * self.pages_per_seq + 1
        # One buffer for KV pages and fine-tune state; page 0 is the scratch page.
        shape = (mc.num_layers, num_pages, config.page_size, mc.num_kv_heads, mc.head_dim)
        try:
            self.arena = Arena(KVCache.zeros(*shape, dtype, sharding=cache_sharding))
        except jax.errors.JaxRuntimeError as error:
            size = 2 * math.prod(shape) * jnp.dtype(dtype).itemsize / 2**30
            raise MemoryError(
                f"the arena ({num_pages} pages, {size:.1f} GiB) does not fit in device memory: "
                f"lower --memory-fraction, or num_pages ({error})"
            ) from error
        self._programs: dict[str, jax.stages.Compiled] = {}
        self.program_costs: dict[str, dict[str, float]] = {}
        self.last_report: StepReport | None = None
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._ids = itertools.count()
        self._queue_waits: list[float] = []
        self.eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else ()

    @property
    def cache(self) -> KVCache:
        """The arena's latest buffer (the KV cache); programs donate it and return the next."""
        return self.arena.buffer

    @cache.setter
    def cache(self, buffer: KVCache) -> None:
        self.arena.buffer = buffer

    @property
    def pages(self) -> PageTable:
        return self.arena.pages

    def _pages_from_memory(self, dtype, sharding) -> int | None:
        """Arena pages from the device's memory (None where it does not report it): the largest
        decode and prefill programs are compiled against a nominal arena for their temporaries."""
        mc, page_size = self.model_config, self.config.page_size
        shape = (mc.num_layers, self.pages_per_seq + 1, page_size, mc.num_kv_heads, mc.head_dim)
        spec = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        self.arena = Arena(KVCache(spec, spec))  # shapes only, for lowering
        buckets = self.shape_buckets()
        largest = {max(b for b in buckets if b[1] == width) for width in (1, buckets[-1][1])}
        temporaries = 0
        for rows, width, pages in largest:
            blank = self._blank_inputs(rows, width, pages)
            _, args = self._step_args(*blank, SamplerInputs.build([], [], [], rows), [])
            temporaries = max(temporaries, temp_bytes(self._forward.lower(*args).compile()))
        page_bytes = 2 * math.prod(shape[:1] + shape[2:]) * jnp.dtype(dtype).itemsize
        reserve = temporaries + self.config.reserve_bytes
        num_pages = arena_pages(self.config.memory_fraction, page_bytes, reserve)
        if num_pages is not None and num_pages < 2:
            raise ValueError(
                f"--memory-fraction {self.config.memory_fraction} leaves no room for the arena "
                "once weights and program temporaries are counted"
            )
        return num_pages

    # -- requests ---------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a request that can never run here."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                f"{self.max_model_len}, and at least one token must be generated"
            )
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        self.adapter_slot(params.adapter)

    def adapter_slot(self, name: str | None) -> int:
        """The bank slot serving adapter ``name``; ValueError if it is not loaded."""
        if name is None:
            return 0
        if self.adapters is None:
            raise ValueError(f"adapter {name!r} requested, but this engine serves no adapters")
        try:
            return self.adapters.slot(name)
        except KeyError as err:
            raise ValueError(err.args[0]) from None

    def load_adapter(self, name: str, weights, config) -> None:
        """Serves adapter ``name`` from the next step on (replacing one of that name)."""
        if self.adapters is None:
            raise ValueError("this engine was built with max_loras=0: it serves no adapters")
        model = nnx.merge(self.graphdef, self.state)
        self.adapters.load(model, name, weights, config)
        _, self.state = nnx.split(model)

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Queues a request; raises ValueError for one that can never fit."""
        self.validate(prompt_token_ids, params)
        request_id = request_id or self.new_request_id()
        seed = params.seed if params.seed is not None else np.random.randint(0, 2**31)
        output = OutputBuilder(self.tokenizer, params, self.eos_token_ids)
        slot = self.adapter_slot(params.adapter)
        self._waiting.append(
            _Sequence(request_id, list(prompt_token_ids), params, output, seed, slot)
        )
        return request_id

    def abort(self, request_id: str) -> None:
        """Drops a request and frees its pages at once (a client went away)."""
        self._waiting = deque(s for s in self._waiting if s.request_id != request_id)
        for seq in [s for s in self._running if s.request_id == request_id]:
            self._running.remove(seq)
            self._release(seq)

    def drain_queue_waits(self) -> list[float]:
        """Arrival-to-admission seconds of the requests admitted since the last call."""
        waits, self._queue_waits = self._queue_waits, []
        return waits

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def will_prefill(self) -> bool:
        """Whether the next `step` runs a prefill chunk (a request waits or is mid-prompt)."""
        return bool(self._waiting) or any(seq.pending > 1 for seq in self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One prefill batch and one decode batch; returns the requests that gained tokens.

        Leaves ``last_report``: the programs it ran, their summed cost and its wall time.
        """
        start = time.perf_counter()
        self._admit()
        outputs, keys = [], []
        prefill = [s for s in self._running if s.pending > 1]
        prefill_tokens = 0
        if prefill:
            batch = self._prefill_batch(prefill)
            prefill_tokens = sum(min(s.pending, self.config.prefill_chunk) for s in batch)
            outputs += self._run(batch, self.config.prefill_chunk, keys)
        decode = [s for s in self._running if s.pending == 1]
        decode = self._reserve_decode_pages(decode)
        if decode:
            outputs += self._run(decode, 1, keys)
        self.last_report = None
        if keys:
            costs = [self.program_costs[k] for k in keys]
            end = time.perf_counter()
            self.last_report = StepReport(
                key="+".join(keys),
                cost={name: sum(c[name] for c in costs) for name in costs[0]},
                features={"rows": float(len(decode)), "prefill_tokens": float(prefill_tokens)},
                seconds=end - start,
                ended_at=end,
            )
        return outputs

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            seq = self._waiting[0]
            first_chunk = min(seq.pending, self.config.prefill_chunk)
            if not self._ensure_pages(seq, first_chunk):
                break
            self._running.append(self._waiting.popleft())
            if not seq.admitted:  # re-admission after preemption is not queueing
                seq.admitted = True
                self._queue_waits.append(time.perf_counter() - seq.arrival)

    @property
    def _prefill_rows(self) -> int:
        return max(1, self.config.max_prefill_tokens // self.config.prefill_chunk)

    def _prefill_batch(self, candidates: list[_Sequence]) -> list[_Sequence]:
        chosen = []
        for seq in candidates[: self._prefill_rows]:
            if self._ensure_pages(seq, min(seq.pending, self.config.prefill_chunk)):
                chosen.append(seq)
        return chosen

    def _reserve_decode_pages(self, decode: list[_Sequence]) -> list[_Sequence]:
        """Gives each decoding sequence room for one token, preempting the youngest if needed."""
        ready = []
        for seq in decode:
            if seq not in self._running:  # preempted for an earlier sequence of this batch
                continue
            while not self._ensure_pages(seq, 1):
                victim = self._running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
                if victim in ready:
                    ready.remove(victim)
            else:
                ready.append(seq)
        return ready

    def _ensure_pages(self, seq: _Sequence, new_tokens: int) -> bool:
        owner = Owner("kv", seq.request_id)
        have = len(self.pages.pages(owner)) if owner in self.pages else 0
        need = math.ceil((seq.num_cached + new_tokens) / self.config.page_size) - have
        if need <= 0:
            return True
        # Fine-tune leases in the way yield first (arena.on_pressure): never refuse for them.
        return self.arena.lease(owner, need)

    def _preempt(self, seq: _Sequence) -> None:
        self._running.remove(seq)
        self._release(seq)
        seq.num_cached = 0
        self._waiting.appendleft(seq)

    def _release(self, seq: _Sequence) -> None:
        owner = Owner("kv", seq.request_id)
        if owner in self.pages:
            self.pages.free(owner)

    def _run(self, seqs: list[_Sequence], max_chunk: int, keys: list[str]) -> list[RequestOutput]:
        """Processes up to ``max_chunk`` uncached tokens of each sequence in one device call;
        appends the program's key to ``keys``.

        This host side is on every token's critical path (TPOT): the inputs are built with numpy
        over rows and handed to the compiled call as host arrays, and only what the sampler
        variant produced comes back, as one array."""
        n, page_size = len(seqs), self.config.page_size
        starts = np.fromiter((s.num_cached for s in seqs), np.int32, n)
        chunks = np.minimum(np.fromiter((s.pending for s in seqs), np.int32, n), max_chunk)
        needed = (starts + chunks + page_size - 1) // page_size  # pages each row reaches
        rows, width = bucket(n), max_chunk
        tokens, positions, slots, table, last = self._blank_inputs(
            rows, width, self._page_bucket(int(needed.max()))
        )
        page_rows = [self._page_row(s, need) for s, need in zip(seqs, needed.tolist())]
        table[:n] = np.stack(page_rows)[:, : table.shape[1]]
        for row, (seq, chunk) in enumerate(zip(seqs, chunks.tolist())):
            tokens[row, :chunk] = seq.token_slice(seq.num_cached, seq.num_cached + chunk)
        offsets = np.arange(width, dtype=np.int32)
        real = offsets < chunks[:, None]  # [n, width]: the row's tokens, not padding
        pos = starts[:, None] + offsets
        positions[:n] = np.where(real, pos, 0)
        # Padding positions may lie past the row's pages: clamp, then send them to scratch.
        page = np.take_along_axis(table[:n], np.minimum(pos // page_size, table.shape[1] - 1), 1)
        slots[:n] = np.where(real, page * page_size + pos % page_size, slots[:n])
        last[:n] = chunks - 1
        params = [s.params for s in seqs]
        sampler = SamplerInputs.build(
            params, [s.seed for s in seqs], [len(s.output.token_ids) for s in seqs], rows
        )
        variant = SamplerVariant.of(params)
        key, args = self._step_args(
            tokens, positions, slots, table, last, sampler, [s.adapter_slot for s in seqs]
        )
        key += variant.suffix
        keys.append(key)
        self.cache, packed = self._program(key, args, variant)(*args)
        # The program packs what its variant computed into one array: one device-to-host copy.
        sampled = unpack(np.asarray(packed), variant)
        new_tokens, logprobs = sampled.tokens.tolist(), sampled.logprobs.tolist()
        top_ids = top_logprobs = None
        if sampled.top_ids is not None:
            top_ids, top_logprobs = sampled.top_ids.tolist(), sampled.top_logprobs.tolist()
        outputs = []
        for row, (seq, chunk) in enumerate(zip(seqs, chunks.tolist())):
            seq.num_cached += chunk
            if seq.pending == 0:
                n_top = seq.params.logprobs or 0
                top = {}
                if n_top and top_ids is not None:
                    top = dict(zip(top_ids[row][:n_top], top_logprobs[row][:n_top]))
                outputs.append(self._emit(seq, new_tokens[row], logprobs[row], top))
        return outputs

    def _page_row(self, seq: _Sequence, need: int) -> np.ndarray:
        """``seq``'s pages, scratch-padded to ``pages_per_seq``, holding at least ``need`` pages.

        The row is kept on the sequence and only the pages leased since the last step are copied
        in: a KV lease only grows until it is released (finish, abort, preemption), and a released
        sequence starts again from ``num_cached == 0``, where the row is rebuilt."""
        if seq.page_row is None or seq.num_cached == 0:
            seq.page_row = np.full(self.pages_per_seq, SCRATCH_PAGE, np.int32)
            seq.pages_known = 0
        if seq.pages_known < need:
            pages = self.pages.pages(Owner("kv", seq.request_id))
            seq.page_row[seq.pages_known : len(pages)] = pages[seq.pages_known :]
            seq.pages_known = len(pages)
        return seq.page_row

    def _page_bucket(self, pages: int) -> int:
        return min(bucket(pages), self.pages_per_seq)

    def _blank_inputs(self, rows: int, width: int, pages: int) -> tuple[np.ndarray, ...]:
        """Host arrays of one step, every row padding: tokens, positions, slots, table, last."""
        return (
            np.zeros((rows, width), np.int32),
            np.zeros((rows, width), np.int32),
            np.full((rows, width), SCRATCH_PAGE * self.config.page_size, np.int32),
            np.full((rows, pages), SCRATCH_PAGE, np.int32),
            np.zeros(rows, np.int32),
        )

    def shape_buckets(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens per row, pages per row) a step can run: decode, then prefill.
        :meth:`compile_all` compiles :data:`PRECOMPILED_VARIANTS` of each."""
        pages = sorted({self._page_bucket(n) for n in range(1, self.pages_per_seq + 1)})
        decode_rows = sorted({bucket(n) for n in range(1, self.config.max_num_seqs + 1)})
        prefill_rows = sorted({bucket(n) for n in range(1, self._prefill_rows + 1)})
        return [(r, 1, p) for r in decode_rows for p in pages] + [
            (r, self.config.prefill_chunk, p) for r in prefill_rows for p in pages
        ]

    def compile_all(
        self,
        progress: Callable[[int, int], None] = lambda done, total: None,
        workers: int | None = None,
    ) -> float:
        """Compiles, for every shape bucket, the sampler variants a plain request runs
        (:data:`PRECOMPILED_VARIANTS`; others compile on first use), and runs each once; returns
        the seconds it took.

        ``progress(done, total)`` counts shape buckets, on the calling thread. Tracing and
        lowering are Python and run here; XLA's compilation releases the GIL, so the programs
        compile in ``workers`` threads (default: one per CPU core; 1 compiles serially).
        """
        start, shapes = time.perf_counter(), self.shape_buckets()
        workers = workers or os.cpu_count() or 1
        left = [0] * len(shapes)  # programs of each bucket still compiling
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {}
            for index, (rows, width, pages) in enumerate(shapes):
                blank = self._blank_inputs(rows, width, pages)
                key, args = self._step_args(*blank, SamplerInputs.build([], [], [], rows), [])
                for variant in PRECOMPILED_VARIANTS:
                    if key + variant.suffix in self._programs:
                        continue
                    lowered = self._forward.lower(*args, variant=variant)
                    futures[pool.submit(lowered.compile)] = (index, key + variant.suffix, args)
                    left[index] += 1
            done = sum(count == 0 for count in left)
            if done:
                progress(done, len(shapes))
            for future in concurrent.futures.as_completed(futures):
                index, key, args = futures[future]
                self._add_program(key, args, future.result())
                left[index] -= 1
                if left[index] == 0:
                    done += 1
                    progress(done, len(shapes))
        # A program's first run loads its kernels (on the H100, 20-80 ms more than its later
        # runs): that belongs here, not on the TPOT of the first request to reach its bucket.
        for rows, width, pages in shapes:
            for variant in PRECOMPILED_VARIANTS:
                self._run_blank(rows, width, pages, variant)
        return time.perf_counter() - start

    def _run_blank(self, rows: int, width: int, pages: int, variant: SamplerVariant) -> None:
        """One step of padding rows (they write the scratch page only) through a compiled
        program."""
        blank = self._blank_inputs(rows, width, pages)
        key, args = self._step_args(*blank, SamplerInputs.build([], [], [], rows), [])
        self.cache, packed = self._programs[key + variant.suffix](*args)
        jax.block_until_ready(packed)

    def _step_args(self, tokens, positions, slots, table, last, sampler, adapter_slots):
        """The program key (without the sampler variant) and device arguments of one step from
        its host arrays."""
        rows, width = tokens.shape
        slot_ids = None
        if self.adapters is not None:
            slot_ids = np.zeros(rows, np.int32)
            slot_ids[: len(adapter_slots)] = adapter_slots
        # Host arrays go to the compiled call as they are: its C++ path transfers them all, which
        # measured 5x cheaper on the CPU than one jax.device_put of the tuple (or jnp.asarray each).
        args = (self.state, self.cache, tokens, positions, PagedBatch(slots, table), last, sampler)
        return f"forward/r{rows}/t{width}/p{table.shape[1]}", (*args, slot_ids)

    def _program(
        self, key: str, args: tuple, variant: SamplerVariant = FULL
    ) -> jax.stages.Compiled:
        """The compiled program for ``key`` (compiled now if it is new) with sampler ``variant``
        (which ``key`` must name)."""
        if key not in self._programs:
            self._add_program(key, args, self._forward.lower(*args, variant=variant).compile())
        return self._programs[key]

    def _add_program(self, key: str, args: tuple, compiled: jax.stages.Compiled) -> None:
        """Keeps ``compiled`` under ``key`` with its cost (XLA's, else the analytic one)."""
        rows, width = args[2].shape
        context = args[4].page_table.shape[1] * self.config.page_size
        fallback = forward_cost(
            self.model_config, rows, width, context, self.cache.k.dtype.itemsize
        )
        self._programs[key] = compiled
        self.program_costs[key] = compiled_cost(compiled, fallback)

    def _emit(
        self, seq: _Sequence, token: int, logprob: float, top: dict[int, float]
    ) -> RequestOutput:
        at_limit = len(seq.prompt_token_ids) + len(seq.output.token_ids) + 1 >= self.max_model_len
        delta, finish = seq.output.append(token, logprob, top, at_limit)
        if finish is not None:
            self._running.remove(seq)
            self._release(seq)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output.token_ids,
            text=seq.output.text,
            new_token_ids=[token],
            text_delta=delta,
            logprobs=seq.output.logprobs,
            finish_reason=finish,
        )
