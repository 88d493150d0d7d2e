"""Which sequences a step runs: the waiting queue, the running set and the pages each holds.

This is continuous batching's bookkeeping (vLLM's scheduler), and it touches no device state.
Waiting requests are admitted in arrival order while the decode batch has room and their first
chunk's pages can be leased. A step's prefill batch is the first ``prefill_rows`` sequences
mid-prompt, a chunk each. Its decode batch is every fully prefilled sequence, each given room
for one more token; under page pressure the youngest is preempted (recompute-preemption: its
pages go back and ``num_cached`` returns to 0, so it prefills again from the queue's head). A
finished or aborted sequence's pages go back at once.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from typing import TYPE_CHECKING

from harli_jax.engine.sequence import Sequence
from harli_jax.memory.arena import Arena

if TYPE_CHECKING:
    from harli_jax.engine.core import EngineConfig


class Batcher:
    """The sequences of one engine, waiting and running, and their page leases in ``arena``."""

    def __init__(self, config: EngineConfig, arena: Arena):
        self.config = config
        self.arena = arena
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._queue_waits: list[float] = []

    def chunk(self, seq: Sequence) -> int:
        """The prompt tokens ``seq`` prefills in its next step (up to ``prefill_chunk``)."""
        return min(seq.pending, self.config.prefill_chunk)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Drops a request, waiting or running, and frees its pages."""
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        for seq in [s for s in self.running if s.request_id == request_id]:
            self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """Takes a running sequence out and frees its pages."""
        self.running.remove(seq)
        self._release(seq)

    def drain_queue_waits(self) -> list[float]:
        """Arrival-to-admission seconds of the requests admitted since the last call."""
        waits, self._queue_waits = self._queue_waits, []
        return waits

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def next_prefill_tokens(self) -> int:
        """The prompt tokens the next step's prefill batch runs, pages permitting (0: it runs
        none): those of the first ``prefill_rows`` sequences mid-prompt, then waiting."""
        room = max(0, self.config.max_num_seqs - len(self.running))
        admitted = itertools.chain(self.running, itertools.islice(self.waiting, room))
        prompts = (seq for seq in admitted if seq.pending > 1)
        rows = itertools.islice(prompts, self.config.prefill_rows)
        return sum(self.chunk(seq) for seq in rows)

    def admit(self) -> None:
        """Moves waiting requests to the running set while there is room and pages."""
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self._ensure_pages(seq, self.chunk(seq)):
                break
            self.running.append(self.waiting.popleft())
            if not seq.admitted:  # re-admission after preemption is not queueing
                seq.admitted = True
                self._queue_waits.append(time.perf_counter() - seq.arrival)

    def prefill_batch(self) -> list[Sequence]:
        """Running sequences mid-prompt, up to ``prefill_rows``, whose next chunk has pages."""
        prompts = [seq for seq in self.running if seq.pending > 1]
        return [
            seq
            for seq in prompts[: self.config.prefill_rows]
            if self._ensure_pages(seq, self.chunk(seq))
        ]

    def decode_batch(self) -> list[Sequence]:
        """Running sequences whose prompt is cached, each with room for one more token; the
        youngest are preempted while the pages run short."""
        ready = []
        for seq in [s for s in self.running if s.pending == 1]:
            if seq not in self.running:  # preempted for an earlier sequence of this batch
                continue
            while not self._ensure_pages(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
                if victim in ready:
                    ready.remove(victim)
            else:
                ready.append(seq)
        return ready

    def _ensure_pages(self, seq: Sequence, new_tokens: int) -> bool:
        owner, pages = seq.owner, self.arena.pages
        have = len(pages.pages(owner)) if owner in pages else 0
        need = math.ceil((seq.num_cached + new_tokens) / self.config.page_size) - have
        if need <= 0:
            return True
        # Fine-tune leases in the way yield first (arena.on_pressure): never refuse for them.
        return self.arena.lease(owner, need)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached = 0
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.owner in self.arena.pages:
            self.arena.pages.free(seq.owner)
