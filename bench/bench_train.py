"""Training throughput, ours vs Hugging Face transformers' GPT2LMHeadModel, same run, same shapes.

Default shape (the foundation issue's CPU target): 6 layers, 6 heads, 384 dims, block 256,
micro-batch 8, vocab 50257, fp32. Each timed step is forward + backward + AdamW update.

    python bench/bench_train.py                      # CPU, fp32
    python bench/bench_train.py --preset gpt2 --block 1024 --batch 16 --device cuda --dtype bfloat16 --compile
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from gptforge.config import ModelConfig, TrainConfig, resolve_model_config
from gptforge.model import GPT
from gptforge.train.optim import make_optimizer


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def hf_model(cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, attn_implementation="sdpa", n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, activation_function="gelu_new")
    return GPT2LMHeadModel(hf_cfg)


def time_steps(step, sync, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--dims", type=int, default=384)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig(preset=args.preset, n_layer=args.layers, n_head=args.heads, n_embd=args.dims,
                      block_size=args.block, vocab_size=args.vocab, bias=True, dropout=0.0)
    cfg = resolve_model_config(cfg) if args.preset else cfg.validate()
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device=device)
    y = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else torch.autocast(device.type, enabled=False))
    tokens = args.batch * cfg.block_size
    results = {}

    def bench(name, model, loss_of):
        model.to(device).train()
        opt = make_optimizer(model, TrainConfig(lr=1e-4), device.type)
        fn = torch.compile(model) if args.compile else model

        def step():
            with autocast:
                loss = loss_of(fn)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = time_steps(step, sync, args.warmup, args.steps)
        results[name] = tokens / statistics.median(times)

    bench("gptforge", GPT(cfg), lambda m: m(x, y)[1])
    if not args.skip_hf:
        # HF shifts labels internally: pass inputs as labels with an extra column so both see B*T targets.
        full = torch.cat([x, y[:, -1:]], dim=1)[:, : cfg.block_size]
        bench("transformers", hf_model(cfg), lambda m: m(input_ids=full, labels=full).loss)

    date = time.strftime("%Y-%m-%d")
    shape = f"{cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}d, block {cfg.block_size}, batch {args.batch}, vocab {cfg.vocab_size}"
    print(f"# {date} | {machine()} | {device} {args.dtype}{' compile' if args.compile else ''} | {shape}")
    for name, tps in results.items():
        print(f"{name:>14}: {tps:,.0f} tok/s")
    if "transformers" in results:
        print(f"{'ratio':>14}: {results['gptforge'] / results['transformers']:.2f}x")


if __name__ == "__main__":
    main()
