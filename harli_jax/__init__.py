"""harli-jax: co-located LoRA fine-tuning and LLM serving on one GPU, in JAX."""

from harli_jax.engine.output import RequestOutput
from harli_jax.engine.sampling import SamplingParams
from harli_jax.llm import LLM

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
