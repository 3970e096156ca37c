"""What packed weights cost in quality, on a trained checkpoint: perplexity and greedy continuations of
gptforge float32 (plain and packed), bf16 and int8 (`gptforge.quantize`).

    python bench/bench_quantize.py CHECKPOINT [--data ../shared/data/wikitext2_valid.txt] [--split val]

The issue's bar for int8: perplexity within 1% of float32 and identical greedy continuations (64 tokens) for
at least 9 of 10 prompts. --data takes a text file (scored whole) or a folder made by `gptforge prepare`
(scored on --split, e.g. the validation tokens the model did not train on). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import benchutil  # noqa: E402
from gptforge import native  # noqa: E402
from gptforge.checkpoint import load_model  # noqa: E402
from gptforge.engine import Engine, SamplingParams  # noqa: E402
from gptforge.eval.lm import evaluate_lm  # noqa: E402
from gptforge.quantize import quantize_model  # noqa: E402

PROMPTS = ["The lobster is a", "In 1492 , Columbus", "The species is found in", " = History = \n",
           "The first season of the show", "During the war , the", "The album was released", "In the city of",
           "The film received", "He was born in"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_valid.txt"))
    ap.add_argument("--split", default="val", help="split of a prepared --data folder")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="score only the first N tokens")
    ap.add_argument("--weights", default="torch,f32,bf16,int8")
    args = ap.parse_args()

    model, tok, _ = load_model(Path(args.checkpoint))
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    rows, reference = [], None
    for weights in args.weights.split(","):
        m = model if weights == "torch" else quantize_model(copy.deepcopy(model), None if weights == "f32" else weights)
        t0 = time.perf_counter()
        score = evaluate_lm(m, tok, args.data, split=args.split, limit=args.limit, batch_size=8)
        seconds = time.perf_counter() - t0
        tokens = Engine(m).generate(prompts, params)
        if reference is None:
            reference = (score["perplexity"], tokens)
        same = sum(a == b for a, b in zip(tokens, reference[1]))
        rows.append((weights, score, seconds, same))
        print(f"{weights}: perplexity {score['perplexity']:.4f} ({score['tokens']:,} tokens, {seconds:.1f} s); "
              f"greedy {args.new_tokens} tokens identical to the first row for {same}/{len(prompts)} prompts",
              flush=True)

    print(f"\n{datetime.date.today()}, {benchutil.cpu_model()}; checkpoint {args.checkpoint}; {native.status()}")
    print(f"`{benchutil.command_line()}`\n")
    print("| weights | perplexity | vs first row | greedy identical (of 10) | scoring time |")
    print("|---|---|---|---|---|")
    for weights, score, seconds, same in rows:
        print(f"| {weights} | {score['perplexity']:.4f} | {score['perplexity'] / reference[0] - 1:+.2%} | "
              f"{same} | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
