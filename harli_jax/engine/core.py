"""The inference core: continuous batching with chunked prefill over the paged KV cache.

Owns the running set of sequences and the device state they touch (model state, KV cache). One
:meth:`EngineCore.step` admits waiting requests, runs one prefill chunk batch and one decode batch,
samples, and returns what each request gained. A sequence is ``tokens = prompt + output`` of which
the first ``num_cached`` are in the cache; every step processes uncached tokens and, once a
sequence is fully cached, samples its next token. Recompute-preemption (vLLM's) falls out of the
same rule: a preempted sequence simply has ``num_cached = 0``.

This module runs a step on the device and turns its samples into what each request gained.
Which sequences a step runs, and the pages they hold, are :mod:`harli_jax.engine.batcher`'s; a
step's device inputs and its compiled programs are :mod:`harli_jax.engine.programs`'; a
request's own state is :mod:`harli_jax.engine.sequence`'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from harli_jax.engine.adapters import AdapterBank
from harli_jax.engine.batcher import Batcher
from harli_jax.engine.device_wait import wait_until_ready
from harli_jax.engine.output import OutputBuilder, RequestOutput
from harli_jax.engine.programs import PRECOMPILED_VARIANTS as PRECOMPILED_VARIANTS
from harli_jax.engine.programs import StepPrograms
from harli_jax.engine.sampling import SamplingParams, unpack
from harli_jax.engine.sequence import Sequence
from harli_jax.engine.steps import state_arrays
from harli_jax.memory.arena import Arena
from harli_jax.memory.kv_cache import KVCache
from harli_jax.memory.page_table import PageTable
from harli_jax.memory.sizing import arena_pages, check_memory_fraction
from harli_jax.sched.costs import StepReport

# What a step calls once its first program is dispatched (see EngineCore.step).
DuringStep = Callable[[jax.Array, bool], float | None]


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

    @property
    def prefill_rows(self) -> int:
        """The most sequences one prefill batch takes."""
        return max(1, self.max_prefill_tokens // self.prefill_chunk)


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
        self.programs = StepPrograms(
            self.graphdef,
            jax.tree.structure(self.state),
            mc,
            config,
            self.pages_per_seq,
            self.adapters is not None,
        )
        # Names bench/ and tests reach the step function and the compiled programs by.
        self._forward, self._programs = self.programs.forward, self.programs.compiled
        self.program_costs = self.programs.costs
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
        self.last_report: StepReport | None = None
        self.batcher = Batcher(config, self.arena)
        self._ids = itertools.count()
        self.eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else ()

    @property
    def state(self) -> nnx.State:
        """The model's state (the serving adapter bank's included)."""
        return self._state

    @state.setter
    def state(self, state: nnx.State) -> None:
        self._state = state
        self.weights = state_arrays(state)  # what the programs take, flattened once

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
        temporaries = self.programs.largest_temp_bytes(self.weights, KVCache(spec, spec))
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
        if any(token >= vocab for token, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must lie in [0, {vocab})")
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
        self._write_bank(lambda model: self.adapters.load(model, name, weights, config))

    def delete_adapter(self, name: str) -> None:
        """Stops serving adapter ``name``: requests for it are refused from now on, and its slot
        is cleared once the requests that asked for it have finished. ValueError if it is not
        loaded."""
        if self.adapters is None:
            raise ValueError("this engine was built with max_loras=0: it serves no adapters")
        try:
            self.adapters.retire(name)
        except KeyError:
            raise ValueError(f"adapter {name!r} is not loaded") from None
        self._clear_retired()

    def _clear_retired(self) -> None:
        """Clears the slots of deleted adapters that no request uses any more."""
        if self.adapters is None or not self.adapters.retiring:
            return
        in_use = {seq.adapter_slot for seq in (*self.batcher.running, *self.batcher.waiting)}
        if self.adapters.retiring - in_use:
            self._write_bank(lambda model: self.adapters.clear_retired(model, in_use))

    def _write_bank(self, write: Callable[[nnx.Module], None]) -> None:
        """Applies ``write`` to a model view of the state, then keeps the state it leaves."""
        model = nnx.merge(self.graphdef, self.state)
        write(model)
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
        self.batcher.add(Sequence(request_id, list(prompt_token_ids), params, output, seed, slot))
        return request_id

    def abort(self, request_id: str) -> None:
        """Drops a request and frees its pages at once (a client went away)."""
        self.batcher.abort(request_id)
        self._clear_retired()

    def drain_queue_waits(self) -> list[float]:
        """Arrival-to-admission seconds of the requests admitted since the last call."""
        return self.batcher.drain_queue_waits()

    def has_unfinished(self) -> bool:
        return self.batcher.has_unfinished()

    def next_prefill_tokens(self) -> int:
        """The prompt tokens the next `step`'s prefill batch runs (0: none)."""
        return self.batcher.next_prefill_tokens()

    @property
    def num_running(self) -> int:
        return len(self.batcher.running)

    @property
    def num_waiting(self) -> int:
        return len(self.batcher.waiting)

    # -- the step ---------------------------------------------------------------------------
    def step(self, during: DuringStep | None = None) -> list[RequestOutput]:
        """One prefill batch and one decode batch; returns the requests that gained tokens.

        ``during`` is called once the step's first program is dispatched, with an array that is
        ready once that program has run and whether it is the step's last program (a prefill
        chunk's is not: the sequences whose prompt it completes may decode next). It waits for
        device work queued before this step (fine-tune programs the scheduler left in flight),
        so that the host's side of the step (its inputs and dispatch: about half of a small
        decode step on the H100's host) overlaps that work instead of following it, may use
        the host while the program runs, and returns when the host saw the queued work end
        (None: nothing was queued).

        Leaves ``last_report``: the programs it ran, their summed cost and its wall time,
        counted from when the device was free for it (the queued work's end, if later).
        """
        start = time.perf_counter()
        self.batcher.admit()
        runs, keys = [], []  # (outputs, when the work queued before it ended) of each program
        prefill = self.batcher.prefill_batch()
        prefill_tokens = sum(self.batcher.chunk(s) for s in prefill)
        if prefill:
            runs.append(self._run(prefill, self.config.prefill_chunk, keys, during))
            during = None  # called once, on the first program
        decode = self.batcher.decode_batch()
        if decode:
            runs.append(self._run(decode, 1, keys, during))
        self.last_report = None
        if keys:
            device_free = max([start] + [ended for _, ended in runs if ended is not None])
            costs = [self.program_costs[k] for k in keys]
            end = time.perf_counter()
            self.last_report = StepReport(
                key="+".join(keys),
                cost={name: sum(c[name] for c in costs) for name in costs[0]},
                features={"rows": float(len(decode)), "prefill_tokens": float(prefill_tokens)},
                seconds=end - device_free,
                ended_at=end,
            )
        self._clear_retired()
        return [output for outputs, _ in runs for output in outputs]

    def _run(
        self,
        seqs: list[Sequence],
        max_chunk: int,
        keys: list[str],
        during: DuringStep | None = None,
    ) -> tuple[list[RequestOutput], float | None]:
        """Processes up to ``max_chunk`` uncached tokens of each sequence in one device call;
        appends the program's key to ``keys``. Returns the requests that gained tokens, and what
        ``during`` (see :meth:`step`) returned, if it was given.

        The sequences' chunks are decided here; :meth:`StepPrograms.step_inputs` lays them out."""
        chunks = [min(seq.pending, max_chunk) for seq in seqs]
        step = self.programs.step_inputs(
            self.weights, self.cache, self.pages, seqs, chunks, max_chunk
        )
        keys.append(step.key)
        self.cache, packed = self.programs.program(step)(*step.args)
        queued_ended = None if during is None else during(packed, max_chunk == 1)
        # The program packs what its variant computed into one array: one device-to-host copy.
        sampled = unpack(np.asarray(wait_until_ready(packed)), step.variant)
        new_tokens, logprobs = sampled.tokens.tolist(), sampled.logprobs.tolist()
        top_ids = top_logprobs = None
        if sampled.top_ids is not None:
            top_ids, top_logprobs = sampled.top_ids.tolist(), sampled.top_logprobs.tolist()
        outputs = []
        for row, (seq, chunk) in enumerate(zip(seqs, chunks)):
            seq.num_cached += chunk
            if seq.pending == 0:
                n_top = seq.params.logprobs or 0
                top = {}
                if n_top and top_ids is not None:
                    top = dict(zip(top_ids[row][:n_top], top_logprobs[row][:n_top]))
                outputs.append(self._emit(seq, new_tokens[row], logprobs[row], top))
        return outputs, queued_ended

    def shape_buckets(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens per row, pages per row) a step can run: decode, then prefill.
        :meth:`compile_all` compiles :data:`PRECOMPILED_VARIANTS` of each."""
        return self.programs.shape_buckets()

    def compile_all(
        self,
        progress: Callable[[int, int], None] = lambda done, total: None,
        workers: int | None = None,
    ) -> float:
        """Compiles, for every shape bucket, the sampler variants a plain request runs
        (:data:`PRECOMPILED_VARIANTS`; others compile on first use), and runs each once, and
        the adapter bank's slot write; returns the seconds it took.

        ``progress(done, total)`` counts shape buckets, on the calling thread; the programs
        compile in ``workers`` threads (default: one per CPU core; 1 compiles serially).
        """
        start = time.perf_counter()
        self.cache = self.programs.compile_all(self.weights, self.cache, progress, workers)
        if self.adapters is not None:
            self._write_bank(self.adapters.compile)
        return time.perf_counter() - start

    def _emit(
        self, seq: Sequence, token: int, logprob: float, top: dict[int, float]
    ) -> RequestOutput:
        at_limit = len(seq.prompt_token_ids) + len(seq.output.token_ids) + 1 >= self.max_model_len
        delta, finish = seq.output.append(token, logprob, top, at_limit)
        if finish is not None:
            self.batcher.finish(seq)
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
