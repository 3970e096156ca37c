"""Load test of `gptforge serve`: many concurrent streaming clients against one server on loopback.

Starts the server as a subprocess (`python -m gptforge serve CKPT --port P`), waits for /health, then runs
`--clients` concurrent clients; each sends `--rounds` streaming /v1/completions requests one after another
(temperature 1, `--max-tokens` tokens, a prompt of about `--prompt-tokens` tokens). Reported: time to first
token (request sent -> first chunk with text), p50/p95; request latency; aggregate completion tokens/s over
the whole run (counted from each stream's usage chunk); errors, which must be zero.

    python bench/bench_serve.py [--model tiny | CHECKPOINT] [--clients 32] [--rounds 3] [--max-tokens 64]
                                [--max-batch-size 32] [--threads N] [--quantize int8]

`--model tiny` builds a random tiny checkpoint (2 layers, 64 wide, 256-token context, byte tokenizer) in a
temporary folder, so the run measures the server and its batching more than the model. Loopback only; the
run is bounded (clients x rounds requests). Prints a markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def tiny_checkpoint(folder: Path) -> Path:
    import torch

    from gptforge.checkpoint import save_checkpoint
    from gptforge.config import ModelConfig
    from gptforge.model import GPT
    from gptforge.tokenizer import build_tokenizer

    tok = build_tokenizer("byte")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=256, vocab_size=tok.vocab_size))
    with torch.no_grad():  # wider than GPT-2's init, so the output is not one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 2.0 / math.sqrt(p.shape[1]))
    path = folder / "tiny"
    save_checkpoint(path, model, tok)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gptforge", "serve", str(checkpoint), "--port", str(port), "--log_level",
           "warning", "--max_batch_size", str(args.max_batch_size), "--max_concurrent", str(args.clients * 2)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.time() + 120
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c.get("text") for c in chunk["choices"]):
                first = time.perf_counter() - start
    return {"ttft": first, "latency": time.perf_counter() - start, "tokens": tokens}


async def client(http, url, rounds, max_tokens, prompt_tokens, index) -> list[dict]:
    results = []
    for r in range(rounds):
        prompt = f"Client {index}, round {r}: " + "the quick brown fox " * 20
        results.append(await one_request(http, url, prompt[:prompt_tokens], max_tokens))
    return results


async def load(url: str, args) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await one_request(http, url, "warm up", 4)
        start = time.perf_counter()
        per_client = await asyncio.gather(*[client(http, url, args.rounds, args.max_tokens, args.prompt_tokens, i)
                                            for i in range(args.clients)])
        return [r for rs in per_client for r in rs], time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random, built here) or a checkpoint directory")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in characters (bytes for tiny)")
    ap.add_argument("--max-batch-size", type=int, default=32, help="the server's --max_batch_size")
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads (default: torch's)")
    ap.add_argument("--quantize", default=None,
                    help="the server's --quantize: auto, none, int8, bf16 or f32 (default: the server's, auto)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp)) if args.model == "tiny" else Path(args.model)
        port = free_port()
        server = start_server(checkpoint, port, args)
        try:
            results, wall = asyncio.run(load(f"http://127.0.0.1:{port}/v1/completions", args))
        finally:
            server.terminate()
            server.wait(timeout=30)

    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    print(f"{len(results)} requests ({args.clients} concurrent clients x {args.rounds}), {wall:.2f} s, "
          f"{tokens} completion tokens, errors: {len(errors)}")
    for e in errors[:5]:
        print("  error:", e)
    if ttft:
        print(f"time to first token: p50 {pct(ttft, 50) * 1000:.0f} ms, p95 {pct(ttft, 95) * 1000:.0f} ms; "
              f"request latency p50 {statistics.median(r['latency'] for r in ok):.2f} s; "
              f"aggregate {tokens / wall:.0f} tokens/s")
    print("\n| date | machine | model | batch / threads | clients x rounds | max_tokens | TTFT p50 | TTFT p95 | "
          "tokens/s | errors |")
    print(f"| {time.strftime('%Y-%m-%d')} | {platform.machine()} {os.cpu_count()} cores | {args.model}"
          f"{f' --quantize {args.quantize}' if args.quantize else ''} | "
          f"{args.max_batch_size} / {args.threads or 'default'} | "
          f"{args.clients} x {args.rounds} | {args.max_tokens} | {pct(ttft, 50) * 1000:.0f} ms | "
          f"{pct(ttft, 95) * 1000:.0f} ms | {tokens / wall:.0f} | {len(errors)} |" if ttft else "(no timings)")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
