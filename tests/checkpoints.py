"""Tiny Hugging Face checkpoints with random weights, written by transformers, for tests.

`save_checkpoint(dir, family)` writes what a Hub download holds (config.json, safetensors weights,
optionally sharded with an index, generation_config.json, tokenizer.json, tokenizer_config.json) for
four model families at toy size, so loaders and models are tested against transformers itself.
Weights are drawn with a much larger spread than HF's initialisation (and norm scales and biases are
random too), so logits are far from uniform and greedy decoding paths are meaningful.

The tokenizer is a byte-level BPE trained on tests/data/corpus.txt, once per process.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
FAMILIES = ("llama", "llama3", "mistral", "qwen2")
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Llama-3-like: BOS once, a role header per turn, "<|end|>" closing each turn. The indented block
# tags only render as intended under trim_blocks/lstrip_blocks, as transformers sets them.
CHAT_TEMPLATE = """\
{{ bos_token }}{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('Unknown role: ' ~ message['role']) }}
  {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}<|end|>
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

_TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
)
_FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=False),
    "llama3": dict(
        model_type="llama",
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(
        model_type="mistral", rope_theta=10000.0, tie_word_embeddings=False, sliding_window=None
    ),
    "qwen2": dict(
        model_type="qwen2",
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
    ),
}


@functools.cache
def _trained_bpe_json(vocab_size: int) -> str:
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train([str(CORPUS)], trainer)
    bos = SPECIAL_TOKENS[0]
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))]
    )
    return bpe.to_str()


def train_tokenizer(vocab_size: int = 512) -> tokenizers.Tokenizer:
    """A byte-level BPE over the test corpus with SPECIAL_TOKENS (ids 0..6) that prepends <s>.

    Deterministic; trained once per process and vocabulary size."""
    return tokenizers.Tokenizer.from_str(_trained_bpe_json(vocab_size))


def save_tokenizer(backend: tokenizers.Tokenizer, out_dir: str | Path) -> None:
    """Writes tokenizer.json and tokenizer_config.json (special tokens, CHAT_TEMPLATE) to `out_dir`,
    in the layout that `transformers.AutoTokenizer.from_pretrained` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        # Older checkpoints serialise tokens as AddedToken dicts; keep one so readers handle both.
        "eos_token": {
            "__type": "AddedToken",
            "content": "</s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def stop_token_ids(backend: tokenizers.Tokenizer) -> list[int]:
    """The ids generation stops on: </s> and the chat end-of-turn token <|end|>."""
    return [backend.token_to_id("</s>"), backend.token_to_id("<|end|>")]


def save_checkpoint(
    out_dir: str | Path,
    family: str,
    *,
    sharded: bool = False,
    with_tokenizer: bool = True,
    seed: int = 0,
    config_format: str = "hub",
    **config_overrides: Any,
) -> Path:
    """Writes a tiny random `family` checkpoint (see FAMILIES) to `out_dir` and returns its path.

    `sharded` splits the weights into several safetensors files plus model.safetensors.index.json.
    `config_format` "hub" writes RoPE settings as `rope_theta` and `rope_scaling`, as nearly every
    checkpoint on the Hub has them; "transformers5" keeps the `rope_parameters` dict that
    transformers 5 writes. `config_overrides` (such as num_hidden_layers=3) go to the config.
    The vocabulary is the tokenizer's even when `with_tokenizer` is False.
    """
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if config_format not in ("hub", "transformers5"):
        raise ValueError(f"config_format must be 'hub' or 'transformers5', not {config_format!r}")
    out_dir = Path(out_dir)
    backend = train_tokenizer()
    stop_ids = stop_token_ids(backend)
    config = transformers.AutoConfig.for_model(
        **{
            **_FAMILY_CONFIGS[family],
            **_TINY,
            "vocab_size": backend.get_vocab_size(),
            "bos_token_id": backend.token_to_id("<s>"),
            "eos_token_id": stop_ids[0],
            "pad_token_id": backend.token_to_id("<pad>"),
            **config_overrides,
        }
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed, config.initializer_range)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=stop_ids, pad_token_id=config.pad_token_id
    )
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out_dir, max_shard_size=n_bytes // 3 if sharded else "1GB")
    if config_format == "hub":
        to_hub_config(out_dir / "config.json")
    if with_tokenizer:
        save_tokenizer(backend, out_dir)
    return out_dir


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    # Drawn in name order from one seeded generator, so the weights depend on the seed alone, not on
    # transformers' initialisation order; tied parameters appear once in named_parameters().
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.copy_(0.5 + torch.rand(param.shape, generator=gen))
        else:
            param.copy_(std * torch.randn(param.shape, generator=gen))


def to_hub_config(path: Path) -> None:
    """Rewrites a config.json saved by transformers 5 in the layout of Hub checkpoints (saved by
    transformers 4): `rope_theta` and `rope_scaling` instead of `rope_parameters`."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
