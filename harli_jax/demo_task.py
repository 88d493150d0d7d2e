"""The main job's checkable fine-tuning task: single-digit addition, asked in chat form.

The embedded demo model saw addition facts in its corpus but gets many of them wrong
("3 plus 4 is 8."), so teaching it the 100 sums ``a + b`` for digits a, b is a task whose success
anyone can check: the share of sums answered exactly right, before and after fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path

from harli_jax.engine.sampling import SamplingParams


def examples() -> list[dict]:
    """Chat examples in the OpenAI fine-tuning format, one per sum."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        }
        for a in range(10)
        for b in range(10)
    ]


def write_dataset(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in examples()))
    return path


def accuracy(llm, adapter: str | None = None) -> float:
    """The share of the 100 sums whose greedy answer is exactly the right sentence."""
    prompts, answers = [], []
    for example in examples():
        user, assistant = example["messages"]
        prompts.append(llm.tokenizer.encode_chat([user]))
        answers.append(assistant["content"])
    params = SamplingParams(max_tokens=12, temperature=0.0, adapter=adapter)
    outputs = llm.generate(prompts, params)
    return sum(o.text.strip() == a for o, a in zip(outputs, answers)) / len(answers)
