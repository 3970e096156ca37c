"""Decoding speed: our Engine vs Hugging Face transformers' GPT2LMHeadModel.generate, same weights.

GPT-2 124M architecture, random weights (seeded), fp32 (or --dtype bfloat16 for both), greedy, KV cache
on both sides. Our weights are copied into the HF model (HF's Conv1D stores Linear weights transposed; our
embedding is padded to 50304 rows, HF's has 50257), so both must produce the same tokens; the script says
if they do not.

What bounds it: at batch 1 every step reads all ~500 MB of fp32 weights once, so on a CPU the step time
is mostly memory bandwidth; a faster engine can only remove the overhead on top of that.

    python bench/bench_decode.py [--new-tokens 128] [--batch 1] [--threads N] [--dtype float32]

Prints a markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import benchutil  # noqa: E402
from gptforge.config import ModelConfig, resolve_model_config  # noqa: E402
from gptforge.engine import Engine, SamplingParams  # noqa: E402
from gptforge.model import GPT  # noqa: E402


def hf_copy(model: GPT):
    """A transformers GPT2LMHeadModel holding exactly our model's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    ours = model.state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {}
    for name, tensor in ours.items():
        if name == "lm_head.weight":
            continue  # tied to wte on both sides
        if name == "transformer.wte.weight":
            tensor = tensor[: cfg.vocab_size]  # drop our padding rows
        elif name.endswith(conv1d):
            tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        state[name] = tensor.contiguous()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
    return hf


def timed_interleaved(fns: dict, runs: int):
    """Median seconds and last output of each fn. Runs alternate between the contenders, so a busy
    neighbour on a shared machine slows both sides alike instead of whichever ran during the spike."""
    outs = {name: fn() for name, fn in fns.items()}  # warm-up: allocator, kernels, lazy initialisation
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), outs[name]) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights of BOTH models are cast to this (no autocast)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-hf", action="store_true", help="time our engine only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset=args.preset, vocab_size=50257))).eval()
    prompt = torch.randint(0, 50257, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    n, ntok = args.new_tokens, args.batch * args.new_tokens

    engine = Engine(model.to(device, dtype))
    params = SamplingParams(max_new_tokens=n, temperature=0.0)
    contenders = {"ours": lambda: engine.generate(prompt.tolist(), params)}
    if not args.no_hf:
        import transformers

        hf = hf_copy(model).to(device, dtype)
        ids = prompt.to(device)

        def hf_generate():
            with torch.inference_mode():
                # eos disabled (eos_token_id=None) so both sides write exactly n tokens
                return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                   max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

        contenders["hf"] = hf_generate
    results = timed_interleaved(contenders, args.runs)
    ours_s, ours_out = results["ours"]
    ours_tps = ntok / ours_s
    print(f"ours: {ours_tps:.1f} tok/s (median of {args.runs}, {1e3 * ours_s / n:.2f} ms/step)")

    hf_cell, ratio_cell, same_cell = "-", "-", "-"
    if not args.no_hf:
        hf_s, hf_out = results["hf"]
        hf_tps = ntok / hf_s
        hf_tokens = hf_out[:, args.prompt_tokens:].tolist()
        same = hf_tokens == ours_out
        if not same:
            first = min((i for a, b in zip(hf_tokens, ours_out) for i, (x, y) in enumerate(zip(a, b)) if x != y),
                        default=None)
            print(f"WARNING: our tokens differ from transformers' (first difference at step {first})")
        print(f"transformers {transformers.__version__} ({hf.config._attn_implementation} attention): "
              f"{hf_tps:.1f} tok/s ({1e3 * hf_s / n:.2f} ms/step); ours / hf = {ours_tps / hf_tps:.2f}x; "
              f"same tokens: {same}")
        hf_cell, ratio_cell, same_cell = f"{hf_tps:.1f}", f"{ours_tps / hf_tps:.2f}x", "yes" if same else "NO"

    machine, load, command = benchutil.machine(device), benchutil.load_average(), benchutil.command_line()
    print(f"(1-minute load average at the end: {load:.1f}; numbers from a busy machine are pessimistic)")
    print()
    print("| date | machine | model | batch | prompt+new | ours tok/s | HF tok/s | ours/HF | same tokens | command |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {datetime.date.today()} | {machine} | {args.preset} {args.dtype} | {args.batch} "
          f"| {args.prompt_tokens}+{n} | {ours_tps:.1f} | {hf_cell} | {ratio_cell} | {same_cell} | `{command}` |")


if __name__ == "__main__":
    main()
