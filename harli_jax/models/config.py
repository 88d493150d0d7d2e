"""The decoder's hyper-parameters, read from a Hugging Face ``config.json``.

Owns the mapping from the HF config dialects (transformers 4 ``rope_theta``/``rope_scaling`` and
transformers 5 ``rope_parameters``; Llama, Mistral and Qwen2 field names) to one frozen
:class:`ModelConfig`, and the errors for checkpoints we cannot run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file (and tensor)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("default" | "linear" | "llama3", parameters) as a hashable tuple of items.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    architecture: str = "LlamaForCausalLM"

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Builds the config from a parsed HF ``config.json``; ``source`` names it in errors."""
        archs = hf.get("architectures") or [_ARCH_BY_MODEL_TYPE.get(hf.get("model_type", ""), "")]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{source}: unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(hf["hidden_size"])
            num_heads = int(hf["num_attention_heads"])
            rope = _rope_parameters(hf)
            is_qwen2 = arch == "Qwen2ForCausalLM"
            window = hf.get("sliding_window")
            if is_qwen2 and not hf.get("use_sliding_window", False):
                window = None
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.pop("rope_theta", 10000.0)),
                rope_scaling=tuple(sorted(rope.items())),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
                o_bias=not is_qwen2 and bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
                architecture=arch,
            )
        except KeyError as missing:
            raise CheckpointError(f"{source}: missing field {missing}") from None

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> ModelConfig:
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (is {checkpoint_dir} an HF checkpoint?)")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: invalid JSON ({err})") from None
        return cls.from_hf(hf, source=str(path))


_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """Normalises transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "type" in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if params["rope_type"] not in ("default", "linear", "llama3"):
        raise CheckpointError(f"config.json: unsupported rope type {params['rope_type']!r}")
    return params
