"""Specification of a co-located step's plan skeleton (harli_jax.lora.arena_steps): a cut's
micro-steps are built once per lease and reused by every step of that cut, which binds only its
own arguments (its batch, its step number, its running loss); a change of cut or of lease builds
them again. Steps planned from a reused skeleton train exactly what one-program steps train."""

from __future__ import annotations

import numpy as np
import pytest
from test_arena import arena_trainer
from test_lora_train import (
    base,  # noqa: F401  (a fixture)
    lora_model,
    packed_batch,
    parameters,
    trainer_for,
)

STEPS = 3
# Two cuts whose programs other tests compile too; different spans, so different lease shapes.
CUTS = ((2, [(0, 1), (1, 2), (2, 3), (3, 4)]), (2, [(0, 1), (1, 3), (3, 4)]))


@pytest.fixture(scope="module")
def whole_steps(base):  # noqa: F811
    """The loss of each of `STEPS` one-program steps (on batches 0, 1, ...) and the parameters
    after them (SGD, dropout on: each step's dropout keys depend on its step number)."""
    trainer = trainer_for(lora_model(base))
    losses = [float(trainer.train_step(packed_batch(seed))["loss"]) for seed in range(STEPS)]
    return losses, parameters(trainer)


def assert_trains_the_whole_steps(trainer, losses: list[float], whole_steps) -> None:
    expected_losses, expected_params = whole_steps
    assert losses == pytest.approx(expected_losses, rel=1e-6)
    for got, want in zip(parameters(trainer), expected_params, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_steps_of_one_cut_reuse_its_skeleton_and_train_the_whole_steps(
    base,  # noqa: F811
    whole_steps,
):
    trainer, _ = arena_trainer(lora_model(base), num_pages=256)
    arena_steps = trainer._arena_steps
    # A first step dropped after its first backward (its sums and loss are partial): the batch
    # is planned again from the same skeleton and must start from zero sums and loss.
    dropped = trainer.plan(packed_batch(0), *CUTS[0])
    (skeleton,) = arena_steps._skeletons.values()
    for micro in dropped.steps[: [m.kind for m in dropped].index("bwd") + 1]:
        micro.run()

    losses, plans = [], []
    for seed in range(STEPS):
        plans.append(trainer.plan(packed_batch(seed), *CUTS[0]))
        (reused,) = arena_steps._skeletons.values()
        assert reused is skeleton
        if seed == 0:
            with pytest.raises(RuntimeError, match="abandoned"):
                dropped.steps[dropped._next].run()
        losses.append(float(trainer.run_plan(plans[-1])["loss"]))

    assert_trains_the_whole_steps(trainer, losses, whole_steps)
    # Each plan is the skeleton's micro-steps bound to its own step's arguments.
    assert [(m.kind, m.key) for m in plans[0]] == [(u.kind, u.key) for u in skeleton]
    assert all([(m.kind, m.key) for m in p] == [(m.kind, m.key) for m in plans[0]] for p in plans)
    assert [int(p.args.chunks[0][2]) for p in plans] == list(range(STEPS))  # step numbers
    # A skeleton built afresh makes the same micro-steps.
    arena_steps._skeletons.clear()
    fresh = trainer.plan(packed_batch(0), *CUTS[0])
    assert next(iter(arena_steps._skeletons.values())) is not skeleton
    assert [(m.kind, m.key) for m in fresh] == [(m.kind, m.key) for m in plans[0]]


def test_a_change_of_cut_or_of_lease_builds_the_skeleton_again(
    base,  # noqa: F811
    whole_steps,
):
    trainer, arena = arena_trainer(lora_model(base), num_pages=256)
    arena_steps = trainer._arena_steps
    built, leases = [], []

    def step(seed: int, cut) -> float:
        plan = trainer.plan(packed_batch(seed), *cut)
        (skeleton,) = arena_steps._skeletons.values()  # the lease's only: the old one went
        built.append(skeleton)
        leases.append(tuple(arena.page_array(arena_steps._owner)))
        return float(trainer.run_plan(plan)["loss"])

    losses = [step(0, CUTS[0]), step(1, CUTS[1])]  # another cut: another lease shape
    trainer.release()  # memory pressure takes the pages back
    losses.append(step(2, CUTS[1]))  # the same cut in a new lease

    assert len({id(skeleton) for skeleton in built}) == STEPS
    assert arena_steps.lease_size and len(leases[0]) != len(leases[1])
    assert_trains_the_whole_steps(trainer, losses, whole_steps)


def test_adjacent_middle_spans_run_as_one_program_train_the_whole_steps(
    base,  # noqa: F811
    whole_steps,
):
    """`Trainer.fused`: the two middle spans' forwards (and backwards) of each row chunk run as
    one program where asked, and the steps still train what one-program steps train; a count
    that reaches past the middle spans, or an abandoned plan, fuses nothing."""
    trainer, _ = arena_trainer(lora_model(base), num_pages=256)
    losses = []
    for seed in range(STEPS):
        plan, fused = trainer.plan(packed_batch(seed), *CUTS[0]), []
        assert trainer.fused(plan, 2) is None  # the first span is not a middle one
        while plan._next < len(plan):
            micro = trainer.fused(plan, 2)
            if micro is not None:
                assert trainer.fused(plan, 3) is None  # the last span is not a middle one
                fused.append((micro.kind, micro.key[-1]))
            (micro or plan.steps[plan._next]).run()
        losses.append(float(plan.metrics["loss"]))
        assert fused == [("fwd", "x2"), ("bwd", "x2")] * 2  # two row chunks
    assert_trains_the_whole_steps(trainer, losses, whole_steps)
    dropped = trainer.plan(packed_batch(0), *CUTS[0])
    trainer.release()
    assert trainer.fused(dropped, 2) is None
