"""Specification of the two-stage latency predictor (harli_jax.sched.predictor, .roofline and
.correction)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harli_jax.sched.predictor import Predictor
from harli_jax.sched.roofline import DeviceRates, measure_device_rates, roofline_seconds

# Round numbers, so a cost dict's bytes translate to seconds by eye.
RATES = DeviceRates(peak_flops=1e14, hbm_bytes_per_s=1e12)
BATCHES = (1, 2, 4, 8, 16, 32)
CONTEXTS = (256, 512, 1024, 2048)


def decode_cost(batch, context):
    """A memory-bound decode step: weights plus KV bytes, roofline 2.5 ms to 30 ms."""
    return {"flops": 2e9 * batch, "bytes accessed": 2.5e9 + 4e5 * batch * context}


def decode_predictor(**kwargs):
    predictor = Predictor(RATES, **kwargs)
    for b in BATCHES:
        for c in CONTEXTS:
            predictor.register(f"decode/b{b}/c{c}", "decode", decode_cost(b, c))
    return predictor


def synthetic_runs(predictor, n, seed, noise=0.01):
    """(key, batch, context, measured) with measured = 1.3 * roofline + 2 ms * batch + noise."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        b, c = int(rng.choice(BATCHES)), int(rng.choice(CONTEXTS))
        key = f"decode/b{b}/c{c}"
        truth = 1.3 * predictor.roofline(key) + 0.002 * b
        yield key, b, c, truth * (1 + noise * rng.standard_normal())


def test_roofline_is_the_slower_of_compute_and_memory():
    compute_bound = {"flops": 1e12, "bytes accessed": 2e9}
    memory_bound = {"flops": 1e10, "bytes accessed": 5e9}
    assert roofline_seconds(compute_bound, 1e14, 1e12) == pytest.approx(1e12 / 1e14)
    assert roofline_seconds(memory_bound, 1e14, 1e12) == pytest.approx(5e9 / 1e12)


def test_roofline_accepts_a_one_element_list():
    cost = {"flops": 3e11, "bytes accessed": 1e9}
    assert roofline_seconds([cost], 1e14, 1e12) == roofline_seconds(cost, 1e14, 1e12)


def test_roofline_reads_matmul_flops_from_xla_cost_analysis():
    # XLA:GPU prices a bare cuBLAS call as unknown (-1), so this pins the CPU backend.
    cpu = jax.devices("cpu")[0]
    m, k, n = 64, 128, 32
    a = jax.device_put(jnp.ones((m, k), jnp.float32), cpu)
    b = jax.device_put(jnp.ones((k, n), jnp.float32), cpu)
    cost = jax.jit(jnp.matmul).lower(a, b).compile().cost_analysis()
    # With unit peak rate and unbounded bandwidth, the roofline is the flop count.
    assert roofline_seconds(cost, 1.0, math.inf) == 2 * m * n * k


def test_measured_device_rates_are_positive_and_cached():
    rates = measure_device_rates()
    assert rates.peak_flops > 0 and math.isfinite(rates.peak_flops)
    assert rates.hbm_bytes_per_s > 0 and math.isfinite(rates.hbm_bytes_per_s)
    assert measure_device_rates() is rates


def test_register_rejects_a_program_without_cost():
    with pytest.raises(ValueError):
        Predictor(RATES).register("empty", "decode", {"flops": 0.0, "bytes accessed": -1.0})


def test_unfitted_family_predicts_roofline_times_prior_factor():
    predictor = decode_predictor(prior_factor=1.2)
    key = "decode/b8/c1024"
    assert predictor.predict(key, batch=8, context=1024) == 1.2 * predictor.roofline(key)


def test_prior_factor_is_fit_from_the_first_samples():
    predictor = decode_predictor()
    predictor.observe(
        "decode/b1/c256", 1.5 * predictor.roofline("decode/b1/c256"), batch=1, context=256
    )
    key = "decode/b32/c2048"
    assert predictor.predict(key, batch=32, context=2048) == pytest.approx(
        1.5 * predictor.roofline(key)
    )


def test_stage_two_learns_the_correction_and_beats_the_roofline():
    predictor = decode_predictor()
    for key, b, c, measured in synthetic_runs(predictor, 50, seed=0):
        predictor.observe(key, measured, batch=b, context=c)

    held_out = list(synthetic_runs(predictor, 200, seed=1))
    measured = np.array([m for *_, m in held_out])
    predicted = np.array([predictor.predict(k, batch=b, context=c) for k, b, c, _ in held_out])
    roofline = np.array([predictor.roofline(k) for k, *_ in held_out])
    mape = np.mean(np.abs(measured - predicted) / measured)
    roofline_mape = np.mean(np.abs(measured - roofline) / measured)
    assert mape < 0.02
    assert mape < roofline_mape


def test_a_family_keeps_its_feature_names():
    predictor = decode_predictor()
    predictor.observe("decode/b1/c256", 0.01, batch=1, context=256)
    with pytest.raises(ValueError):
        predictor.predict("decode/b1/c256", batch=1)


def test_error_stats_and_margin_match_numpy_over_the_last_observations():
    history = 40
    predictor = decode_predictor(history=history)
    predicted, measured, seen = [], [], set()
    for key, b, c, m in synthetic_runs(predictor, 70, seed=2, noise=0.05):
        if key in seen:  # a program's first run calibrates it: it is not scored
            predicted.append(predictor.predict(key, batch=b, context=c))
            measured.append(m)
        seen.add(key)
        predictor.observe(key, m, batch=b, context=c)

    p, m = np.array(predicted[-history:]), np.array(measured[-history:])
    rel = (m - p) / p
    stats = predictor.error_stats("decode")
    assert stats["n"] == history
    assert stats["mape"] == pytest.approx(np.mean(np.abs(rel)))
    assert stats["p99_rel_error"] == pytest.approx(np.quantile(rel, 0.99))
    assert stats["bias"] == pytest.approx(np.mean(rel))
    margin = predictor.quantile_error_s("decode", 0.9)
    assert margin == pytest.approx(max(0.0, np.quantile(m - p, 0.9)))
    assert np.mean(m <= p + margin) >= 0.9


def test_a_programs_first_run_calibrates_it_and_is_not_scored():
    predictor = decode_predictor()
    predictor.observe("decode/b1/c256", 0.01, batch=1, context=256)
    predictor.observe("decode/b8/c256", 0.5, batch=8, context=256)  # far off the first's fit
    assert predictor.error_stats("decode")["n"] == 0
    predictor.observe("decode/b1/c256", 0.01, batch=1, context=256)
    assert predictor.error_stats("decode")["n"] == 1


def test_error_stats_of_an_unobserved_family_are_empty():
    stats = Predictor(RATES).error_stats("train")
    assert stats["n"] == 0 and math.isnan(stats["mape"])
    assert Predictor(RATES).quantile_error_s("train") == 0.0


def test_save_and_load_round_trip_predictions_exactly(tmp_path):
    original = decode_predictor(window=32)
    runs = list(synthetic_runs(original, 80, seed=3))
    for key, b, c, m in runs[:60]:
        original.observe(key, m, batch=b, context=c)

    path = tmp_path / "calibration.json"
    original.save(path)
    loaded = Predictor.load(path)

    assert loaded.rates == original.rates
    assert loaded.error_stats("decode") == original.error_stats("decode")
    # Further observations must evolve both alike: the sample window survived the trip.
    for key, b, c, m in runs[60:]:
        assert loaded.predict(key, batch=b, context=c) == original.predict(key, batch=b, context=c)
        loaded.observe(key, m, batch=b, context=c)
        original.observe(key, m, batch=b, context=c)


def test_per_program_residual_follows_what_the_regression_cannot(tmp_path):
    """Host-bound decode as on the H100 (roofline ~0.7 ms, measured ~4 ms): the time depends on
    the rows and pages buckets in ways no linear model of the roofline follows (bucket 4 slower
    than 8, per-page kernel latency). The per-program residual takes stage 2's error from the
    ~10% of a family-wide regression down to the noise."""
    rng = np.random.default_rng(0)
    rows_buckets, pages_buckets = (1, 2, 4, 8, 16), (1, 2, 4, 8)
    quirk = {b: q for b, q in zip(rows_buckets, (1.0, 0.95, 1.15, 1.05, 1.3))}

    def series(predictor, n):
        for _ in range(n):
            rows, pages = int(rng.choice(rows_buckets)), int(rng.choice(pages_buckets))
            key = f"forward/r{rows}/t1/p{pages}"
            truth = (3e-3 + 2e-4 * pages) * quirk[rows] + 1.2 * predictor.roofline(key)
            yield key, rows, truth * (1 + 0.01 * rng.standard_normal())

    def mape(per_key):
        predictor = Predictor(RATES, per_key=per_key)
        for rows in rows_buckets:
            for pages in pages_buckets:
                cost = {"flops": 2e9 * rows, "bytes accessed": 7e8 + 2e6 * rows * pages}
                predictor.register(f"forward/r{rows}/t1/p{pages}", "inference", cost)
        for key, rows, measured in series(predictor, 400):  # warm-up: learn
            predictor.observe(key, measured, rows=rows)
        predictor.clear_errors()
        for key, rows, measured in series(predictor, 400):  # scored online, still learning
            predictor.observe(key, measured, rows=rows)
        return predictor.error_stats("inference")["mape"]

    family_only, per_program = mape(per_key=False), mape(per_key=True)
    assert family_only > 0.05
    assert per_program < 0.02


def test_clear_errors_keeps_the_fit():
    predictor = decode_predictor()
    for key, b, c, m in synthetic_runs(predictor, 40, seed=4):
        predictor.observe(key, m, batch=b, context=c)
    before = predictor.predict("decode/b8/c512", batch=8, context=512)
    predictor.clear_errors()
    assert predictor.error_stats("decode")["n"] == 0
    assert predictor.predict("decode/b8/c512", batch=8, context=512) == before


def test_saved_meta_and_copy(tmp_path):
    original = decode_predictor()
    for key, b, c, m in synthetic_runs(original, 30, seed=5):
        original.observe(key, m, batch=b, context=c)
    path = tmp_path / "profile.json"
    original.save(path, meta={"device": "cpu", "programs": original.keys()})
    loaded, meta = Predictor.load_with_meta(path)
    assert meta["device"] == "cpu" and meta["programs"] == original.keys()
    twin = original.copy()
    key = "decode/b4/c256"
    assert loaded.predict(key, batch=4, context=256) == original.predict(key, batch=4, context=256)
    twin.observe(key, 1.0, batch=4, context=256)  # a copy learns alone
    assert twin.predict(key, batch=4, context=256) != original.predict(key, batch=4, context=256)


def test_a_fit_extrapolating_below_every_measured_ratio_yields_to_the_prior():
    """On the H100 a decode step of one row (roofline 0.08 ms, measured 3 ms, host-bound) sat
    outside a window of wide prefill steps, whose linear fit went negative there; the prediction
    fell to the floor, 37x short. Below the fastest measured ratio the fit is not trusted: the
    prior scaled by the program's own residual predicts it."""
    predictor = Predictor(RATES)
    predictor.register("one-row", "inference", {"flops": 0.0, "bytes accessed": 8e7})
    for tokens in (256, 512, 768, 1024):
        cost = {"flops": 0.0, "bytes accessed": 2e9 * tokens / 256}
        predictor.register(f"prefill/{tokens}", "inference", cost)
    predictor.observe("one-row", 0.003, tokens=1)
    predictor.observe("one-row", 0.003, tokens=1)
    rng = np.random.default_rng(0)
    for _ in range(64):  # wide steps: 1 ms per 256 tokens over 2 ms of roofline, and a steep
        tokens = int(rng.choice((256, 512, 768, 1024)))  # negative intercept in the fit
        measured = 0.004 * tokens / 256 - 0.003
        predictor.observe(
            f"prefill/{tokens}", measured * (1 + 0.01 * rng.standard_normal()), tokens=tokens
        )
    assert predictor.predict("one-row", tokens=1) == pytest.approx(0.003, rel=0.05)


def test_a_rarely_run_program_keeps_its_residual_after_leaving_the_window():
    """A whole-step train program runs once in a while among hundreds of short spans: the
    family's line, fitted on the spans alone, underprices it 4x; its own last run still prices
    it once that run has left the family's window."""
    predictor = Predictor(RATES, window=64)
    predictor.register("span", "train", {"flops": 1e11, "bytes accessed": 1e8})  # 1 ms roofline
    predictor.register("whole", "train", {"flops": 2.2e12, "bytes accessed": 1e8})  # 22 ms
    predictor.observe("span", 0.003)
    predictor.observe("whole", 0.024)
    rng = np.random.default_rng(0)
    for _ in range(200):  # the spans: 3 ms each, with noise; "whole" leaves the window
        predictor.observe("span", 0.003 * (1 + 0.01 * rng.standard_normal()))
    assert predictor.predict("whole") == pytest.approx(0.024, rel=0.05)


def test_a_program_is_never_priced_below_its_own_fastest_run():
    """A program's residual factor is taken at the feature values of its recent runs. Where the
    family's fit is far off there (every recent run right after fine-tune work, where other
    programs ran 25x slower), the factor is off by as much where the fit is right; the
    program's own fastest run still bounds its prediction from below."""
    predictor = Predictor(RATES)
    cost = {"flops": 0.0, "bytes accessed": 1e9}  # 1 ms of roofline
    predictor.register("decode", "inference", cost)
    predictor.register("other", "inference", cost)
    for i in range(64):  # "other": 4 ms, but 100 ms right after fine-tune work
        after = float(i % 2)
        predictor.observe("other", 0.1 if after else 0.004, after_train=after)
    for _ in range(8):  # "decode": 4 ms, and its recent runs all right after fine-tune work
        predictor.observe("decode", 0.004, after_train=1.0)
    assert predictor.predict("decode", after_train=0.0) >= 0.004
