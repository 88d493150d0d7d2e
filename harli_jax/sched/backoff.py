"""The scheduler's last line of defence for the TPOT SLO: a margin on whole iterations.

Each prediction already carries its family's margin, but an iteration can still overrun for
reasons no single program's record shows (the host stalls, the step after a long train program
runs slow). ``SloBackoff`` watches the iterations that ran fine-tune work and tracks the budget cut
that keeps a share ``target`` of them within the SLO: it is the online quantile estimate (stochastic
approximation; "frugal" streaming quantiles) of how far an iteration overruns, moved by ``step_s``
up after each overrun and by ``step_s * (1 - target) / target`` down after each iteration on time,
so that it settles where overruns are ``1 - target`` of iterations. An overrun the iteration's
inference side made alone (its length less its fine-tune work is already over the SLO: a host
stall, a slow step) is no budget's to prevent, and is not counted either way: on the H100's host
such stalls alone took ~1% of iterations, and counting them drove the cut to 2-3 ms of a 9 ms
budget without saving one of them. On a quiet device it stays at zero and costs nothing.

:func:`miss_cause` names what made a filled iteration late (its programs, the fill's host loop,
or the inference step after it), so a run's report says where its misses came from.
"""

from __future__ import annotations


class SloBackoff:
    """Seconds to take off harli's fine-tune budget, learned from iterations' lengths."""

    def __init__(self, target: float = 0.99, step_s: float = 0.0005, max_s: float = float("inf")):
        if not 0 < target < 1:
            raise ValueError(f"target must be in (0, 1), got {target}")
        self.target, self.step_s, self.max_s = target, step_s, max_s
        self.seconds = 0.0

    def observe(self, iteration_s: float, slo_s: float, fine_tune_s: float) -> None:
        """Learns from one iteration that lasted ``iteration_s``, ``fine_tune_s`` of it fine-tune
        work."""
        if iteration_s - fine_tune_s > slo_s:
            return
        if iteration_s > slo_s:
            self.seconds = min(self.max_s, self.seconds + self.step_s)
        else:
            down = self.step_s * (1 - self.target) / self.target
            self.seconds = max(0.0, self.seconds - down)


def miss_cause(
    slo_s: float,
    step_ended: float,
    deadline: float,
    returned: float,
    programs_ended: float,
    ended: float,
) -> str:
    """What made a filled iteration late, from its clock times: the step before the fill ended
    at ``step_ended``, the fill aimed its programs at ``deadline``, its host loop returned at
    ``returned``, its programs were seen to end at ``programs_ended``, and the inference step
    after it ended at ``ended``. ``"on time"`` within ``slo_s``; else ``"programs"`` (they ran
    past the deadline), ``"host"`` (the fill's host loop did: a step start's planning, a
    wait), or ``"inference"`` (the fill kept to its deadline and the step after it ran long)."""
    if ended - step_ended <= slo_s:
        return "on time"
    if programs_ended > deadline:
        return "programs"
    return "host" if returned > deadline else "inference"
