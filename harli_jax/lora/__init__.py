"""LoRA adapters: configuration, injection into NNX models, training in micro-steps, data, the
optimiser and the HF PEFT format. Job checkpoints live in `harli_jax.lora.checkpoint` (it imports
Orbax, which only jobs need)."""

from harli_jax.lora.config import ALL_LINEAR, LoraConfig
from harli_jax.lora.data import DataError, PackedBatches, load_jsonl
from harli_jax.lora.inject import (
    LoraLinear,
    adapter_weights,
    clear_slot,
    inject_lora,
    load_adapter_weights,
    lora_layers,
    set_dropout_keys,
    set_slots,
)
from harli_jax.lora.optim import make_optimizer
from harli_jax.lora.peft_io import AdapterWeights, load_adapter, save_adapter
from harli_jax.lora.train import MicroStep, ProgramCache, Trainer, TrainPlan, loss_fn

__all__ = [
    "ALL_LINEAR",
    "AdapterWeights",
    "DataError",
    "LoraConfig",
    "LoraLinear",
    "MicroStep",
    "PackedBatches",
    "ProgramCache",
    "TrainPlan",
    "Trainer",
    "adapter_weights",
    "clear_slot",
    "inject_lora",
    "load_adapter",
    "load_adapter_weights",
    "load_jsonl",
    "lora_layers",
    "loss_fn",
    "make_optimizer",
    "save_adapter",
    "set_dropout_keys",
    "set_slots",
]
