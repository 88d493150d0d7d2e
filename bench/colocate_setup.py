"""What a co-location benchmark run is made of (`bench/colocate.py`): its sizes, the loads and
their traces, the fine-tune job and its pre-tokenized data, and the solo measurements the SLO and
the limit are derived from (a decode step alone, fine-tuning alone).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from harli_jax.engine.finetune import FineTuneConfig, FineTuneJob
from harli_jax.engine.sampling import SamplingParams
from harli_jax.llm import LLM
from harli_jax.lora import LoraConfig
from harli_jax.sched.predictor import Predictor
from harli_jax.sched.trace import synthetic_trace

LOADS = {"light": 4, "heavy": 24}  # requests in the decode batch at SLO-long iterations
EOS = 2


@dataclasses.dataclass(frozen=True)
class Setup:
    """Sizes of one benchmark run (`--quick` shrinks them for a CPU smoke run)."""

    max_num_seqs: int = 32
    max_model_len: int = 1024
    page_size: int = 64
    # Prompt tokens one step prefills (vLLM's max_num_batched_tokens). 1024 made TinyLlama's
    # prefill steps alone outlast the 13.4 ms SLO on the H100 (13-16 ms), in every policy.
    max_prefill_tokens: int = 512
    # Of the device, for weights, programs and the arena (None: an arena of twice the KV pages
    # max_num_seqs x max_model_len needs, too small on the H100 to keep a train step's
    # residuals: every backward recomputed its forward).
    memory_fraction: float | None = 0.5
    mean_prompt: int = 128
    mean_output: int = 128
    duration_s: float = 20.0
    ft_rows: int = 4
    ft_seq_len: int = 512
    decode_steps: int = 32  # timed steps per solo batch size
    bursty: bool = False  # Gamma arrivals of coefficient of variation 2, not Poisson
    alone_steps: int = 10


QUICK = Setup(
    max_num_seqs=8, max_model_len=256, mean_prompt=32, mean_output=32, duration_s=4.0,
    ft_seq_len=128, decode_steps=8, alone_steps=2, memory_fraction=None,
)  # fmt: skip


class IdTokenizer:
    """Pre-tokenized data for `PackedBatches`: an example's text is its token ids, space-separated
    (the benchmark checkpoints have no tokenizer.json)."""

    eos_token_ids = (EOS,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(token) for token in text.split()]


class LoggingPredictor(Predictor):
    """A `Predictor` that also logs each run it learns from, with the prediction it was scored
    against: (when, family, measured s, predicted s, rows, prefill tokens, after_train)."""

    def __init__(self, rates) -> None:
        super().__init__(rates)
        self._families_of: dict[str, str] = {}
        self.log: list[tuple[float, str, float, float, float, float, float]] = []

    def register(self, key, family, cost) -> None:
        super().register(key, family, cost)
        self._families_of[key] = family

    def observe(self, key, measured_s, **features):
        predicted_s = super().observe(key, measured_s, **features)
        context = (features.get(name, 0.0) for name in ("rows", "prefill_tokens", "after_train"))
        entry = (time.perf_counter(), self._families_of[key], measured_s, predicted_s, *context)
        self.log.append(entry)
        return predicted_s

    def since(self, start: float) -> tuple[float, float]:
        """Busy seconds of inference steps after `start`, and the mean batch of those decoding."""
        steps = [(e[2], e[4]) for e in self.log if e[0] >= start and e[1] == "inference"]
        batches = [rows for _, rows in steps if rows > 0]
        return sum(s for s, _ in steps), float(np.mean(batches)) if batches else 0.0

    def logged(self, start: float) -> list[tuple]:
        """The log's entries from `start` on, their times counted from it."""
        return [(e[0] - start, *e[1:]) for e in self.log if e[0] >= start]


def write_data(path: Path, vocab_size: int, seq_len: int, examples: int = 400) -> Path:
    """Random-word "text" examples of 1/8 to 1 1/8 rows, as pre-tokenized ids."""
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for _ in range(examples):
            ids = rng.integers(
                EOS + 1, vocab_size, size=rng.integers(seq_len // 8, seq_len * 9 // 8)
            )
            f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")
    return path


def make_job(llm: LLM, data: Path, out_dir: Path, setup: Setup) -> FineTuneJob:
    config = FineTuneConfig(
        data=data,
        out_dir=out_dir,
        lora=LoraConfig(r=16, alpha=32, target_modules=("q_proj", "v_proj")),
        steps=1_000_000,  # never finishes within a run
        batch_size=setup.ft_rows,
        seq_len=setup.ft_seq_len,
        checkpoint_every=1_000_000,  # no checkpoint writes inside the measured runs
    )
    return FineTuneJob(out_dir.name, config, llm.model, IdTokenizer())


def solo_decode_ms(llm: LLM, batch: int, setup: Setup) -> float:
    """Median wall time (ms) of an `EngineCore.step` that only decodes `batch` rows."""
    core, rng = llm.engine, np.random.default_rng(batch)
    params = SamplingParams(max_tokens=setup.decode_steps + 1, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        vocab = core.model_config.vocab_size
        core.add_request(rng.integers(EOS + 1, vocab, size=setup.mean_prompt).tolist(), params)
    times = []
    while core.has_unfinished():
        core.step()
        report = core.last_report
        if report and "+" not in report.key and report.features["rows"] == batch:
            times.append(report.seconds)
    return float(np.median(times)) * 1e3


def finetune_alone(job: FineTuneJob, setup: Setup) -> float:
    """Tokens/s of whole train steps (one program each) with nothing else running."""
    for _ in range(2):  # compiles
        job.train_step()
    start, tokens = time.perf_counter(), 0
    for _ in range(setup.alone_steps):
        tokens += job.train_step()["tokens"]
    return tokens / (time.perf_counter() - start)


def load_rate(load: str, setup: Setup, slo_ms: float) -> float:
    """Arrivals per second at which ``LOADS[load]`` requests decode at SLO-long iterations."""
    return LOADS[load] / (setup.mean_output * slo_ms * 1e-3)


def load_trace(rate: float, duration_s: float, setup: Setup, seed: int) -> list:
    return synthetic_trace(
        rate,
        duration_s,
        max_len=setup.max_model_len,
        seed=seed,
        bursty=setup.bursty,
        mean_prompt=setup.mean_prompt,
        mean_output=setup.mean_output,
    )
