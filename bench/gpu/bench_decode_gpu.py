"""Issue 6, target 3: decoding GPT-2 124M in bf16, greedy, 16-token prompt, 256 new tokens, batch 1 and 16.

gptforge's Engine (the one the CLI and server use) against transformers' `generate` in the same run, and
the Engine's tokens checked against its uncached reference path (`use_cache=False`: a full forward over
each row per step).

    python bench/gpu/bench_decode_gpu.py                                  # batch 1 and 16
    python bench/gpu/bench_decode_gpu.py --checkpoint runs/x/checkpoints/best   # real weights
    python bench/gpu/bench_decode_gpu.py --smoke                          # CPU, tiny model: it runs

Random seeded weights unless --checkpoint (as bench/bench_decode.py, whose weight copy into transformers this
reuses). Both models hold the same weights cast to bf16 (no autocast), greedy, KV cache on both sides, eos
off so every row writes exactly --new-tokens. tok/s = batch x new tokens / wall time of one whole generate
call (prefill, the host sync each step needs, everything), median of --runs after a warm-up, the two
sides alternating so a busy neighbour slows both alike.

Roofline at batch 1: a decode step reads every weight once, 2 bytes x 124.5M stored parameters (the tied,
padded 50304 x 768 embedding once) = 249 MB; the script prints that floor for --bandwidth-gbs (default
3350, an H100 SXM's HBM3). See docs/gpu.md for the plan to approach it.
"""

from __future__ import annotations

import argparse

import torch

from common import command_line, fmt, pick_device, profile_table, row_prefix, sync  # noqa: E402
from bench_decode import hf_copy  # noqa: E402
from benchutil import timed_interleaved  # noqa: E402
from gptforge.config import ModelConfig, resolve_model_config  # noqa: E402
from gptforge.engine import Engine, SamplingParams  # noqa: E402
from gptforge.model import GPT  # noqa: E402


def first_difference(a: list[list[int]], b: list[list[int]]):
    """Step of the first differing token over all rows, or None when identical."""
    steps = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
             for ra, rb in zip(a, b) if ra != rb]
    return min(steps) if steps else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 8 new tokens: checks the script runs")
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--checkpoint", default=None, help="a gptforge checkpoint directory (real weights)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-reference", action="store_true", help="do not check against the uncached path")
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0)
    ap.add_argument("--profile", action="store_true",
                    help="print the top kernels, kernels per decode step and whether CUDA graphs ran (batch 1)")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.batches, args.new_tokens, args.runs = "tiny", [1, 2], 8, 1
    device, dtype = pick_device(args.smoke), torch.bfloat16

    if args.checkpoint:
        from gptforge.checkpoint import load_model

        model, _, _ = load_model(args.checkpoint)
        label = f"{args.checkpoint} bf16"
    else:
        torch.manual_seed(0)
        model = GPT(resolve_model_config(ModelConfig(preset=args.preset, vocab_size=50257)))
        label = f"{args.preset} (random weights) bf16"
    model.eval()
    hf = hf_copy(model).to(device, dtype) if not args.skip_hf else None
    engine = Engine(model.to(device, dtype))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    floor_ms = weight_bytes / (args.bandwidth_gbs * 1e9) * 1e3
    n, vocab = args.new_tokens, model.config.vocab_size
    params = SamplingParams(max_new_tokens=n, temperature=0.0)

    rows = []
    for batch in args.batches:
        prompt = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
        contenders = {"ours": lambda: engine.generate(prompt.tolist(), params)}
        if hf is not None:
            ids = prompt.to(device)

            def hf_generate(ids=ids):
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                      max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
                sync(device)  # generate returns before the GPU is done
                return out

            contenders["hf"] = hf_generate
        results = timed_interleaved(contenders, args.runs)
        ours_s, ours_out = results["ours"]
        r = {"batch": batch, "ours": batch * n / ours_s, "ms": 1e3 * ours_s / n, "hf": None,
             "vs_ref": None, "vs_hf": None}
        if hf is not None:
            hf_s, hf_out = results["hf"]
            r["hf"] = batch * n / hf_s
            r["vs_hf"] = first_difference(ours_out, hf_out[:, args.prompt_tokens:].tolist())
        if not args.skip_reference:
            reference = engine.generate(prompt.tolist(), params, use_cache=False)
            r["vs_ref"] = first_difference(ours_out, reference)
        print(f"batch {batch}: ours {r['ours']:,.1f} tok/s ({r['ms']:.2f} ms/step), transformers "
              f"{fmt(r['hf'], ',.1f')} tok/s; first token differing from the uncached reference: "
              f"{r['vs_ref']}, from transformers: {r['vs_hf']}", flush=True)
        rows.append(r)

    if args.profile:
        prompt = [list(range(args.prompt_tokens))]
        short = SamplingParams(max_new_tokens=64 if not args.smoke else 4, temperature=0.0)
        print(profile_table(device, lambda: engine.generate(prompt, short), calls=1, per=short.max_new_tokens,
                            unit="decode step (prefill included)"), flush=True)

    print(f"\nweights {weight_bytes / 1e6:.0f} MB in bf16: a batch-1 step cannot beat {floor_ms:.3f} ms "
          f"({1e3 / floor_ms:,.0f} tok/s) at {args.bandwidth_gbs:,.0f} GB/s\n")
    print("| date | device | torch | model | batch | prompt+new | ours tok/s | ours ms/step | transformers tok/s "
          "| ours/HF | same tokens as uncached | same tokens as HF | command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def same(diff, checked):
        return "-" if not checked else "yes" if diff is None else f"NO (from step {diff})"

    for r in rows:
        ratio = f"{r['ours'] / r['hf']:.2f}x" if r["hf"] else "-"
        print(f"{row_prefix(device)}| {label} | {r['batch']} | {args.prompt_tokens}+{n} | {r['ours']:,.1f} "
              f"| {r['ms']:.2f} | {fmt(r['hf'], ',.1f')} | {ratio} | {same(r['vs_ref'], not args.skip_reference)} "
              f"| {same(r['vs_hf'], hf is not None)} | {command_line()} |")


if __name__ == "__main__":
    main()
