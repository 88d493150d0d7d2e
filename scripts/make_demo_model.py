"""Builds harli_jax/assets/demo/: the tiny Llama that `LLM.demo()` and the CLI use by default.

A byte-level BPE (~1000 ids) and a 1M-parameter LlamaForCausalLM are trained on the CPU, with torch,
on tests/data/corpus.txt plus its question/answer pairs rendered as chats, for a fixed number of
steps (a few minutes on two cores). The output is an ordinary HF checkpoint directory with a README
that records the final loss and greedy samples. Seeded throughout: a re-run on the same machine and
library versions rewrites the same files.

    python3 scripts/make_demo_model.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from checkpoints import (  # noqa: E402  (the test helpers own the tokenizer recipe)
    CORPUS,
    save_tokenizer,
    stop_token_ids,
    to_hub_config,
    train_tokenizer,
)

VOCAB_SIZE = 1024  # an upper bound: the BPE runs out of merges on this corpus at ~1015 ids
SEQ_LEN = 128
BATCH = 32
CHAT_PROMPTS = ["What sound does a cow make?", "What color is the sky?", "What is 3 plus 4?"]
TEXT_PROMPTS = ["One sunny day,", "Q: How many legs does a duck have?\nA:"]


def build_model(backend: tokenizers.Tokenizer, seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=backend.token_to_id("<s>"),
        eos_token_id=backend.token_to_id("</s>"),
        pad_token_id=backend.token_to_id("<pad>"),
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def token_stream(tokenizer: transformers.PreTrainedTokenizerBase) -> torch.Tensor:
    """Every corpus paragraph (BOS-prefixed), then every Q/A pair again as a rendered chat, so the
    model learns both the plain text and the chat format that chat requests are rendered in."""
    docs = CORPUS.read_text(encoding="utf-8").split("\n\n")
    ids = [i for doc in docs for i in tokenizer.encode(doc.strip() + "\n")]
    for doc in docs:
        if doc.startswith("Q: "):
            question, answer = doc[3:].split("\nA: ")
            chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            ids += tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    return torch.tensor(ids)


def train(model: torch.nn.Module, stream: torch.Tensor, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    # Linear warm-up, then cosine decay to a tenth of the peak rate.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        ),
    )
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH,), generator=gen)
        batch = torch.stack([stream[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:4d}  loss {loss.item():.3f}  {elapsed:6.1f}s", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def samples(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    stop_ids: list[int],
) -> list[tuple[str, str]]:
    """(prompt, greedy continuation) pairs for the README."""
    prompts = [(p, tokenizer.encode(p)) for p in TEXT_PROMPTS]
    for question in CHAT_PROMPTS:
        chat = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        prompts.append((f"chat: {question}", ids))
    out = []
    for label, ids in prompts:
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=stop_ids
        )[0, len(ids) :]
        out.append((label, tokenizer.decode(generated, skip_special_tokens=True)))
    return out


def write_readme(
    out: Path,
    *,
    n_params: int,
    steps: int,
    seconds: float,
    final_loss: float,
    versions: str,
    examples: list[tuple[str, str]],
) -> None:
    c = json.loads((out / "config.json").read_text())
    size_kib = sum(p.stat().st_size for p in out.iterdir() if p.name != "README.md") / 1024
    shown = "\n".join(f"{label!r}\n  -> {text!r}" for label, text in examples)
    (out / "README.md").write_text(
        f"""# Embedded demo model

A tiny Llama-architecture model, shipped inside the package so that `LLM.demo()`,
`harli-jax serve` and `harli-jax train-colocated` run on a fresh machine with nothing downloaded.
**It is not a useful language model.** It exists to exercise the whole path (tokenizer, chat
template, HF checkpoint loading, prefill, decode, sampling, LoRA fine-tuning, serving) on a CPU in
seconds, and to produce English-looking text rather than noise while doing so.

- Architecture: `LlamaForCausalLM`, {n_params / 1e6:.2f}M parameters: hidden {c["hidden_size"]},
  {c["num_hidden_layers"]} layers, {c["num_attention_heads"]} attention heads, \
{c["num_key_value_heads"]} KV heads, MLP {c["intermediate_size"]},
  vocabulary {c["vocab_size"]}, context {c["max_position_embeddings"]}, tied embeddings, \
float32 weights; {size_kib:.0f} KiB on disk in all.
- Tokenizer: byte-level BPE trained on the same corpus; special tokens `<s>`, `</s>`, `<pad>`,
  `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`; the chat template writes
  `<s><|user|>\\n...<|end|>\\n<|assistant|>\\n`, and generation stops on `</s>` or `<|end|>`.
- Data: `tests/data/corpus.txt` (~200 KiB of templated children's stories, animal and colour
  facts, arithmetic and Q/A pairs, generated by `tests/data/make_corpus.py`), plus its Q/A pairs
  rendered as chats.
- Training: `scripts/make_demo_model.py` ({versions}) on the CPU with 2 threads:
  {steps} steps of {BATCH} x {SEQ_LEN} tokens, AdamW, seeded; {seconds / 60:.1f} minutes.
  Final training loss (mean of the last 20 steps): **{final_loss:.3f}** nats/token.

That loss means the model has memorised its tiny corpus: it continues text in the corpus's style
and answers the corpus's questions, often but not always correctly, and anything else badly.
Greedy samples (HF transformers):

```
{shown}
```

Rebuild with `python3 scripts/make_demo_model.py` (deterministic for a given machine and library
versions).
"""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "harli_jax" / "assets" / "demo")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    args.out.mkdir(parents=True, exist_ok=True)
    backend = train_tokenizer(VOCAB_SIZE)
    save_tokenizer(backend, args.out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.out)
    stop_ids = stop_token_ids(backend)

    model = build_model(backend, args.seed)
    stream = token_stream(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, {len(stream)} training tokens")
    start = time.perf_counter()
    losses = train(model, stream, args.steps, args.seed)
    seconds = time.perf_counter() - start

    model.generation_config = transformers.GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=stop_ids,
        pad_token_id=model.config.pad_token_id,
    )
    model.save_pretrained(args.out)
    to_hub_config(args.out / "config.json")
    examples = samples(model, tokenizer, stop_ids)
    write_readme(
        args.out,
        n_params=n_params,
        steps=args.steps,
        seconds=seconds,
        final_loss=sum(losses[-20:]) / 20,
        versions=f"torch {torch.__version__}, transformers {transformers.__version__}",
        examples=examples,
    )
    for label, text in examples:
        print(f"{label!r} -> {text!r}")


if __name__ == "__main__":
    main()
