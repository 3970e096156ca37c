"""Issue 6, targets 1 and 4: GPT-2 training throughput against transformers, and the largest micro-batch.

    python bench/gpu/bench_train_gpu.py speed                        # ours at micro-batch 16 and 64, HF at 16
    python bench/gpu/bench_train_gpu.py memory --presets gpt2        # largest micro-batch, with/without
    python bench/gpu/bench_train_gpu.py memory --presets gpt2-xl     #   activation checkpointing
    python bench/gpu/bench_train_gpu.py speed --smoke                # CPU, tiny model, 2 steps: it runs

speed: a step is forward + backward + fused AdamW update on synthetic tokens, GPT-2 124M, block 1024, bf16
autocast, torch.compile with static shapes (dynamic=False: a second batch size gets its own graph instead
of a slower dynamic one). Reported: the median of --steps timed steps after --warmup untimed ones (which
include compilation). transformers' GPT2LMHeadModel runs in the same process with the same shapes,
vocabulary (50257; ours pads it to 50304 inside the model), sdpa attention, compile, autocast and optimizer.

MFU = tokens/s x FLOPs per token / peak, with PaLM's count (Chowdhery et al. 2022, appendix B):
    FLOPs per token = 6 N + 12 L T C
(forward + backward matmuls; the second term is attention's QK^T and AV over the whole T x T square, the
causal half not subtracted), N = parameters less the position table (a lookup, not a matmul) with the
tied embedding counted once (it is the output matmul): 123.65M for GPT-2 124M. Peak: 989.4 TFLOP/s dense
bf16 on H100 SXM (H200 the same); --peak-tflops overrides.

memory: for each preset and with/without activation checkpointing, the largest micro-batch (block 1024)
for which two full training steps run (doubling, then bisection), and torch.cuda.max_memory_allocated at
it. Eager by default (one compile per tried size would not fit the time); --compile to compile anyway.

Each mode prints markdown rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import traceback

# Set before CUDA starts: the memory search allocates and frees many sizes, and without expandable
# segments fragmentation after an out-of-memory trial would make the next, smaller one fail too early.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from common import (command_line, fmt, peak_flops, peak_memory_gib, pick_device, profile_table,  # noqa: E402
                    reset_peak_memory, row_prefix, sync)
from bench_train import hf_model, time_steps  # noqa: E402
from gptforge.config import ModelConfig, TrainConfig, resolve_model_config  # noqa: E402
from gptforge.model import GPT, count_parameters  # noqa: E402
from gptforge.train.loop import is_out_of_memory  # noqa: E402
from gptforge.train.optim import make_optimizer  # noqa: E402
from gptforge.train.parallelize import apply_activation_checkpointing  # noqa: E402

SMOKE_MODEL = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)


def model_config(preset: str, smoke: bool) -> ModelConfig:
    if smoke:
        return ModelConfig(**SMOKE_MODEL, vocab_size=512).validate()  # a CPU steps through it in ms
    return resolve_model_config(ModelConfig(preset=preset, vocab_size=50257))


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """PaLM's 6N + 12LTC, N without the position table (see the module docstring)."""
    n = n_params - cfg.block_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def make_step(model: torch.nn.Module, loss_of, device: torch.device, compile: bool):
    """A closure running one training step (forward, backward, fused AdamW), and the last loss."""
    opt = make_optimizer(model, TrainConfig(lr=1e-4), device.type)
    fn = torch.compile(model, dynamic=False) if compile else model
    last = {}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(fn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    return step, last


def free(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()  # drop the previous model's graphs (torch._dynamo is slow to import otherwise)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def measure(name, build, loss_of, batch, T, flops, peak, compile, args, device) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = build().train()
    step, last = make_step(model, loss_of, device, compile)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    times = time_steps(step, lambda: sync(device), args.warmup, args.steps)
    tok_s = batch * T / statistics.median(times)
    mfu = tok_s * flops / peak if peak else None
    result = dict(tok_s=tok_s, mfu=mfu, mem=peak_memory_gib(device), loss=last["loss"].item())
    print(f"{name:>12} micro-batch {batch}: {tok_s:,.0f} tok/s, MFU {fmt(mfu, '.1%')}, peak "
          f"{fmt(result['mem'], '.1f')} GiB, loss {result['loss']:.3f} "
          f"({time.perf_counter() - t0:.0f}s with warm-up)", flush=True)
    if args.profile and name == "gptforge" and batch == args.batches[0]:
        print(profile_table(device, step, calls=3, unit="training step"), flush=True)
    del model, step, last
    free(device, compile)
    return result


def speed(args, device: torch.device) -> None:
    cfg = model_config(args.preset, args.smoke)
    T, peak = cfg.block_size, peak_flops(device, args.peak_tflops)
    with torch.device("meta"):  # shapes only: the same architecture on both sides, so the same N
        flops = flops_per_token(cfg, count_parameters(GPT(cfg)))
    compile = args.compile if args.compile is not None else device.type == "cuda"
    rows = []
    for batch in args.batches:
        torch.manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch, T), device=device)
        y = torch.randint(0, cfg.vocab_size, (batch, T), device=device)
        full = torch.cat([x, y[:, -1:]], dim=1)[:, :T]  # HF shifts labels itself: B x (T-1) targets
        contenders = {"gptforge": (lambda: GPT(cfg), lambda m: m(x, y)[1])}
        if not args.skip_hf and batch in args.hf_batches:
            contenders["transformers"] = (lambda: hf_model(cfg), lambda m: m(input_ids=full, labels=full).loss)
        result = {"batch": batch}
        for name, (build, loss_of) in contenders.items():
            try:
                result[name] = measure(name, build, loss_of, batch, T, flops, peak, compile, args, device)
            except Exception:  # one side failing (a compile error, say) must not cost the other's numbers
                traceback.print_exc()
                print(f"{name} micro-batch {batch}: FAILED (traceback above)", flush=True)
                free(device, compile)
        rows.append(result)

    mode = f"bf16 autocast{', compile' if compile else ', eager'}, fused AdamW"
    print(f"\nFLOPs/token = 6N + 12LTC = {flops:.4g}; "
          f"peak {fmt(peak and peak / 1e12, '.1f')} TFLOP/s; {mode}\n")
    print("| date | device | torch | model | micro-batch | ours tok/s | ours MFU | transformers tok/s "
          "| transformers MFU | ours/HF | ours peak GiB | command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    shape = f"{args.preset if not args.smoke else 'smoke'} block {T}"
    for r in rows:
        ours, hf = r.get("gptforge"), r.get("transformers")
        if ours is None:
            print(f"{row_prefix(device)}| {shape} | {r['batch']} | FAILED | | {fmt(hf and hf['tok_s'])} | | | | "
                  f"{command_line()} |")
            continue
        ratio = f"{ours['tok_s'] / hf['tok_s']:.2f}x" if hf else "-"
        print(f"{row_prefix(device)}| {shape} | {r['batch']} | {ours['tok_s']:,.0f} | {fmt(ours['mfu'], '.1%')} "
              f"| {fmt(hf and hf['tok_s'])} | {fmt(hf and hf['mfu'], '.1%')} | {ratio} "
              f"| {fmt(ours['mem'], '.1f')} | {command_line()} |")


def fits(model: GPT, opt_step, cfg: ModelConfig, batch: int, device: torch.device, steps: int):
    """Run `steps` training steps at this micro-batch -> (fits, peak GiB, seconds of the last step)."""
    reset_peak_memory(device)
    ok, seconds = True, None
    try:
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device=device)
        for _ in range(steps):  # two: the optimizer state appears in the first, grads beside it in the second
            t = time.perf_counter()
            opt_step(x)
            sync(device)
            seconds = time.perf_counter() - t
        del x
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA is a RuntimeError
        if not is_out_of_memory(e):
            raise
        ok = False
    # outside the except block, so the traceback no longer pins the failed step's tensors
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    return ok, peak_memory_gib(device) if ok else None, seconds


def search_largest(fits_at, start: int, cap: int, resolution: float, deadline: float):
    """The largest n in [start, cap] with fits_at(n), assuming fitting is monotone: doubling, then
    bisection until the gap to the smallest failing n is within `resolution` of n (or 1).
    Returns (largest fitting or 0, smallest failing or None, 'exact' | 'cap' | 'time')."""
    lo, hi, n = 0, None, start
    while n <= cap and time.time() < deadline:
        if not fits_at(n):
            hi = n
            break
        lo, n = n, n * 2
    if hi is None:
        return lo, None, "cap" if n > cap else "time"
    while hi - lo > max(1, int(lo * resolution)):
        if time.time() >= deadline:
            return lo, hi, "time"
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
    return lo, hi, "exact"


def largest_batch(preset: str, checkpointing: bool, args, device: torch.device) -> dict:
    cfg = model_config(preset, args.smoke)
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: gpt2-xl's 1.6B parameters on the CPU take long
        model = GPT(cfg).train()
    if checkpointing:
        apply_activation_checkpointing(model)
    opt = make_optimizer(model, TrainConfig(lr=1e-4), device.type)
    fn = torch.compile(model, dynamic=False) if args.compile else model

    def opt_step(x):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = fn(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    deadline = time.time() + args.time_budget_s
    tried = {}

    def attempt(b):
        tried[b] = fits(model, opt_step, cfg, b, device, args.trial_steps)
        print(f"  {preset} ckpt={checkpointing} micro-batch {b}: "
              f"{'fits' if tried[b][0] else 'out of memory'}"
              + (f", peak {tried[b][1]:.1f} GiB" if tried[b][1] else ""), flush=True)
        return tried[b][0]

    lo, hi, found = search_largest(attempt, args.start_batch, args.max_batch, args.resolution, deadline)
    _, peak, seconds = tried.get(lo, (False, None, None))
    return dict(preset=preset if not args.smoke else "smoke", checkpointing=checkpointing, batch=lo,
                failed=hi, found=found, peak=peak, tok_s=lo * cfg.block_size / seconds if seconds else None,
                block=cfg.block_size)


def describe_search(r: dict) -> str:
    if r["found"] == "cap":
        return f">= {r['batch']} (--max-batch)"
    if r["found"] == "time":
        return f">= {r['batch']} (--time-budget-s ran out)"
    return f"{r['batch']}" + (f" ({r['failed']} did not fit)" if r["failed"] - r["batch"] > 1 else "")


def memory(args, device: torch.device) -> None:
    results = []
    for preset in args.presets:
        for checkpointing in (False, True):
            results.append(largest_batch(preset, checkpointing, args, device))
            free(device, args.compile)  # the model and optimizer went with largest_batch's frame
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    print(f"\ndevice memory {fmt(total, '.1f')} GiB; {'compiled' if args.compile else 'eager'}, bf16 autocast, "
          "fused AdamW, fp32 weights and optimizer state; PYTORCH_CUDA_ALLOC_CONF="
          f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}\n")
    print("| date | device | torch | model | activation checkpointing | largest micro-batch | peak GiB at it "
          "| tok/s at it | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        batch = describe_search(r)
        print(f"{row_prefix(device)}| {r['preset']} block {r['block']} | {'yes' if r['checkpointing'] else 'no'} "
              f"| {batch} | {fmt(r['peak'], '.1f')} | {fmt(r['tok_s'])} | {command_line()} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["speed", "memory"])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps: checks the script runs")
    ap.add_argument("--preset", default="gpt2", help="speed: the model")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="speed: micro-batches")
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[16], help="speed: where transformers runs too")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="speed: default on for CUDA; memory: default off")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--profile", action="store_true", help="speed: print the top kernels of 3 steps of ours")
    ap.add_argument("--presets", nargs="+", default=["gpt2", "gpt2-xl"], help="memory: models")
    ap.add_argument("--start-batch", type=int, default=1)
    ap.add_argument("--resolution", type=float, default=0.02,
                    help="memory: stop bisecting when the gap between fitting and failing is this fraction")
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--trial-steps", type=int, default=2)
    ap.add_argument("--time-budget-s", type=float, default=150, help="memory: per model and setting")
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.hf_batches = [2], [2]
        args.steps, args.warmup = 2, 1
        args.max_batch, args.presets = 4, ["smoke"]
    device = pick_device(args.smoke)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as gptforge.common.setup_runtime does
    if args.mode == "speed":
        speed(args, device)
    else:
        memory(args, device)


if __name__ == "__main__":
    main()
