"""Host-side page table of the unified memory arena.

The arena is one preallocated device buffer cut into fixed-size pages; this module owns only the
bookkeeping of which page belongs to whom (it never touches jax). KV caches of decode sequences and
the state of fine-tune jobs lease pages from the same pool, which is what lets the scheduler take
memory back from fine-tuning when decode needs it: `shortfall` says how much, `yield_finetune`
picks and frees the fine-tune leases to preempt.

Guarantees: a page has at most one owner; free + leased + reserved == num_pages at all times;
`allocate` is all-or-nothing; freed pages are reused lowest-first, so the layout is deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal, get_args

Kind = Literal["kv", "finetune"]
KINDS: tuple[Kind, ...] = get_args(Kind)


class OutOfPages(Exception):
    """Raised when a request needs more pages than can be had; nothing was changed."""

    def __init__(self, requested: int, available: int):
        super().__init__(f"requested {requested} pages, only {available} available")
        self.requested = requested
        self.available = available


@dataclass(frozen=True)
class Owner:
    """Holder of a lease: a decode sequence (`kind="kv"`) or a fine-tune job (`"finetune"`)."""

    kind: Kind
    key: Hashable

    def __post_init__(self) -> None:
        _check_kind(self.kind)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


class PageTable:
    """Leases of pages `[reserved, num_pages)` to owners.

    Pages `[0, reserved)` are never leased: page 0 serves as the scratch page that padded batch rows
    read and write, so padding never touches a live sequence.
    """

    def __init__(self, num_pages: int, reserved: int = 0):
        if num_pages < 0 or not 0 <= reserved <= num_pages:
            raise ValueError(f"need 0 <= reserved <= num_pages, got {reserved=}, {num_pages=}")
        self._num_pages = num_pages
        self._reserved = reserved
        # A min-heap makes "lowest free page first" O(log n) per page; a sorted list is one.
        self._free = list(range(reserved, num_pages))
        # Insertion-ordered: owners() and eviction tie-breaks follow lease creation order.
        self._leases: dict[Owner, list[int]] = {}
        self._used = dict.fromkeys(KINDS, 0)

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def num_free(self) -> int:
        return len(self._free)

    def used_by(self, kind: Kind) -> int:
        """Pages currently leased to owners of `kind`."""
        _check_kind(kind)
        return self._used[kind]

    def __contains__(self, owner: object) -> bool:
        return owner in self._leases

    def allocate(self, owner: Owner, n: int) -> list[int]:
        """Leases `n` more pages to `owner` (creating its lease if new); returns the new pages.

        Raises OutOfPages, changing nothing, when fewer than `n` pages are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages: {n}")
        if n > len(self._free):
            raise OutOfPages(n, len(self._free))
        new = [heapq.heappop(self._free) for _ in range(n)]
        self._leases.setdefault(owner, []).extend(new)
        self._used[owner.kind] += n
        return new

    def pages(self, owner: Owner) -> list[int]:
        """The pages leased to `owner`, in allocation order (its logical page order)."""
        return list(self._leases[owner])

    def free(self, owner: Owner) -> list[int]:
        """Ends `owner`'s lease and returns its pages; KeyError if it holds none."""
        pages = self._leases.pop(owner)
        for page in pages:
            heapq.heappush(self._free, page)
        self._used[owner.kind] -= len(pages)
        return pages

    def owners(self, kind: Kind | None = None) -> list[Owner]:
        """Lease holders, optionally only those of `kind`, in lease creation order."""
        if kind is not None:
            _check_kind(kind)
        return [o for o in self._leases if kind is None or o.kind == kind]

    def shortfall(self, n: int) -> int:
        """Pages that fine-tune leases must give up so that `n` kv pages fit (0 if they fit now).

        A result above `used_by("finetune")` means even preempting every job would not suffice.
        """
        return max(0, n - len(self._free))

    def yield_finetune(self, n: int) -> list[Owner]:
        """Frees fine-tune leases, largest first, until at least `n` pages came free.

        Largest first preempts the fewest jobs, since each preempted job costs a checkpoint and a
        restore. Ties go to the older lease. Returns the evicted owners; the caller checkpoints
        them and may `allocate` for them again later. Raises OutOfPages, evicting nothing, if all
        fine-tune leases together hold fewer than `n` pages.
        """
        if n <= 0:
            return []
        held = self._used["finetune"]
        if n > held:
            raise OutOfPages(n, held)
        # sorted() is stable, so equal sizes keep lease creation order.
        by_size = sorted(self.owners("finetune"), key=lambda o: -len(self._leases[o]))
        evicted, freed = [], 0
        for owner in by_size:
            if freed >= n:
                break
            freed += len(self.free(owner))
            evicted.append(owner)
        return evicted

    def snapshot(self) -> dict[str, int]:
        """Page and owner counts by kind, for metrics."""
        counts = {
            "num_pages": self._num_pages,
            "reserved": self._reserved,
            "free": len(self._free),
        }
        for kind in KINDS:
            counts[kind] = self._used[kind]
            counts[f"{kind}_owners"] = sum(o.kind == kind for o in self._leases)
        return counts
