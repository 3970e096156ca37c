"""Issue 6, target 1's correctness half: the fast training path follows the fp32 reference's loss curve.

Runs `gptforge train` (the real loop, real data loading) several times on the same real text, seed and
batches, GPT-2 124M, block 1024, 200 steps, and compares the per-step training losses:
  - fp32:          --train.dtype float32, eager, NVIDIA_TF32_OVERRIDE=0 (true fp32 matmuls): the reference
  - bf16:          bf16 autocast, eager: how far bf16 alone moves the curve (the noise yardstick)
  - bf16+compile:  bf16 autocast, torch.compile: the fast path
  - bf16+compile+ckpt (--with-checkpointing): the same with activation checkpointing
A fast path passes when its mean |loss - fp32 loss| over the last 50 steps is within 1.5x the bf16 eager
run's (or 0.02, whichever is larger) and shows no drift (the signed mean as small). It also reports each
run's tokens/s as the loop measured it (data loading included): target 1's figure through the real CLI.

    python bench/gpu/bench_curve_gpu.py --data .gpu_carry/data/realtext.txt
    python bench/gpu/bench_curve_gpu.py --smoke --data corpus.txt     # CPU, tiny model, 3 steps: it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, pick_device, row_prefix  # noqa: E402


def train(name: str, data: Path, data_dir: Path, work: Path, common: list[str], extra: list[str],
          env: dict) -> dict:
    run_dir = work / name.replace("+", "_")
    cmd = [sys.executable, "-m", "gptforge", "train", "--data.source", str(data), "--data.dir", str(data_dir),
           "--train.run_dir", str(run_dir), *common, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    speeds = [r["tok_per_s"] for r in records if "tok_per_s" in r]
    tok_s = statistics.median(speeds[len(speeds) // 2:]) if speeds else None  # second half: past compiling
    print(f"{name}: final loss {losses[max(losses)]:.4f}, {tok_s or 0:,.0f} tok/s, {time.time() - t0:.0f} s",
          flush=True)
    return {"losses": losses, "tok_s": tok_s}


def compare(run: dict, ref: dict, last: int) -> dict:
    steps = sorted(set(run["losses"]) & set(ref["losses"]))
    diffs = [run["losses"][s] - ref["losses"][s] for s in steps]
    tail = diffs[-last:]
    return {"max_abs": max(abs(d) for d in diffs), "tail_abs": sum(abs(d) for d in tail) / len(tail),
            "tail_signed": sum(tail) / len(tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a real-text .txt file (tokenized with gpt2)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--with-checkpointing", action="store_true", help="also the fast path with it on")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, byte tokenizer, 3 steps, no compile")
    args = ap.parse_args()
    device = pick_device(args.smoke)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gptforge-curve-"))
    model = ["--model.preset", "tiny", "--data.tokenizer", "byte"] if args.smoke else \
        ["--model.preset", "gpt2", "--data.tokenizer", "gpt2"]
    steps = 3 if args.smoke else args.steps
    common = [*model, "--train.device", device.type, "--train.micro_batch_size", str(args.micro_batch),
              "--train.max_steps", str(steps), "--train.log_every", "1", "--train.eval_every", "0",
              "--train.eval_batches", "2", "--train.checkpoint_every", "0", "--train.lr", "6e-4",
              "--train.warmup_steps", str(min(20, steps)), "--train.seed", "1337", "--train.progress", "false",
              "--train.plot", "false", "--data.num_proc", "1"]
    runs = {"fp32": (["--train.dtype", "float32"], {"NVIDIA_TF32_OVERRIDE": "0"}),
            "bf16": (["--train.dtype", "bfloat16"], {})}
    if not args.smoke:  # a CPU compile of even the tiny model takes longer than a smoke test should
        runs["bf16+compile"] = (["--train.dtype", "bfloat16", "--train.compile", "true"], {})
        if args.with_checkpointing:
            runs["bf16+compile+ckpt"] = (["--train.dtype", "bfloat16", "--train.compile", "true",
                                          "--train.activation_checkpointing", "true"], {})
    results = {name: train(name, args.data, work / "data", work, common, extra, env)
               for name, (extra, env) in runs.items()}

    last = min(50, steps)
    ref, noise = results["fp32"], compare(results["bf16"], results["fp32"], last)
    allowed = max(0.02, 1.5 * noise["tail_abs"])
    print(f"\nsame data, seed and batches; {steps} steps of micro-batch {args.micro_batch}; |diff| against fp32 "
          f"(mean over the last {last} steps) allowed: {allowed:.4f}\n")
    print(f"| date | device | torch | run | tok/s (loop) | max abs diff | mean abs diff, last {last} "
          f"| mean signed diff, last {last} | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run in results.items():
        if name == "fp32":
            cells, verdict = "reference | - | -", "reference"
        else:
            c = compare(run, ref, last)
            cells = f"{c['max_abs']:.4f} | {c['tail_abs']:.4f} | {c['tail_signed']:+.4f}"
            ok = c["tail_abs"] <= allowed and abs(c["tail_signed"]) <= allowed
            verdict = "yardstick (bf16 noise)" if name == "bf16" else "same curve" if ok else "DIFFERS"
        tok_s = f"{run['tok_s']:,.0f}" if run["tok_s"] else "-"
        print(f"{row_prefix(device)}| {name} | {tok_s} | {cells} | {verdict} |")
    print(f"\ncommand: {command_line()}")


if __name__ == "__main__":
    main()
