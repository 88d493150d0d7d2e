"""Specification of the arena's host-side page table (harli_jax.memory.page_table)."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from harli_jax.memory.page_table import OutOfPages, Owner, PageTable

kinds = st.sampled_from(["kv", "finetune"])
keys = st.integers(0, 5)


def kv(key):
    return Owner("kv", key)


def ft(key):
    return Owner("finetune", key)


def test_reserved_pages_are_never_leased():
    table = PageTable(4, reserved=1)
    assert table.allocate(kv(0), 3) == [1, 2, 3]
    with pytest.raises(OutOfPages) as err:
        table.allocate(kv(1), 1)
    assert (err.value.requested, err.value.available) == (1, 0)


def test_failed_allocation_changes_nothing():
    table = PageTable(5)
    table.allocate(kv(0), 3)
    with pytest.raises(OutOfPages):
        table.allocate(kv(0), 3)
    assert table.pages(kv(0)) == [0, 1, 2]
    assert table.num_free == 2


def test_extending_a_lease_appends_in_allocation_order():
    table = PageTable(8)
    table.allocate(kv("a"), 2)
    table.allocate(kv("b"), 1)
    table.allocate(kv("a"), 2)
    assert table.pages(kv("a")) == [0, 1, 3, 4]


def test_freed_pages_are_reused_lowest_first():
    table = PageTable(6)
    for key in range(3):
        table.allocate(kv(key), 2)
    table.free(kv(2))
    table.free(kv(0))
    assert table.allocate(kv(3), 3) == [0, 1, 4]


def test_free_returns_the_lease_and_rejects_unknown_owners():
    table = PageTable(4)
    table.allocate(ft("job"), 3)
    assert table.free(ft("job")) == [0, 1, 2]
    with pytest.raises(KeyError):
        table.free(ft("job"))


def test_same_key_of_different_kinds_are_different_owners():
    table = PageTable(4)
    table.allocate(kv(7), 1)
    table.allocate(ft(7), 2)
    assert table.pages(kv(7)) == [0]
    assert table.owners("finetune") == [ft(7)]


def test_owner_rejects_unknown_kind():
    with pytest.raises(ValueError):
        Owner("weights", 0)


def test_shortfall_is_the_missing_page_count():
    table = PageTable(10, reserved=1)
    table.allocate(ft("job"), 6)
    assert table.shortfall(3) == 0
    assert table.shortfall(5) == 2


def test_yield_finetune_evicts_largest_leases_first():
    table = PageTable(13)
    for job, size in [("small", 2), ("big", 5), ("mid", 3), ("mid2", 3)]:
        table.allocate(ft(job), size)
    assert table.yield_finetune(6) == [ft("big"), ft("mid")]
    assert table.owners() == [ft("small"), ft("mid2")]
    assert table.num_free == 8


def test_yield_finetune_evicts_nothing_when_jobs_hold_too_little():
    table = PageTable(8)
    table.allocate(ft("job"), 2)
    table.allocate(kv(0), 4)
    with pytest.raises(OutOfPages):
        table.yield_finetune(3)
    assert table.owners() == [ft("job"), kv(0)]


def test_snapshot_counts_pages_and_owners_by_kind():
    table = PageTable(10, reserved=1)
    table.allocate(kv(0), 2)
    table.allocate(kv(1), 1)
    table.allocate(ft("job"), 4)
    assert table.snapshot() == {
        "num_pages": 10,
        "reserved": 1,
        "free": 2,
        "kv": 3,
        "kv_owners": 2,
        "finetune": 4,
        "finetune_owners": 1,
    }


class PageTableMachine(RuleBasedStateMachine):
    """Drives a PageTable and a naive reference model side by side.

    The model predicts the exact pages of every allocation (lowest free first) and the exact
    owners of every eviction, so any divergence in the table shows up as a mismatch.
    """

    @initialize(num_pages=st.integers(1, 40), reserved=st.integers(0, 2))
    def setup(self, num_pages, reserved):
        reserved = min(reserved, num_pages)
        self.table = PageTable(num_pages, reserved)
        self.reserved = reserved
        self.free_pages = set(range(reserved, num_pages))
        self.leases: dict[Owner, list[int]] = {}
        self.yielded: dict[Owner, int] = {}

    def allocate_checked(self, owner, n):
        if n > len(self.free_pages):
            with pytest.raises(OutOfPages) as err:
                self.table.allocate(owner, n)
            assert (err.value.requested, err.value.available) == (n, len(self.free_pages))
            return
        expected = sorted(self.free_pages)[:n]
        assert self.table.allocate(owner, n) == expected
        self.free_pages -= set(expected)
        self.leases.setdefault(owner, []).extend(expected)

    def yield_checked(self, n):
        held = {o: len(p) for o, p in self.leases.items() if o.kind == "finetune"}
        if n > sum(held.values()):
            with pytest.raises(OutOfPages):
                self.table.yield_finetune(n)
            return
        expected, freed = [], 0
        for owner in sorted(held, key=lambda o: -held[o]):
            if freed >= n:
                break
            expected.append(owner)
            freed += held[owner]
        assert self.table.yield_finetune(n) == expected
        for owner in expected:
            self.free_pages |= set(self.leases.pop(owner))
            self.yielded[owner] = held[owner]

    @rule(kind=kinds, key=keys, n=st.integers(0, 12))
    def allocate_or_extend(self, kind, key, n):
        self.allocate_checked(Owner(kind, key), n)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def free(self, data):
        owner = data.draw(st.sampled_from(list(self.leases)))
        assert self.table.free(owner) == self.leases[owner]
        self.free_pages |= set(self.leases.pop(owner))

    @rule(kind=kinds, key=keys)
    def free_unknown_owner(self, kind, key):
        owner = Owner(kind, key)
        if owner not in self.leases:
            with pytest.raises(KeyError):
                self.table.free(owner)

    @rule(n=st.integers(0, 20))
    def yield_finetune(self, n):
        self.yield_checked(n)

    @rule(key=st.integers(100, 103), fraction=st.floats(0, 1))
    def admit_kv_after_yield(self, key, fraction):
        kv_room = self.table.num_pages - self.reserved - self.table.used_by("kv")
        n = round(fraction * kv_room)
        self.yield_checked(self.table.shortfall(n))
        assert n <= len(self.free_pages)
        self.allocate_checked(kv(key), n)

    @precondition(lambda self: self.yielded)
    @rule(data=st.data())
    def reclaim_yielded_job(self, data):
        owner = data.draw(st.sampled_from(sorted(self.yielded, key=str)))
        if owner not in self.leases and self.yielded[owner] <= len(self.free_pages):
            self.allocate_checked(owner, self.yielded.pop(owner))

    @rule()
    def fill_and_release(self):
        probe = Owner("kv", "probe")
        pages = self.table.allocate(probe, self.table.num_free)
        owned = {p for o in self.table.owners() if o != probe for p in self.table.pages(o)}
        assert set(pages) == set(range(self.reserved, self.table.num_pages)) - owned
        self.table.free(probe)

    @invariant()
    def no_page_is_owned_twice_or_reserved(self):
        owned = [p for o in self.table.owners() for p in self.table.pages(o)]
        assert len(owned) == len(set(owned))
        assert all(self.reserved <= p < self.table.num_pages for p in owned)

    @invariant()
    def accounting_sums_to_the_arena_size(self):
        leased = sum(len(self.table.pages(o)) for o in self.table.owners())
        assert self.table.num_free + leased + self.reserved == self.table.num_pages
        assert self.table.used_by("kv") + self.table.used_by("finetune") == leased

    @invariant()
    def table_matches_the_reference_model(self):
        assert self.table.owners() == list(self.leases)
        assert {o: self.table.pages(o) for o in self.table.owners()} == self.leases
        assert self.table.num_free == len(self.free_pages)


PageTableMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_page_table_state_machine = PageTableMachine.TestCase
