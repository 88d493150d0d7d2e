"""The inference core: continuous batching with chunked prefill over the paged KV cache.

Owns the running set of sequences and the device state they touch (model state, KV cache). One
:meth:`EngineCore.step` admits waiting requests, runs one prefill chunk batch and one decode batch,
samples, and returns what each request gained. A sequence is ``tokens = prompt + output`` of which
the first ``num_cached`` are in the cache; every step processes uncached tokens and, once a
sequence is fully cached, samples its next token. Recompute-preemption (vLLM's) falls out of the
same rule: a preempted sequence simply has ``num_cached = 0``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from harli_jax.engine.adapters import AdapterBank
from harli_jax.engine.output import OutputBuilder, RequestOutput
from harli_jax.engine.sampling import SamplerInputs, SamplingParams, needs_restriction
from harli_jax.engine.steps import bucket, make_forward_step
from harli_jax.memory.kv_cache import SCRATCH_PAGE, KVCache, PagedBatch
from harli_jax.memory.page_table import OutOfPages, Owner, PageTable
from harli_jax.sched.costs import StepReport, compiled_cost, forward_cost


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32  # the largest decode batch
    page_size: int = 16
    num_pages: int | None = None  # default: every sequence can reach max_model_len
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    prefill_chunk: int = 256  # the longest prompt piece one sequence prefills per step
    max_prefill_tokens: int = 1024  # rows x chunk of one prefill batch
    max_loras: int = 0  # adapters servable at once (0: no LoRA bank, the plain base model)
    max_lora_rank: int = 16


@dataclasses.dataclass
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

    @property
    def tokens(self) -> list[int]:
        return self.prompt_token_ids + self.output.token_ids

    @property
    def pending(self) -> int:
        return len(self.prompt_token_ids) + len(self.output.token_ids) - self.num_cached


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
        num_pages = config.num_pages or config.max_num_seqs * self.pages_per_seq + 1
        self.base_model = model  # without the serving LoRA bank: what fine-tune jobs build on
        self.adapters = None
        if config.max_loras:
            self.adapters = AdapterBank(config.max_loras, config.max_lora_rank)
            model = self.adapters.inject(model)
        self.graphdef, self.state = nnx.split(model)
        dtype = model.embed_tokens[...].dtype
        self.cache = KVCache.zeros(
            mc.num_layers,
            num_pages,
            config.page_size,
            mc.num_kv_heads,
            mc.head_dim,
            dtype,
            sharding=cache_sharding,
        )
        self.pages = PageTable(num_pages, reserved=SCRATCH_PAGE + 1)
        self._forward = make_forward_step(self.graphdef)
        self._programs: dict[str, jax.stages.Compiled] = {}
        self.program_costs: dict[str, dict[str, float]] = {}
        self.last_report: StepReport | None = None
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._ids = itertools.count()
        self._queue_waits: list[float] = []
        self.eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else ()

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
            self.last_report = StepReport(
                key="+".join(keys),
                cost={name: sum(c[name] for c in costs) for name in costs[0]},
                features={"rows": float(len(decode)), "prefill_tokens": float(prefill_tokens)},
                seconds=time.perf_counter() - start,
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
        try:
            self.pages.allocate(owner, need)
        except OutOfPages:
            return False
        return True

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
        appends the program's key to ``keys``."""
        chunks = [min(s.pending, max_chunk) for s in seqs]
        page_rows = [self.pages.pages(Owner("kv", s.request_id)) for s in seqs]
        rows, width = bucket(len(seqs)), max_chunk
        tokens, positions, slots, table, last = self._blank_inputs(
            rows, width, self._page_bucket(max(len(p) for p in page_rows))
        )
        for row, (seq, chunk, pages) in enumerate(zip(seqs, chunks, page_rows)):
            start = seq.num_cached
            pos = np.arange(start, start + chunk)
            tokens[row, :chunk] = seq.tokens[start : start + chunk]
            positions[row, :chunk] = pos
            slots[row, :chunk] = (
                np.asarray(pages)[pos // self.config.page_size] * (self.config.page_size)
                + pos % self.config.page_size
            )
            table[row, : len(pages)] = pages
            last[row] = chunk - 1
        sampler = SamplerInputs.build(
            [s.params for s in seqs],
            [s.seed for s in seqs],
            [len(s.output.token_ids) for s in seqs],
            rows,
        )
        restrict = needs_restriction([s.params for s in seqs])
        key, args = self._step_args(
            tokens, positions, slots, table, last, sampler, [s.adapter_slot for s in seqs]
        )
        key += "/topkp" if restrict else ""
        keys.append(key)
        self.cache, sampled = self._program(key, args, restrict)(*args)
        sampled = [np.asarray(x) for x in sampled]
        outputs = []
        for row, (seq, chunk) in enumerate(zip(seqs, chunks)):
            seq.num_cached += chunk
            if seq.pending == 0:
                outputs.append(self._emit(seq, *(x[row] for x in sampled)))
        return outputs

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
        """Every (rows, tokens per row, pages per row) a step can run: decode, then prefill."""
        pages = sorted({self._page_bucket(n) for n in range(1, self.pages_per_seq + 1)})
        decode_rows = sorted({bucket(n) for n in range(1, self.config.max_num_seqs + 1)})
        prefill_rows = sorted({bucket(n) for n in range(1, self._prefill_rows + 1)})
        return [(r, 1, p) for r in decode_rows for p in pages] + [
            (r, self.config.prefill_chunk, p) for r in prefill_rows for p in pages
        ]

    def compile_all(self, progress=lambda done, total: None) -> float:
        """Compiles every program :meth:`shape_buckets` names; returns the seconds it took."""
        start, shapes = time.perf_counter(), self.shape_buckets()
        for done, (rows, width, pages) in enumerate(shapes):
            blank = self._blank_inputs(rows, width, pages)
            key, args = self._step_args(*blank, SamplerInputs.build([], [], [], rows), [])
            self._program(key, args)
            progress(done + 1, len(shapes))
        return time.perf_counter() - start

    def _step_args(self, tokens, positions, slots, table, last, sampler, adapter_slots):
        """The program key and device arguments of one step from its host arrays."""
        rows, width = tokens.shape
        slot_ids = None
        if self.adapters is not None:
            slot_ids = np.zeros(rows, np.int32)
            slot_ids[: len(adapter_slots)] = adapter_slots
        args = (
            self.state,
            self.cache,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            PagedBatch(jnp.asarray(slots), jnp.asarray(table)),
            jnp.asarray(last),
            sampler,
            slot_ids,
        )
        return f"forward/r{rows}/t{width}/p{table.shape[1]}", args

    def _program(self, key: str, args: tuple, restrict: bool = False) -> jax.stages.Compiled:
        """The compiled program for ``key`` (compiled now if it is new) and its cost. Programs
        with top-k/top-p (``restrict``) are not pre-compiled: the first such request pays it."""
        if key not in self._programs:
            compiled = self._forward.lower(*args, restrict=restrict).compile()
            rows, width = args[2].shape
            context = args[4].page_table.shape[1] * self.config.page_size
            fallback = forward_cost(
                self.model_config, rows, width, context, self.cache.k.dtype.itemsize
            )
            self._programs[key] = compiled
            self.program_costs[key] = compiled_cost(compiled, fallback)
        return self._programs[key]

    def _emit(self, seq: _Sequence, token, logprob, top_ids, top_logprobs) -> RequestOutput:
        n_top = seq.params.logprobs or 0
        top = {int(i): float(lp) for i, lp in zip(top_ids[:n_top], top_logprobs[:n_top])}
        at_limit = len(seq.tokens) + 1 >= self.max_model_len
        delta, finish = seq.output.append(int(token), float(logprob), top, at_limit)
        if finish is not None:
            self._running.remove(seq)
            self._release(seq)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output.token_ids,
            text=seq.output.text,
            new_token_ids=[int(token)],
            text_delta=delta,
            logprobs=seq.output.logprobs,
            finish_reason=finish,
        )
