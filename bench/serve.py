"""Serving benchmark (issue 7, point 5): streaming TPOT seen by HTTP clients vs. by the engine.

At each fixed concurrency N, N streaming clients each send `requests` completions back to back
(random token-id prompts, `ignore_eos`, a fixed `max_tokens`) to the OpenAI-compatible server on
loopback, and record the gap between consecutive token events of each stream. Over the same
window the engine records its own per-token gaps (`EngineMetrics.tpot_s`, taken when the loop
hands a step's tokens to the request streams). `http_overhead_ratio` = client TPOT / engine TPOT
at the same load: what the HTTP layer (asyncio hand-off, JSON, SSE, the socket) adds per token.

The clients run in a child process (this script with `--client`): in the server's process their
parsing would hold the GIL against the engine loop and uvicorn, and inflate both sides.
A random checkpoint has no tokenizer, so a stream carries no text; `logprobs=0` makes every token
an event (its sampled token's logprob) on both sides of the comparison. Each concurrency first
runs one unrecorded round, so every program it needs is compiled before the measured one.

    python3 bench/serve.py                          # TinyLlama-1.1B shape, N = 8 and 32 (GPU)
    python3 bench/serve.py --shapes tiny --quick    # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODEL_NAME = "bench"
REQUEST_TIMEOUT_S = 600.0


# -- the client process: only httpx and numpy, no JAX ------------------------------------------
async def _stream_one(client, url: str, prompt: list[int], max_tokens: int) -> list[float]:
    """One streamed completion; per-token gaps in seconds (the first token's latency excluded)."""
    body = dict(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=max_tokens,
        ignore_eos=True,
        stream=True,
        logprobs=0,
        temperature=0.0,
    )
    gaps: list[float] = []
    last = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            choices = json.loads(line[len("data: ") :])["choices"]
            logprobs = choices[0].get("logprobs") if choices else None
            count = len(logprobs["tokens"]) if logprobs else 0
            if count == 0:
                continue
            if last is not None:  # spread a multi-token event's gap as the engine does
                gaps.append((now - last) / count)
            last = now
    return gaps


async def _run_clients(
    url: str, concurrency: int, requests: int, prompt_len: int, max_tokens: int, vocab: int
) -> list[float]:
    import httpx  # the client process alone needs it

    rng = np.random.default_rng(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one_client() -> list[float]:
            gaps: list[float] = []
            for _ in range(requests):
                prompt = rng.integers(3, vocab, size=prompt_len).tolist()
                gaps += await _stream_one(client, url, prompt, max_tokens)
            return gaps

        per_client = await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return [gap for gaps in per_client for gap in gaps]


def client_main(args: argparse.Namespace) -> None:
    gaps = asyncio.run(
        _run_clients(
            args.client,
            int(args.concurrency),
            args.requests,
            args.prompt_len,
            args.max_tokens,
            args.vocab,
        )
    )
    json.dump(gaps, sys.stdout)


# -- the server process -----------------------------------------------------------------------
def _percentiles_ms(gaps: list[float]) -> tuple[float, float]:
    if not gaps:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(gaps) * 1e3, [50, 99])
    return float(p50), float(p99)


def _clients(url: str, concurrency: int, requests: int, args: argparse.Namespace, vocab: int):
    """Runs the client process to completion; its per-token gaps in seconds."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--client", url,
        "--concurrency", str(concurrency), "--requests", str(requests),
        "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens),
        "--vocab", str(vocab),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=REQUEST_TIMEOUT_S * requests
    )
    return json.loads(done.stdout)


def bench_shape(shape: str, args: argparse.Namespace) -> list[dict]:
    """Every concurrency on one model shape, one server; the rows of the result table."""
    from bench import common  # first: it sets the JAX allocator mode before jax loads
    from bench.train import ensure_checkpoint
    from harli_jax.engine.loop import Engine
    from harli_jax.llm import LLM
    from harli_jax.serve import BackgroundServer, create_app

    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    llm = LLM(
        ensure_checkpoint(args.ckpt_root, shape),
        dtype=args.dtype,
        max_num_seqs=max(concurrencies),
        max_model_len=args.prompt_len + args.max_tokens,
        max_loras=0,
    )
    vocab = common.SHAPES[shape]["vocab_size"]
    engine = Engine(llm.engine, max_queued=2 * max(concurrencies)).start()
    rows = []
    try:
        with BackgroundServer(create_app(engine, MODEL_NAME), host="127.0.0.1") as server:
            for n in concurrencies:
                _clients(server.url, n, 1, args, vocab)  # compiles this batch's programs
                start = time.perf_counter()
                client_gaps = _clients(server.url, n, args.requests, args, vocab)
                end = time.perf_counter()
                with engine.metrics.lock:
                    engine_gaps = [g for t, g in engine.metrics.tpot_s if start <= t <= end]
                client_p50, client_p99 = _percentiles_ms(client_gaps)
                engine_p50, engine_p99 = _percentiles_ms(engine_gaps)
                rows.append(
                    dict(
                        model=shape,
                        concurrency=n,
                        device=common.device_name(),
                        client_tpot_ms=client_p50,
                        engine_tpot_ms=engine_p50,
                        http_overhead_ratio=client_p50 / engine_p50,
                        client_tpot_p99_ms=client_p99,
                        engine_tpot_p99_ms=engine_p99,
                        http_overhead_ratio_p99=client_p99 / engine_p99,
                        client_samples=len(client_gaps),
                        engine_samples=len(engine_gaps),
                        wall_s=end - start,
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.stop()
    return rows


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tinyllama-1.1b", help="comma-separated SHAPES names")
    parser.add_argument("--concurrency", help="comma-separated client counts (default 8,32)")
    parser.add_argument("--requests", type=int, help="requests per client (default 4)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens (default 128)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (default 256)")
    parser.add_argument("--dtype", help="model dtype (default bfloat16; float32 with --quick)")
    parser.add_argument("--quick", action="store_true", help="small loads for a CPU smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--ckpt-root", type=Path, default=Path("/tmp/harli-bench-ckpt"))
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = (
        dict(concurrency="2,4", requests=2, prompt_len=16, max_tokens=16, dtype="float32")
        if args.quick
        else dict(concurrency="8,32", requests=4, prompt_len=128, max_tokens=256, dtype="bfloat16")
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.client is not None:
        client_main(args)
        return
    if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import common

    started = time.perf_counter()
    rows = [row for shape in args.shapes.split(",") if shape for row in bench_shape(shape, args)]
    common.write_result(
        args.out / f"serve-{common.device_name()}.json",
        rows,
        shlex.join(["python3", *sys.argv]),
        settings=dict(
            requests_per_client=args.requests,
            prompt_len=args.prompt_len,
            max_tokens=args.max_tokens,
            dtype=args.dtype,
        ),
        wall_s=time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
