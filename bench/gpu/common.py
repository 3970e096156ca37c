"""What the GPU benchmarks share: import paths, the device line of a result row, peak FLOP/s, sync.

Importing this module puts the repository root (for `gptforge`) and `bench/` (for the CPU benchmarks'
helpers, which these scripts reuse rather than copy) on sys.path, so the scripts run from a plain
checkout without installing anything.
"""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

import torch

GPU_DIR = Path(__file__).resolve().parent
BENCH_DIR = GPU_DIR.parent
REPO = BENCH_DIR.parent
for _path in (REPO, BENCH_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# Dense bf16 tensor-core peaks from the vendor data sheets (no sparsity), for MFU. The H200 has the H100's
# SXM compute with faster memory; a measured large bf16 matmul reaches ~790 TFLOP/s on both.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def pick_device(smoke: bool) -> torch.device:
    """CUDA when present. A smoke run uses the CPU even then, so it checks the same thing everywhere."""
    if smoke or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from bench_train import machine  # the CPU benchmarks' description of the processor

    return machine().split(",")[0]


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak bytes held by tensors since the last reset (CUDA's allocator; None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def fmt(value, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def row_prefix(device: torch.device) -> str:
    """The first cells of every result row: date, device, torch version."""
    return f"| {datetime.date.today()} | {device_name(device)} | torch {torch.__version__} "


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO).as_posix() if script.is_relative_to(REPO) else sys.argv[0]
    return "`python " + shlex.join([shown, *sys.argv[1:]]) + "`"


def profile_table(device: torch.device, fn, calls: int, rows: int = 20, per: int = 1, unit: str = "call") -> str:
    """Run fn() `calls` times under torch.profiler: the kernels (CPU ops on a CPU) taking the most time, and
    on CUDA the kernel count and GPU-busy time per `unit` (one call is `per` units, e.g. decode steps).
    A failure is reported in the text, never raised: a profile must not cost the measurement beside it."""
    from torch.profiler import ProfilerActivity, profile

    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=rows)
        if device.type == "cuda":
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            graphs = sum(1 for e in prof.events() if "cudaGraphLaunch" in e.name)
            n = calls * per
            busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / n
            table += (f"\n{len(kernels) / n:,.1f} GPU kernels and {graphs / n:,.2f} CUDA-graph launches per {unit}, "
                      f"{busy_ms:.3f} ms of GPU time per {unit}\n")
        return table
    except Exception as e:  # noqa: BLE001
        return f"profile failed: {type(e).__name__}: {e}"
