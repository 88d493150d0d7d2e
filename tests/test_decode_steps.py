"""Several decode steps in one program (`make_decode_steps`) against as many single steps of the
engine's program (`make_forward_step`), each fed the token the step before it drew."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from harli_jax.engine.sampling import SamplerInputs, SamplingParams
from harli_jax.engine.steps import make_decode_steps, make_forward_step
from harli_jax.memory.kv_cache import KVCache, PagedBatch
from harli_jax.models.loading import from_pretrained

PAGE, ROWS, WIDTH, STEPS = 4, 3, 6, 5


def _cache(model) -> KVCache:
    cfg = model.config
    shape = (cfg.num_layers, ROWS * WIDTH + 1, PAGE, cfg.num_kv_heads, cfg.head_dim)
    rng = np.random.default_rng(0)  # a random "prefilled" cache, the same for both runs
    return KVCache(jnp.asarray(rng.standard_normal(shape)), jnp.asarray(rng.standard_normal(shape)))


def test_decode_steps_in_one_program_equal_single_steps(checkpoint):
    model = from_pretrained(checkpoint("llama"), jnp.float32)
    graphdef, state = nnx.split(model)
    table = jnp.arange(1, ROWS * WIDTH + 1, dtype=jnp.int32).reshape(ROWS, WIDTH)
    tokens = jnp.array([3, 17, 42], jnp.int32)
    positions = jnp.array([2, 9, 13], jnp.int32)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1)] * 2
    sampler = SamplerInputs(
        *map(jnp.asarray, SamplerInputs.build(params[:ROWS], [5, 6, 7], [0, 4, 2], ROWS))
    )

    _, many = make_decode_steps(graphdef, STEPS)(
        state, _cache(model), tokens, positions, table, sampler
    )

    step, cache, drawn, logprobs = make_forward_step(graphdef), _cache(model), [], []
    for i in range(STEPS):
        pos = positions + i
        slots = table[jnp.arange(ROWS), pos // PAGE] * PAGE + pos % PAGE
        paged = PagedBatch(slots[:, None], table)
        cache, out = step(
            state, cache, tokens[:, None], pos[:, None], paged, jnp.zeros(ROWS, jnp.int32),
            sampler._replace(step=sampler.step + i), None,
        )  # fmt: skip
        tokens = out.tokens
        drawn.append(out.tokens)
        logprobs.append(out.logprobs)
    np.testing.assert_array_equal(many.tokens, np.stack(drawn))
    np.testing.assert_allclose(many.logprobs, np.stack(logprobs), atol=1e-5)
