"""Specification of LoraConfig and the HF PEFT adapter format, checked against peft itself."""

from __future__ import annotations

import json
import math

import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harli_jax.lora.config import ALL_LINEAR, LoraConfig
from harli_jax.lora.peft_io import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter

TARGETS = ("q_proj", "v_proj", "down_proj")
# (in_features, out_features) of each target in the tiny Llama below (GQA: v_proj is 64 -> 32).
SHAPES = {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (128, 64)}
KEY = "base_model.model.model.{}.lora_{}.weight"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
    )
    return LlamaForCausalLM(config)


def module_path(layer: int, name: str) -> str:
    block = "mlp" if name.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
    return f"layers.{layer}.{block}.{name}"


def random_weights(r: int, dtype=np.float32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(2):
        for name in TARGETS:
            fan_in, fan_out = SHAPES[name]
            a = rng.standard_normal((fan_in, r)).astype(dtype)
            b = rng.standard_normal((r, fan_out)).astype(dtype)
            weights[module_path(layer, name)] = (a, b)
    return weights


def peft_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}


def test_load_adapter_reads_peft_saved_adapter_exactly(tmp_path):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False)
    model = peft.get_peft_model(tiny_llama(), lora)
    model.save_pretrained(tmp_path)
    expected = peft_state(model)

    weights, config = load_adapter(tmp_path)

    assert config == LoraConfig(r=4, alpha=8, target_modules=config.target_modules)
    assert set(config.target_modules) == set(TARGETS)
    assert len(weights) == len(expected) // 2 == 6
    for path, (a, b) in weights.items():
        np.testing.assert_array_equal(a, expected[KEY.format(path, "A")].T)
        np.testing.assert_array_equal(b, expected[KEY.format(path, "B")].T)
        assert np.any(b != 0)  # init_lora_weights=False: a non-trivial adapter


def test_saved_adapter_loads_in_peft_with_same_tensors_and_scaling(tmp_path):
    config = LoraConfig(r=4, alpha=32, target_modules=TARGETS, use_rslora=True)
    weights = random_weights(r=4)
    # No base_model name: peft would try to fetch its config.json from the Hub.
    save_adapter(tmp_path / "adapter", weights, config)

    model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")

    state = peft_state(model)
    assert len(state) == 2 * len(weights)
    for path, (a, b) in weights.items():
        np.testing.assert_array_equal(state[KEY.format(path, "A")], a.T)
        np.testing.assert_array_equal(state[KEY.format(path, "B")], b.T)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(32 / math.sqrt(4)) == config.scaling


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_save_then_load_round_trips_exactly(tmp_path, dtype):
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    config = LoraConfig(r=2, alpha=4, target_modules=TARGETS)
    weights = random_weights(r=2, dtype=dtype)

    save_adapter(tmp_path, weights, config)
    loaded, loaded_config = load_adapter(tmp_path)

    assert loaded_config == config
    assert loaded.keys() == weights.keys()
    for path, (a, b) in weights.items():
        assert loaded[path][0].dtype == loaded[path][1].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(loaded[path][0], a)
        np.testing.assert_array_equal(loaded[path][1], b)


def test_save_replaces_a_previous_adapter(tmp_path):
    config = LoraConfig(r=2, target_modules=TARGETS)
    save_adapter(tmp_path / "out", random_weights(r=2, seed=1), config)
    newer = random_weights(r=2, seed=2)

    save_adapter(tmp_path / "out", newer, config)

    loaded, _ = load_adapter(tmp_path / "out")
    path = "layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(loaded[path][0], newer[path][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left behind


def test_save_refuses_to_replace_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_adapter(tmp_path, random_weights(r=2), LoraConfig(r=2, target_modules=TARGETS))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_save_rejects_a_module_outside_target_modules(tmp_path):
    config = LoraConfig(r=2, target_modules=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match="down_proj"):
        save_adapter(tmp_path, random_weights(r=2), config)


def test_saved_config_records_the_base_model(tmp_path):
    save_adapter(tmp_path, random_weights(r=2), LoraConfig(r=2, target_modules=TARGETS), "m/x")
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["base_model_name_or_path"] == "m/x"


def write_adapter(root, tensors: dict[str, np.ndarray], **config) -> None:
    peft_dict = LoraConfig(r=4, target_modules=TARGETS).to_peft_dict() | config
    (root / CONFIG_FILE).write_text(json.dumps(peft_dict))
    safetensors.numpy.save_file(tensors, str(root / WEIGHTS_FILE))


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_adapter(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(LoraConfig().to_peft_dict()))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_adapter(tmp_path)


def test_load_names_a_lora_a_without_lora_b(tmp_path):
    path = "layers.0.self_attn.q_proj"
    write_adapter(tmp_path, {KEY.format(path, "A"): np.zeros((4, 64), np.float32)})
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE}.*{KEY.format(path, 'A')}.*no matching"):
        load_adapter(tmp_path)


def test_load_names_a_rank_mismatch_between_a_and_b(tmp_path):
    path = "layers.1.mlp.down_proj"
    tensors = {
        KEY.format(path, "A"): np.zeros((4, 128), np.float32),
        KEY.format(path, "B"): np.zeros((64, 8), np.float32),
    }
    write_adapter(tmp_path, tensors)
    with pytest.raises(ValueError, match=rf"rank mismatch for '{path}'.*\[4, 128\].*\[64, 8\]"):
        load_adapter(tmp_path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("bias", "lora_only"),
        ("use_dora", True),
        ("modules_to_save", ["lm_head"]),
        ("rank_pattern", {"q_proj": 8}),
        ("alpha_pattern", {"q_proj": 8}),
    ],
)
def test_load_refuses_peft_features_we_cannot_serve(tmp_path, field, value):
    write_adapter(tmp_path, {}, **{field: value})
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE}: {field}"):
        load_adapter(tmp_path)


@pytest.mark.parametrize(
    "kwargs, use_rslora, expected",
    [({"r": 8, "alpha": 16}, False, 2.0), ({"r": 16, "alpha": 8}, True, 2.0)],
)
def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora(kwargs, use_rslora, expected):
    assert LoraConfig(**kwargs, use_rslora=use_rslora).scaling == expected


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": ("q_proj", "lm_head")}, "target_modules"),
        ({"target_modules": ()}, "target_modules"),
    ],
)
def test_invalid_config_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        LoraConfig(**kwargs)


def test_all_linear_expands_to_the_seven_projections():
    config = LoraConfig(target_modules=["all-linear"])
    assert config.target_modules == ALL_LINEAR
    assert len(set(config.target_modules)) == 7


def test_peft_dict_round_trips_and_peft_parses_it():
    config = LoraConfig(r=4, alpha=8.0, dropout=0.1, target_modules=("k_proj", "o_proj"))
    d = config.to_peft_dict("some/model")

    assert LoraConfig.from_peft_dict(d) == config
    parsed = peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
    assert (parsed.r, parsed.lora_alpha, parsed.lora_dropout) == (4, 8.0, 0.1)
    assert set(parsed.target_modules) == {"k_proj", "o_proj"}


def test_peft_regex_target_modules_are_refused():
    d = LoraConfig().to_peft_dict() | {"target_modules": r".*\.q_proj"}
    with pytest.raises(ValueError, match="regular expression"):
        LoraConfig.from_peft_dict(d)
