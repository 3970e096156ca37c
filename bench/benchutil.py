"""What every benchmark's result row says about where and how it ran."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def load_average() -> float:
    """1-minute load average: timings taken while it is above the core count are pessimistic."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def command_line() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def timed_interleaved(fns: dict, runs: int) -> dict:
    """Median seconds and last output of each fn. Runs alternate between the contenders, so a busy
    neighbour on a shared machine slows both sides alike instead of whichever ran during the spike."""
    import statistics
    import time

    outs = {name: fn() for name, fn in fns.items()}  # warm-up: allocator, kernels, lazy initialisation
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), outs[name]) for name, t in times.items()}
