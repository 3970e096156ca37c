"""Trainable parameters, peak memory and step time: full fine-tuning vs LoRA, on CPU.

Same model as bench_train.py: 6 layers, 6 heads, 384 dims, block 256, batch 8, GPT-2 vocabulary
(50257), fp32, the project's AdamW (make_optimizer). Memory is measured two ways, each variant in fresh
subprocesses:
- tensor peak: weights + optimizer state + the most tensor memory alive at once during one training
  step, from torch.profiler's allocation records (exact, allocator-independent);
- peak RSS: the process's `ru_maxrss` (what the OS sees, torch's own libraries included, ~300 MB). It
  runs with MALLOC_MMAP_THRESHOLD_ set so that freed tensors go back to the OS: with glibc's default
  (adaptive) threshold, memory freed by the forward pass stays in the heap and the peak mostly measures
  fragmentation (it showed LoRA *above* full fine-tuning). That setting slows steps down, so step time
  comes from the first subprocess.

    python bench/bench_lora.py [--steps 3] [--rank 8] [--targets attn,mlp] [--threads 2]

Prints a markdown table for docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args: argparse.Namespace) -> dict:
    """One variant, measured in this (fresh) process."""
    import torch

    from gptforge.config import ModelConfig, TrainConfig, resolve_model_config
    from gptforge.lora import LoRAConfig, apply_lora, count_trainable
    from gptforge.model import GPT
    from gptforge.train.optim import make_optimizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.embd,
                                           block_size=args.block, vocab_size=args.vocab, dropout=0.0))
    model = GPT(cfg)
    if args.variant == "lora":
        apply_lora(model, LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets=args.targets.split(",")))
    trainable, total = count_trainable(model)
    opt = make_optimizer(model, TrainConfig(lr=1e-4), "cpu")
    x = torch.randint(0, args.vocab, (args.batch, args.block + 1), generator=torch.Generator().manual_seed(1))
    model.train()

    def step() -> None:
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(args.steps):  # the first step also creates the optimizer state
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    result = {"variant": args.variant, "trainable": trainable, "total": total, "peak_rss_mb": peak_rss_mb(),
              "step_s": statistics.median(times[1:] or times)}
    if args.measure == "tensors":
        resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *optimizer_tensors(opt)])
        result["tensor_peak_mb"] = (resident + profiled_step_peak(step)) / 2**20
    return result


def optimizer_tensors(opt) -> list:
    import torch

    return [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]


def profiled_step_peak(step) -> int:
    """Bytes of the most tensor memory alive at once during step(), over what was alive before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # "[memory]" records: +bytes when a tensor's storage is allocated, -bytes when it is freed
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    alive = peak = 0
    for _, nbytes in records:
        alive += nbytes
        peak = max(peak, alive)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--embd", type=int, default=384)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--steps", type=int, default=3, help="training steps per variant (the first warms up)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="attn,mlp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)  # set for the child runs
    ap.add_argument("--measure", choices=["tensors", "rss"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return

    rows = []
    for variant in ("full", "lora"):
        row = run_child(variant, "tensors", {})
        row["peak_rss_mb"] = run_child(variant, "rss", {"MALLOC_MMAP_THRESHOLD_": "65536"})["peak_rss_mb"]
        rows.append(row)

    full = rows[0]
    model = f"{args.layers}L/{args.heads}H/{args.embd}, block {args.block}, batch {args.batch}, vocab {args.vocab}"
    print(f"model: {model}, fp32, CPU, {args.threads} threads; LoRA rank {args.rank}, alpha {2 * args.rank}, "
          f"targets {args.targets}")
    print(f"(1-minute load average at the end: {os.getloadavg()[0]:.1f}; step times from a busy machine are "
          "pessimistic)")
    print()
    print("| date | variant | trainable params | % of total | tensor peak | peak RSS | step time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "full fine-tuning" if r["variant"] == "full" else f"LoRA r={args.rank} ({args.targets})"
        print(f"| {datetime.date.today()} | {name} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f}% "
              f"| {r['tensor_peak_mb']:,.0f} MB ({r['tensor_peak_mb'] / full['tensor_peak_mb']:.2f}x) "
              f"| {r['peak_rss_mb']:,.0f} MB ({r['peak_rss_mb'] / full['peak_rss_mb']:.2f}x) | {r['step_s']:.2f} s |")


def run_child(variant: str, measure: str, env: dict) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--measure", measure]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
