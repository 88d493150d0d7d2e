"""Scheduling: the two-stage latency predictor that the scheduler's decisions rest on."""

from harli_jax.sched.predictor import Predictor
from harli_jax.sched.roofline import DeviceRates, measure_device_rates, roofline_seconds

__all__ = ["DeviceRates", "Predictor", "measure_device_rates", "roofline_seconds"]
