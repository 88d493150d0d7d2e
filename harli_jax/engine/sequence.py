"""One request as the engine holds it between steps.

Owns a request's per-sequence state: ``tokens = prompt + output``, of which the first
``num_cached`` are in the KV cache; its sampling parameters, seed, adapter slot and output so far;
when it arrived and whether it was ever admitted; and its KV lease's pages as a row of a step's
page table, kept up to date without being rebuilt every step.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from harli_jax.engine.output import OutputBuilder
from harli_jax.engine.sampling import SamplingParams
from harli_jax.memory.kv_cache import SCRATCH_PAGE
from harli_jax.memory.page_table import Owner, PageTable


@dataclasses.dataclass(eq=False)  # identity: `in` and `remove` on the running list stay cheap
class Sequence:
    """A request in the engine's waiting queue or running set."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output: OutputBuilder
    seed: int
    adapter_slot: int = 0
    num_cached: int = 0
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: bool = False
    # The lease's pages as a step's page-table row, grown in place (see table_row).
    page_row: np.ndarray | None = None
    pages_known: int = 0

    @property
    def owner(self) -> Owner:
        """The holder of this sequence's KV lease in the arena's page table."""
        return Owner("kv", self.request_id)

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

    def table_row(self, pages: PageTable, width: int, need: int) -> np.ndarray:
        """This sequence's pages, scratch-padded to ``width``, holding at least ``need`` pages.

        The row is kept on the sequence and only the pages leased since the last step are copied
        in: a KV lease only grows until it is released (finish, abort, preemption), and a released
        sequence starts again from ``num_cached == 0``, where the row is rebuilt."""
        if self.page_row is None or self.num_cached == 0:
            self.page_row = np.full(width, SCRATCH_PAGE, np.int32)
            self.pages_known = 0
        if self.pages_known < need:
            leased = pages.pages(self.owner)
            self.page_row[self.pages_known : len(leased)] = leased[self.pages_known :]
            self.pages_known = len(leased)
        return self.page_row
