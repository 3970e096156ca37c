"""How to compute one decoding step's weight products on a CPU: the options measured side by side, on the
products of one GPT-2 124M step at batch 1 (per layer: qkv 768->2304, proj 768->768, fc 768->3072, proj
3072->768; then the 768->50304 output head), random N(0, 0.02) weights.

    python bench/bench_matvec.py [--threads 1,2] [--repeats 15]
    PYTHONPATH=DIR python bench/bench_matvec.py   # with torchao installed into DIR (pip install --target DIR torchao)

Options: torch's own float32 and bfloat16 F.linear, numpy's BLAS, torch's dynamic int8 quantization
(torch.ao.quantization.quantize_dynamic), torch._weight_int8pack_mm (int8 weights, per-row scales),
torchao's int8 weight-only and dynamic int8 configs (if importable), and gptforge.quantize's PackedLinear
(float32, bfloat16, int8 over gptforge/native). Each repeat runs every option once, in order (ABAB), so a
busy neighbour slows all alike; reported: median ms per step's products (range), the implied GB/s of weights
read, and the load average. This chose `--quantize int8`'s kernel (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import benchutil  # noqa: E402
from gptforge import native  # noqa: E402
from gptforge.quantize import PackedLinear  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50304, 768)]  # (out, in)


def options(linears: list[nn.Linear]) -> dict:
    """name -> (bytes of weights read per step, a function running every product once on x's)."""
    xs = [torch.randn(1, lin.in_features) for lin in linears]
    out = {}

    def add(name, fns, nbytes):
        out[name] = (nbytes, lambda: [f(x) for f, x in zip(fns, xs)])

    n = sum(lin.weight.numel() for lin in linears)
    add("torch float32 F.linear", [lin for lin in linears], 4 * n)
    bf = [(lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()) for lin in linears]
    add("torch bfloat16 F.linear", [lambda x, w=w, b=b: F.linear(x.bfloat16(), w, b).float() for w, b in bf], 2 * n)
    npw = [(lin.weight.detach().numpy(), lin.bias.detach().numpy()) for lin in linears]
    add("numpy float32 (BLAS)", [lambda x, w=w, b=b: torch.from_numpy(x.numpy() @ w.T + b) for w, b in npw], 4 * n)
    dyn = [torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
           for lin in linears]
    add("torch.ao quantize_dynamic int8", dyn, n)
    packs = []
    for lin in linears:
        w = lin.weight.detach()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        packs.append((torch.round(w / scale[:, None]).to(torch.int8), scale, lin.bias.detach()))
    add("torch._weight_int8pack_mm", [lambda x, q=q, s=s, b=b: torch._weight_int8pack_mm(x, q, s) + b
                                      for q, s, b in packs], n)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        for label, config in (("torchao int8 weight-only", Int8WeightOnlyConfig),
                              ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig)):
            mods = [nn.Sequential(nn.Linear(lin.in_features, lin.out_features)) for lin in linears]
            for m, lin in zip(mods, linears):
                m.load_state_dict({"0.weight": lin.weight, "0.bias": lin.bias})
                quantize_(m, config())
            add(label, mods, n)
    except ImportError:
        print("torchao is not installed: its rows are left out", flush=True)
    for kind, width in (("f32", 4), ("bf16", 2), ("int8", 1)):
        add(f"gptforge PackedLinear {kind}", [PackedLinear.from_linear(lin, kind) for lin in linears], width * n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    linears = []
    for o, i in SHAPES:
        lin = nn.Linear(i, o)
        nn.init.normal_(lin.weight, std=0.02)
        linears.append(lin.eval().requires_grad_(False))
    with torch.inference_mode():
        opts = options(linears)
        load_start = os.getloadavg()
        times = {(t, name): [] for t in map(int, args.threads.split(",")) for name in opts}
        for rep in range(args.repeats + 1):  # the first round warms up and is dropped
            for (threads, name) in times:
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                opts[name][1]()
                if rep:
                    times[(threads, name)].append(time.perf_counter() - t0)
        load_end = os.getloadavg()
    print(f"\n{datetime.date.today()}, {benchutil.cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{native.status()}; median of {args.repeats} interleaved repeats; load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load_start)} at the start, {'/'.join(f'{x:.1f}' for x in load_end)} at the end")
    print(f"`{benchutil.command_line()}`\n")
    print("| option | threads | ms per step's products (median) | range | weights GB/s | bound on tok/s |")
    print("|---|---|---|---|---|---|")
    for (threads, name), ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {threads} | **{med * 1e3:.1f}** | {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f} | "
              f"{opts[name][0] / med / 1e9:.1f} | {1 / med:.0f} |")


if __name__ == "__main__":
    main()
