"""What harli's plans cost: a program's predicted seconds with its family's margin, a cut's
micro-steps, and the fine-tune budget the next inference step leaves.

Each prediction carries a margin: 5% plus a quantile of how many seconds its family ran late
recently (absolute, so a slow outlier of a short program does not scale every long one; at most
half the prediction): the 99th for the inference step, one per iteration, and the 90th for
micro-steps, several per iteration, whose margins add up (at the 99th, 0.3-1 ms each on the H100
at heavy load).
"""

from __future__ import annotations

from collections.abc import Iterable

from harli_jax.engine.finetune import FineTuneJob, Granularity
from harli_jax.sched.calibration import Calibration, inference_features, option_id
from harli_jax.sched.config import SchedulerConfig
from harli_jax.sched.costs import StepReport
from harli_jax.sched.cut_choice import Planned
from harli_jax.sched.predictor import Predictor


def priced(
    config: SchedulerConfig, predictor: Predictor, family: str, key: str, **features: float
) -> tuple[float, float]:
    """Program ``key``'s expected seconds (the prediction, scaled by ``min_margin``) and the
    margin its family's recent lateness adds."""
    predicted = predictor.predict(key, **features)
    q = config.error_quantile if family == "inference" else config.micro_step_error_quantile
    late = predictor.quantile_error_s(family, q)
    return predicted * config.min_margin, min(late, predicted * config.max_late)


def estimate(
    config: SchedulerConfig, predictor: Predictor, family: str, key: str, **features: float
) -> float:
    """Predicted seconds of program ``key`` with its family's margin."""
    return sum(priced(config, predictor, family, key, **features))


def planned(
    config: SchedulerConfig,
    predictor: Predictor,
    calibration: Calibration,
    job: FineTuneJob,
    option: Granularity,
) -> Planned | None:
    """The expected seconds and margins of each micro-step of ``job``'s step cut as ``option``,
    in run order; None for a cut not yet calibrated."""
    keys = calibration.cuts.get(option_id(job, option))
    if not keys or any(key not in predictor for key in keys):
        return None
    # train/<shape>/<kind>/...: a cut repeats a few programs many times; price each once.
    prices = {k: priced(config, predictor, "train/" + k.split("/")[2], k) for k in set(keys)}
    return [prices[k][0] for k in keys], [prices[k][1] for k in keys]


def fill_budget(
    config: SchedulerConfig,
    predictor: Predictor,
    report: StepReport,
    prefill_tokens: int,
    prefill_steps: Iterable[tuple[float, float]],
) -> float:
    """The SLO minus the next inference step (with margin) and the loop overhead.

    The next step is predicted as the one just run (``report``: same programs and batch) but
    after fine-tune work, less the prefill chunk it ran if none follows (its decode program
    alone). One whose prefill chunk runs more prompt tokens (``prefill_tokens``: the requests
    it admits are known now) than the last step's is priced no lower than the slowest of the
    recent steps that ran one (``prefill_steps``: seconds and prompt tokens), scaled up to its
    tokens: a burst of arrivals fills a chunk with four prompts, and on the H100 such a step
    alone outlasted the SLO, after a fill priced for the last step's one.
    """
    key, features = report.key, inference_features(report, after_train=True)
    decode_key = key.rsplit("+", 1)[-1]
    if "+" in key and not prefill_tokens and decode_key in predictor:
        key, features = decode_key, {**features, "prefill_tokens": 0.0, "calls": 1.0}
    next_step = estimate(config, predictor, "inference", key, **features)
    if prefill_tokens > report.features.get("prefill_tokens", 0.0):
        scaled = (s * max(1.0, prefill_tokens / tokens) for s, tokens in prefill_steps)
        next_step = max(next_step, max(scaled, default=config.tpot_slo_s))
    return config.tpot_slo_s - next_step - config.loop_overhead_s
