"""The public offline API: ``LLM(dir).generate(...)`` and ``LLM(dir).logits(...)``.

Owns turning user inputs (strings or token ids, one or many) into engine requests and engine
outputs back into results in the caller's order. Everything device-side lives in the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from harli_jax.engine.core import EngineConfig, EngineCore
from harli_jax.engine.output import RequestOutput
from harli_jax.engine.sampling import SamplingParams
from harli_jax.engine.steps import bucket, make_score
from harli_jax.lora.peft_io import load_adapter
from harli_jax.models.config import ModelConfig
from harli_jax.models.loading import from_pretrained
from harli_jax.models.sharding import cache_sharding, make_mesh, param_sharding
from harli_jax.models.tokenizer import Tokenizer

DEMO_DIR = Path(__file__).parent / "assets" / "demo"

Prompt = str | Sequence[int]


class LLM:
    """A model loaded from a HF checkpoint directory, ready to generate and score."""

    def __init__(
        self,
        model: str | Path,
        dtype: str = "bfloat16",
        *,
        max_num_seqs: int = 32,
        max_model_len: int | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        prefill_chunk: int = 256,
        max_prefill_tokens: int = 1024,
        max_loras: int = 4,
        max_lora_rank: int = 16,
        tensor_parallel: int = 1,
        memory_fraction: float | None = None,
        reserve_bytes: int = 0,
    ):
        """``max_loras`` adapters of rank <= ``max_lora_rank`` can be served at once (0 serves
        the base model alone, a little faster); a step prefills at most ``max_prefill_tokens``
        prompt tokens, at most ``prefill_chunk`` of each sequence; ``tensor_parallel=N`` shards
        the model and the KV cache over the first N devices. ``memory_fraction`` (of the
        device's memory, for weights, programs and the arena together) sizes the arena when
        ``num_pages`` is not given, leaving ``reserve_bytes`` for other programs (a fine-tune
        job's micro-steps)."""
        self.model_dir = Path(model)
        self.dtype = jnp.dtype(dtype)
        shard_param = shard_cache = None
        if tensor_parallel > 1:
            config = ModelConfig.from_dir(self.model_dir)
            mesh = make_mesh(tensor_parallel, config)
            shard_param = functools.partial(param_sharding, mesh=mesh, config=config)
            shard_cache = cache_sharding(mesh)
        self.model = from_pretrained(self.model_dir, self.dtype, sharding_for=shard_param)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.engine = EngineCore(
            self.model,
            self.tokenizer,
            EngineConfig(
                max_num_seqs=max_num_seqs,
                page_size=page_size,
                num_pages=num_pages,
                max_model_len=max_model_len,
                prefill_chunk=prefill_chunk,
                max_prefill_tokens=max_prefill_tokens,
                max_loras=max_loras,
                max_lora_rank=max_lora_rank,
                memory_fraction=memory_fraction,
                reserve_bytes=reserve_bytes,
            ),
            cache_sharding=shard_cache,
        )
        self._score = make_score(self.engine.graphdef)

    @classmethod
    def demo(cls, **kwargs) -> LLM:
        """The tiny model that ships with the package (see ``harli_jax/assets/demo/README.md``)."""
        kwargs.setdefault("dtype", "float32")
        return cls(DEMO_DIR, **kwargs)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Serves the HF PEFT adapter in ``path`` as ``name``: ``SamplingParams(adapter=name)``.
        Loading again under the same name replaces it; nothing is recompiled."""
        weights, config = load_adapter(path)
        self.engine.load_adapter(name, weights, config)

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer.json: pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (batched continuously); results in the prompts' order."""
        prompts = _as_prompt_list(prompts)
        params = params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = [self.engine.add_request(self.encode(p), sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def logits(self, sequences: Sequence[Sequence[int]], adapter: str | None = None) -> list:
        """Full-sequence scoring: a float32 [T, vocab] numpy array per sequence of token ids,
        through adapter ``adapter`` if given (see :meth:`load_adapter`)."""
        slot = self.engine.adapter_slot(adapter)
        lengths = [len(s) for s in sequences]
        width = bucket(max(lengths), smallest=16)
        tokens = np.zeros((bucket(len(sequences)), width), np.int32)
        for row, seq in enumerate(sequences):
            tokens[row, : len(seq)] = seq
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
        slot_ids = None if self.engine.adapters is None else np.full(len(tokens), slot, np.int32)
        logits = np.asarray(self._score(self.engine.state, tokens, positions, slot_ids))
        return [logits[row, :n] for row, n in enumerate(lengths)]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if len(prompts) and isinstance(prompts[0], (int, np.integer)):
        return [prompts]
    return list(prompts)
