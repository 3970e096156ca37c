"""What packed weights cost in quality, on a trained checkpoint: perplexity and greedy continuations of
gptforge float32 (plain and packed), bf16 and int8 (`gptforge.quantize`).

    python bench/bench_quantize.py CHECKPOINT [--data ../shared/data/wikitext2_valid.txt] [--split val]
    python bench/bench_quantize.py runs/quickstart --data runs/quickstart/data --prompts shakespeare

The issue's bar for int8: perplexity within 1% of float32 and identical greedy continuations (64 tokens) for
at least 9 of 10 prompts. --data takes a text file (scored whole) or a folder made by `gptforge prepare`
(scored on --split, e.g. the validation tokens the model did not train on). With llama-cpp-python installed,
llama.cpp's greedy tokens on F32 and Q8_0 exports of the same checkpoint are compared too (how much another
engine's rounding alone moves them). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import sys
import tempfile
import time
from pathlib import Path


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
SHAKESPEARE_PROMPTS = ["JULIET:\n", "ROMEO:\nWhat", "First Citizen:\n", "KING HENRY:\nNow", "To be, or not",
                       "HAMLET:\n", "The king is", "MENENIUS:\nWhy,", "Good morrow", "LADY MACBETH:\n"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_valid.txt"))
    ap.add_argument("--split", default="val", help="split of a prepared --data folder")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="score only the first N tokens")
    ap.add_argument("--weights", default="torch,f32,bf16,int8")
    ap.add_argument("--prompts", choices=["wikitext", "shakespeare"], default="wikitext",
                    help="the 10 prompts: WikiText-style, or Shakespeare-style for a model trained on it (quickstart)")
    args = ap.parse_args()

    model, tok, _ = load_model(Path(args.checkpoint))
    prompts = [tok.encode(p) for p in (PROMPTS if args.prompts == "wikitext" else SHAKESPEARE_PROMPTS)]
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

    window = model.config.block_size
    if max(map(len, prompts)) + args.new_tokens > window:  # llama.cpp's gpt2 graph aborts past its positions
        print(f"llama.cpp: left out (prompt + {args.new_tokens} new tokens pass the model's {window} positions; "
              "gptforge slides its window, llama.cpp's gpt2 graph cannot)", flush=True)
    elif importlib.util.find_spec("llama_cpp") is not None:
        for weights, tokens in llama_cpp_tokens(Path(args.checkpoint), prompts, args.new_tokens):
            same = sum(a == b for a, b in zip(tokens, reference[1]))
            rows.append((f"llama.cpp {weights}", None, None, same))
            print(f"llama.cpp {weights}: greedy identical to the first row for {same}/{len(prompts)} prompts", flush=True)

    print(f"\n{datetime.date.today()}, {benchutil.cpu_model()}; checkpoint {args.checkpoint}; {native.status()}")
    print(f"`{benchutil.command_line()}`\n")
    print("| weights | perplexity | vs first row | greedy identical (of 10) | scoring time |")
    print("|---|---|---|---|---|")
    for weights, score, seconds, same in rows:
        if score is None:  # llama.cpp: greedy tokens only
            print(f"| {weights} | - | - | {same} | - |")
            continue
        print(f"| {weights} | {score['perplexity']:.4f} | {score['perplexity'] / reference[0] - 1:+.2%} | "
              f"{same} | {seconds:.1f} s |")


def llama_cpp_tokens(checkpoint: Path, prompts: list[list[int]], n: int):
    """(GGUF type, greedy continuations) from llama.cpp on the same weights (F32 and Q8_0 exports): how far
    another engine's rounding alone moves greedy tokens on this model."""
    import llama_cpp

    from gptforge.checkpoint import resolve_checkpoint
    from gptforge.export import export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        for weight_type in ("f32", "q8_0"):
            path = export_gguf(resolve_checkpoint(checkpoint), Path(tmp) / f"{weight_type}.gguf", weight_type=weight_type)
            llm = llama_cpp.Llama(str(path), n_ctx=max(map(len, prompts)) + n + 8, n_threads=1, verbose=False)
            out = []
            for ids in prompts:
                tokens = []
                for token in llm.generate(ids, temp=0.0, reset=True):
                    tokens.append(token)
                    if len(tokens) == n:
                        break
                out.append(tokens)
            yield weight_type.upper(), out


if __name__ == "__main__":
    main()
