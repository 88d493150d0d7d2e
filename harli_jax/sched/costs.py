"""Stage-1 costs of programs, and the report an inference step leaves for the scheduler.

A program's cost is XLA's own ``compiled.cost_analysis()`` where XLA can price it. Where it
cannot (it reports -1, or nothing, e.g. for a program that is one library call on GPU), the
analytic count below stands in: matmul flops of the weights each token meets, attention flops,
and the bytes of the weights and KV pages read once.
"""

from __future__ import annotations

import dataclasses
import time

import jax

from harli_jax.models.config import ModelConfig

Cost = dict[str, float]


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One inference step as the predictor sees it: program key, cost, features, measured time,
    and when it ended (``time.perf_counter``): the next token's deadline counts from there."""

    key: str
    cost: Cost
    features: dict[str, float]
    seconds: float
    ended_at: float = dataclasses.field(default_factory=time.perf_counter)


def compiled_cost(compiled: jax.stages.Compiled, fallback: Cost) -> Cost:
    """XLA's cost analysis of ``compiled``, or ``fallback`` where XLA could not price it."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = float((analysis or {}).get("flops", -1))
    bytes_accessed = float((analysis or {}).get("bytes accessed", -1))
    if flops <= 0 or bytes_accessed <= 0:
        return fallback
    return {"flops": flops, "bytes accessed": bytes_accessed}


def weight_count(config: ModelConfig) -> int:
    """Parameters every token's forward pass multiplies by (embedding gather excluded)."""
    c = config
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * (attention + mlp) + c.hidden_size * c.vocab_size


def forward_cost(
    config: ModelConfig, rows: int, tokens: int, context: int, dtype_bytes: int
) -> Cost:
    """A forward pass of ``rows`` x ``tokens`` new tokens attending to ``context`` keys each."""
    c = config
    weights = weight_count(c)
    attention_flops = 4 * rows * tokens * context * c.num_heads * c.head_dim * c.num_layers
    kv_bytes = 2 * rows * context * c.num_kv_heads * c.head_dim * c.num_layers * dtype_bytes
    activation_bytes = 4 * rows * tokens * c.hidden_size * c.num_layers * dtype_bytes
    return {
        "flops": float(2 * weights * rows * tokens + attention_flops),
        "bytes accessed": float(weights * dtype_bytes + kv_bytes + activation_bytes),
    }


def train_cost(config: ModelConfig, key: tuple, dtype_bytes: int) -> Cost:
    """Analytic cost of a LoRA train program named by its ``Trainer`` key: ``("fwd" | "bwd",
    place, layers, rows, seq_len, mode)`` (with ``"x<n>"`` after it: n such spans in one
    program), ``("head" | "step", rows, seq_len)``, or an optimiser program (``("update",)``:
    a LoRA-sized pass, priced as one layer's bytes)."""
    kind = key[0]
    per_layer = dataclasses.replace(config, num_layers=1, vocab_size=0)
    if kind in ("fwd", "bwd"):
        _, _, layers, rows, seq_len, mode, *fused = key
        spans = int(fused[0][1:]) if fused else 1
        one = forward_cost(per_layer, rows, seq_len, seq_len, dtype_bytes)
        # A backward is two matmuls per forward one, after the forward again where recomputed.
        factor = 1 if kind == "fwd" else 2 + (mode == "recomputed")
        return {name: value * layers * spans * factor for name, value in one.items()}
    if kind in ("head", "step"):
        rows, seq_len = key[1], key[2]
        if kind == "step":
            whole = forward_cost(config, rows, seq_len, seq_len, dtype_bytes)
            return {name: 3 * value for name, value in whole.items()}
        flops = 6 * rows * seq_len * config.hidden_size * config.vocab_size
        return {
            "flops": float(flops),
            "bytes accessed": float(config.hidden_size * config.vocab_size * dtype_bytes),
        }
    weights = weight_count(per_layer)
    return {"flops": float(weights), "bytes accessed": float(weights * dtype_bytes)}
