"""What calibration records and the keys the predictor knows programs by.

Owns :class:`Calibration` (each cut's micro-steps, each train program's slowest calibrated run,
the inference steps' times: plain data a profile file or a benchmark hands to a fresh scheduler),
and the names: a job's LoRA shape, a train program's predictor key, a cut's id, and an inference
step's stage-2 features.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from harli_jax.engine.finetune import FineTuneJob, Granularity
from harli_jax.sched.costs import StepReport


@dataclasses.dataclass
class Calibration:
    """What calibration measured beyond the predictor's samples: each cut's micro-steps (program
    keys, in run order), each train program's slowest calibrated run, the inference steps'
    times, and the SLO backoff (:class:`~harli_jax.sched.backoff.SloBackoff`) a co-located
    warm-up settled at (0 where none ran). Plain data, so a profile file or a benchmark can hand
    it to a fresh scheduler."""

    cuts: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    inference_s: list[float] = dataclasses.field(default_factory=list)
    slo_backoff_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        return cls(
            cuts={k: list(v) for k, v in data.get("cuts", {}).items()},
            seconds={k: float(v) for k, v in data.get("seconds", {}).items()},
            inference_s=[float(s) for s in data.get("inference_s", [])],
            slo_backoff_s=float(data.get("slo_backoff_s", 0.0)),
        )

    def copy(self) -> Calibration:
        return Calibration.from_json(self.to_json())


def job_shape(job: FineTuneJob) -> str:
    """What a train program's time depends on beyond its micro-step: LoRA rank and targets
    (dropout, if any), and the batch's rows x seq_len. E.g. ``r16-q_proj.v_proj-4x512``."""
    lora = job.config.lora
    targets = lora.target_modules
    targets = targets if isinstance(targets, str) else ".".join(targets)
    dropout = f"-d{lora.dropout:g}" if lora.dropout else ""
    return f"r{lora.r}-{targets}{dropout}-{job.config.batch_size}x{job.config.seq_len}"


def train_key(shape: str, program_key: tuple) -> str:
    """The predictor's key of a train program: ``train/<shape>/<kind>/...``."""
    return f"train/{shape}/" + "/".join(str(part) for part in program_key)


_PROGRAM = re.compile(r"r(\d+)/t(\d+)/p(\d+)")


def inference_features(report: StepReport, after_train: bool) -> dict[str, float]:
    """The stage-2 features of an inference step: the engine's (decode rows, prefill tokens),
    the number of programs it ran (each costs a dispatch and a host round trip), the pages
    bucket of its decode program (the paged-attention kernel's latency grows with it even where
    the KV bytes, and so the roofline, barely do), and whether fine-tune work ran just before it
    (``after_train``: on the H100 such steps took 0.3-0.5 ms more at the median, 1.5-2 ms more at
    the 90th percentile, than the same program after another inference step)."""
    programs = [_PROGRAM.search(part) for part in report.key.split("+")]
    decode_pages = [int(m.group(3)) for m in programs if m is not None and m.group(2) == "1"]
    return {
        **report.features,
        "calls": float(len(programs)),
        "decode_pages": float(decode_pages[0]) if decode_pages else 0.0,
        "after_train": float(after_train),
    }


def option_id(job: FineTuneJob, option: Granularity) -> str:
    """A cut's name in :attr:`Calibration.cuts`: the job's shape, then the cut's token chunks
    and layer spans, e.g. ``r16-q_proj.v_proj-4x512|1|0-11,11-22``."""
    return f"{job_shape(job)}|{option[0]}|" + ",".join(f"{a}-{b}" for a, b in option[1])
