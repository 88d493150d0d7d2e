"""Serving LoRA adapters: PEFT-made adapters give PEFT's logits through `LLM.load_adapter`, and
requests for different adapters share one decode batch with nothing recompiled."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from compilations import counting_compilations
from flax import nnx
from transformers import AutoModelForCausalLM

from harli_jax import LLM, SamplingParams
from harli_jax.lora.inject import lora_layers


def make_peft_adapter(checkpoint_dir, out_dir, seed: int, r: int, targets: list[str]):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory):
    ckpt = checkpoint("llama")
    root = tmp_path_factory.mktemp("adapters")
    made = {
        "qv": make_peft_adapter(ckpt, root / "qv", 1, 4, ["q_proj", "v_proj"]),
        "mlp": make_peft_adapter(ckpt, root / "mlp", 2, 8, ["gate_proj", "up_proj", "down_proj"]),
    }
    return ckpt, root, made


def test_peft_adapter_gives_peft_logits(adapters):
    ckpt, root, made = adapters
    llm = LLM(ckpt, dtype="float32")
    tokens = [3, 14, 15, 92, 65, 35, 89, 79]
    for name, model in made.items():
        llm.load_adapter(name, root / name)
        with torch.no_grad():
            ref = model(torch.tensor([tokens])).logits[0].numpy()
        ours = llm.logits([tokens], adapter=name)[0]
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4
    base = llm.logits([tokens])[0]
    assert not np.allclose(base, llm.logits([tokens], adapter="qv")[0], atol=1e-3)


def test_mixed_adapter_batch_equals_each_request_alone(adapters):
    ckpt, root, _ = adapters
    llm = LLM(ckpt, dtype="float32")
    llm.load_adapter("qv", root / "qv")
    llm.load_adapter("mlp", root / "mlp")
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, adapter=a)
        for a in ("qv", None, "mlp")
    ]
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in together}) == 3  # the adapters really differ


def test_adding_and_replacing_adapters_compiles_nothing(adapters):
    """After start-up's compiling, loading adapters of other ranks and modules into the bank,
    and serving them, compiles no program at all: a finished fine-tune job's adapter is handed
    to serving on the engine loop, between steps."""
    ckpt, root, _ = adapters
    llm = LLM(ckpt, dtype="float32")
    llm.engine.compile_all()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate([[5, 6, 7]], params)
    with_a = SamplingParams(**{**vars(params), "adapter": "a"})
    with counting_compilations() as compilations:
        llm.load_adapter("a", root / "qv")
        first = llm.generate([[5, 6, 7]], with_a)[0]
        llm.load_adapter("a", root / "mlp")  # replace in place, at another rank
        second = llm.generate([[5, 6, 7]], with_a)[0]
    assert compilations[0] == 0
    assert first.token_ids != second.token_ids


def test_deleting_an_adapter_lets_the_requests_decoding_with_it_finish_with_it(adapters):
    """A deleted adapter is refused to new requests at once; a stream already decoding with it
    gives the tokens it would have given, and its slot is zeroed once that stream ends."""
    ckpt, root, _ = adapters
    llm = LLM(ckpt, dtype="float32")
    llm.load_adapter("qv", root / "qv")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, adapter="qv")
    (undisturbed,) = llm.generate([[5, 6, 7]], params)
    core = llm.engine
    core.add_request([5, 6, 7], params, "decoding")
    outputs = core.step() + core.step() + core.step()

    core.delete_adapter("qv")

    with pytest.raises(ValueError, match="not loaded"):
        core.add_request([5, 6, 7], params)
    while core.has_unfinished():
        outputs += core.step()
    assert outputs[-1].token_ids == undisturbed.token_ids
    bank = lora_layers(nnx.merge(core.graphdef, core.state))
    assert not any(np.any(np.asarray(layer.lora_b[...][1])) for layer in bank.values())
    assert core.adapters.retiring == set()


def test_unknown_adapter_is_refused(checkpoint):
    llm = LLM(checkpoint("llama"), dtype="float32")
    with pytest.raises(ValueError, match="'nope' is not loaded"):
        llm.generate([[1, 2]], SamplingParams(adapter="nope"))
