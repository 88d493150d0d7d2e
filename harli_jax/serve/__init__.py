"""The OpenAI-compatible HTTP server (``harli-jax serve``): inference and fine-tuning jobs."""

from harli_jax.serve.app import create_app
from harli_jax.serve.background import BackgroundServer
from harli_jax.serve.contracts import EngineSnapshot, JobEvent, JobInfo, JobService, ServingEngine

__all__ = [
    "BackgroundServer",
    "EngineSnapshot",
    "JobEvent",
    "JobInfo",
    "JobService",
    "ServingEngine",
    "create_app",
]
