"""Request traces: when requests arrive and how long their prompts and outputs are.

Synthetic traces follow the shapes co-serving papers use: Poisson arrivals, or bursty ones
(Gamma inter-arrival times with a coefficient of variation above 1, as in BurstGPT), and
ShareGPT-like log-normal prompt and output lengths clipped to the model's context. A trace file is
jsonl, one ``{"arrival_s": float, "prompt_tokens": int, "output_tokens": int}`` per request.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class TracedRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def synthetic_trace(
    rate: float,
    duration_s: float,
    *,
    max_len: int,
    bursty: bool = False,
    seed: int = 0,
    mean_prompt: float = 160.0,
    mean_output: float = 200.0,
) -> list[TracedRequest]:
    """Requests arriving at ``rate`` per second for ``duration_s``; lengths fit ``max_len``."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate=}, {duration_s=}")
    rng = np.random.default_rng(seed)
    cv = 2.0 if bursty else 1.0  # Gamma with shape 1/cv^2 has this coefficient of variation
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=int(rate * duration_s * 2) + 16)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < duration_s]
    # ShareGPT's lengths are heavy-tailed: log-normal with sigma ~1 fits them roughly.
    prompts = _lognormal(rng, mean_prompt, 1.0, len(arrivals))
    outputs = _lognormal(rng, mean_output, 0.8, len(arrivals))
    prompts = np.clip(prompts, 4, max_len // 2)
    outputs = np.clip(outputs, 4, max_len - prompts - 1)
    return [TracedRequest(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    mu = np.log(mean) - sigma**2 / 2
    return np.rint(rng.lognormal(mu, sigma, size=n)).astype(int)


def load_trace(path: str | Path) -> list[TracedRequest]:
    """Reads a jsonl trace; a bad line raises ValueError naming the file and line."""
    requests = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            request = TracedRequest(
                float(row["arrival_s"]), int(row["prompt_tokens"]), int(row["output_tokens"])
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: not a trace row ({err})") from None
        if request.prompt_tokens < 1 or request.output_tokens < 1 or request.arrival_s < 0:
            raise ValueError(f"{path}:{number}: lengths must be >= 1 and arrival_s >= 0")
        requests.append(request)
    return sorted(requests, key=lambda r: r.arrival_s)


def save_trace(requests: list[TracedRequest], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in requests))
