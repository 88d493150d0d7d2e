"""LoRA hyper-parameters and their HF PEFT ``adapter_config.json`` form.

This module owns `LoraConfig`: validation of the fields, the `scaling` factor the forward pass
applies to ``(x @ A) @ B``, and conversion to and from the PEFT config dictionary, including the
refusal of PEFT features this engine cannot serve (DoRA, trained biases, per-module ranks, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The seven linear layers of a Llama-family decoder block, in HF naming.
ALL_LINEAR: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# PEFT fields that change the adapter's maths or add tensors we do not load. Each is accepted only
# at its "off" value; anything else is refused, because silently ignoring it would serve a model
# that differs from the one that was trained.
_UNSUPPORTED_PEFT_FIELDS: tuple[str, ...] = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "use_qalora",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "kasa_config",
    "monteclora_config",
    "velora_config",
)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter hyper-parameters.

    `target_modules` names HF linear layers (``"q_proj"``, ...); ``"all-linear"`` expands to all
    seven of `ALL_LINEAR`. A list is accepted and stored as a tuple, so configs stay hashable.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"LoraConfig.alpha must be a number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", _expand_targets(self.target_modules))

    @property
    def scaling(self) -> float:
        """Factor applied to the adapter's output: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self, base_model_name_or_path: str = "") -> dict[str, Any]:
        """The ``adapter_config.json`` contents PEFT writes for this config."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or None,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_dora": False,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        """Parse an ``adapter_config.json`` dictionary, refusing features we cannot serve."""
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"peft_type is {peft_type!r}; only 'LORA' adapters are supported")
        bias = d.get("bias", "none")
        if bias != "none":
            raise ValueError(f"bias is {bias!r}; only bias='none' adapters are supported")
        for field in _UNSUPPORTED_PEFT_FIELDS:
            if d.get(field):
                raise ValueError(f"{field} is {d[field]!r}; this PEFT feature is not supported")
        missing = [f for f in ("r", "lora_alpha", "target_modules") if f not in d]
        if missing:
            raise ValueError(f"a LoRA config needs the fields {missing}")
        targets = d["target_modules"]
        if isinstance(targets, str) and targets != "all-linear":
            # PEFT treats any other string as a regular expression over full module paths.
            raise ValueError(
                f"target_modules is the regular expression {targets!r}; only a list of module "
                f"names or 'all-linear' is supported"
            )
        return cls(
            r=d["r"],
            alpha=d["lora_alpha"],
            dropout=d.get("lora_dropout", 0.0),
            target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
            use_rslora=bool(d.get("use_rslora", False)),
        )


def _expand_targets(targets: Any) -> tuple[str, ...]:
    """Validate target module names and expand ``"all-linear"``."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError("LoraConfig.target_modules must name at least one module")
    if "all-linear" in targets:
        return ALL_LINEAR
    unknown = [t for t in targets if t not in ALL_LINEAR]
    if unknown:
        raise ValueError(
            f"LoraConfig.target_modules has unsupported names {unknown}; "
            f"choose from {list(ALL_LINEAR)} or 'all-linear'"
        )
    if len(set(targets)) != len(targets):
        raise ValueError(f"LoraConfig.target_modules has duplicates: {list(targets)}")
    return targets
