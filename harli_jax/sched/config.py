"""What a :class:`~harli_jax.sched.scheduler.ColocationScheduler` is told: the policy, the TPOT
SLO, and the knobs of its margins and baselines. The policies are described in
:mod:`harli_jax.sched.scheduler`; the margins in :mod:`harli_jax.sched.pricing`."""

from __future__ import annotations

import dataclasses

POLICIES = ("serve-only", "naive", "static", "harli")


@dataclasses.dataclass
class SchedulerConfig:
    """One scheduler's policy (one of ``POLICIES``), TPOT SLO and knobs."""

    policy: str = "harli"
    tpot_slo_s: float = 0.05
    # For "static": fine-tune seconds per iteration; None: SLO - p99 calibrated decode step.
    static_budget_s: float | None = None
    # A cut's name (runner.cut_name, e.g. "1x22") that "static" and "harli" always use; None:
    # each chooses its own (harli_jax.sched.cut_choice; static's in harli_jax.sched.static).
    fixed_cut: str | None = None
    # Whether "static" and "harli" queue a fill's first micro-step behind the running inference
    # step (ColocationScheduler._queue_behind); off, every fill starts once the host has seen
    # the step end.
    queue_behind: bool = True
    # Whether harli queues behind the step (and starts steps to do so) while its fill gate
    # leaves iterations unfilled: the queued micro-step runs while the host ends the step and
    # readies the next, device time no whole step can use (static, which queues one an
    # iteration, beat harli 1.15x at light load on the H100, where harli's gate left half the
    # iterations unfilled), but an idle loop then finishes the open step at micro-step speed.
    queue_unfilled: bool = False
    # Fine-tune programs kept queued on the device (`InFlight`'s depth): at 2 the host waits for
    # one program while the next runs, so a host step slower than that program idles the device
    # (a one-layer forward runs ~0.8 ms on the H100, its dispatch alone takes ~0.5 ms there).
    # On the H100, 3 trained 1-2% more than 2 at heavy load, harli and static alike, within the
    # SLO; 4 trained 6% less than 3 (bench/results/colocate-h100*-6cc6dcf.json, NOTES session 21).
    inflight_depth: int = 3
    # The most adjacent middle spans' forwards (or backwards) harli dispatches as one program
    # (powers of two up to it; 1: one micro-step a program). Fused programs are compiled and
    # measured at calibration, so a run needs a calibration made with at least its value.
    fuse_spans: int = 1
    # A plan's margin: every prediction scaled by ``min_margin``, plus a quantile of how late
    # its family's recent predictions ran (in seconds): ``error_quantile`` for the inference
    # step, ``micro_step_error_quantile`` for each fine-tune micro-step (harli_jax.sched.pricing).
    min_margin: float = 1.05
    error_quantile: float = 0.99
    micro_step_error_quantile: float = 0.9
    # ... capped at this share of the prediction: a rarer outlier than that (a GC pause, a
    # family's few samples all being one) is no margin's to absorb; it falls in the SLO's 1%.
    max_late: float = 0.5
    loop_overhead_s: float = 0.0005  # host time between steps the predictor does not see
    # The share of output tokens the SLO asks to be within it (what `static` is tuned for).
    slo_target: float = 0.99
    # The share of harli's fine-tuning iterations its backoff keeps within the SLO (see
    # harli_jax.sched.scheduler's docstring and SloBackoff).
    backoff_target: float = 0.995

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.fuse_spans < 1:
            raise ValueError(f"fuse_spans must be at least 1, got {self.fuse_spans}")
        if self.tpot_slo_s <= 0:
            raise ValueError(f"the TPOT SLO must be positive, got {self.tpot_slo_s}")
