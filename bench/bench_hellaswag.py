"""HellaSwag scoring speed: the batched multiple-choice scorer vs one forward pass per ending.

GPT-2 124M architecture with random (seeded) weights and the GPT-2 tokenizer, on the first --limit
validation examples. The baseline is the straightforward loop (one forward per example and ending,
4 per example, as build-nanogpt's evaluation calls the model once per example); the batched scorer packs
--batch-size rows of many examples into one right-padded forward, longest rows first. Both must give the
same log-probabilities (checked and printed); only speed differs.

    python bench/bench_hellaswag.py [--limit 200] [--batch-size 16] [--data PATH] [--threads N]

Timings on a shared machine are noise: run it alone. Prints a markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import benchutil  # noqa: E402
from gptforge.config import ModelConfig, resolve_model_config  # noqa: E402
from gptforge.eval import TASKS, choice_metrics, score_choices, score_choices_one_by_one  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.tokenizer import GPT2Tokenizer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hellaswag_val_first500.jsonl"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="first N validation examples")
    ap.add_argument("--batch-size", type=int, default=16, help="rows (endings) per forward of the batched scorer")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HellaSwag validation JSONL")
    ap.add_argument("--prompt-format", default="harness", choices=["harness", "plain"])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    task = TASKS["hellaswag"]
    examples = task.examples(task.load(args.data)[: args.limit], args.prompt_format)
    tok = GPT2Tokenizer()
    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset=args.preset, vocab_size=tok.vocab_size))).to(device).eval()

    # warm-up (allocator, kernels) on a few examples, then each contender once over the whole set
    score_choices(model, tok, examples[:4], batch_size=args.batch_size, dtype=dtype)
    score_choices_one_by_one(model, tok, examples[:2], dtype=dtype)
    batched_s, batched = timed(lambda: score_choices(model, tok, examples, batch_size=args.batch_size, dtype=dtype))
    loop_s, loop = timed(lambda: score_choices_one_by_one(model, tok, examples, dtype=dtype))

    n = len(examples)
    diff = max(abs(a - b) for s, r in zip(batched, loop) for a, b in zip(s.logprobs, r.logprobs))
    same_preds = all(s.pred == r.pred and s.pred_norm == r.pred_norm for s, r in zip(batched, loop))
    rows = sum(len(ex.choices) for ex in examples)
    tokens = sum(sum(s.tokens) for s in batched)
    labels = [ex.label for ex in examples]
    acc = choice_metrics(batched, labels)
    print(f"{n} examples, {rows} rows, {tokens} continuation tokens; random weights: acc {acc['acc']:.3f} "
          f"acc_norm {acc['acc_norm']:.3f} (chance 0.25)")
    print(f"batched (batch {args.batch_size}): {n / batched_s:.2f} ex/s ({batched_s:.1f} s)")
    print(f"one forward per ending:   {n / loop_s:.2f} ex/s ({loop_s:.1f} s)")
    print(f"speed-up: {loop_s / batched_s:.2f}x; max |logprob difference| {diff:.2e}; same predictions: {same_preds}")

    machine, load, command = benchutil.machine(device), benchutil.load_average(), benchutil.command_line()
    print(f"(1-minute load average at the end: {load:.1f}; numbers from a busy machine are noise)")
    print()
    print("| date | machine | model | format | examples | batched ex/s | per-ending ex/s | speed-up | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {datetime.date.today()} | {machine} | {args.preset} {args.dtype} | {args.prompt_format} | {n} "
          f"| {n / batched_s:.2f} | {n / loop_s:.2f} | {loop_s / batched_s:.2f}x | `{command}` |")
    if not same_preds or not np.isfinite(diff) or diff > 1e-2:
        raise SystemExit("batched and one-by-one scores disagree")


if __name__ == "__main__":
    main()
