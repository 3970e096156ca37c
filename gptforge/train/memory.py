"""How much memory training takes, and `--train.micro_batch_size auto`: the largest micro-batch that fits.

Predicted bytes per process (docs/scale.md has the table and where the numbers come from), P parameters,
N processes sharing them under FSDP (N = 1 otherwise), T tokens per sequence, C width, L layers, V vocabulary:
    parameters   4P / N                 fp32 master weights (+2P while bf16 autocast caches its copies)
    gradients    4P / N
    optimizer    8P / N                 AdamW's two moments; Muon keeps one for the hidden matrices
    activations  per sequence: L * a * T * C * s  with s bytes per activation (2 for bf16, 4 for fp32) and
                 a = 20 values per token and unit of width kept for backward by one block: measured here (CPU,
                 SDPA, fp32: 350 MiB for 6 blocks of width 384 x 8 sequences of 256 tokens, docs/gpu.md: 19.4),
                 near Korthikanti et al. 2022's 17 (their 34 bytes at 16 bits, without the attention matrix
                 that flash attention never stores). With activation checkpointing: each block's input plus
                 one block's worth. Plus the loss head's fp32 weight gradient (4VC) and one chunk of logits
                 (4 * 1024 * V), whatever the micro-batch.
`auto` keeps --train.tokens_per_step (the global batch) and picks a micro-batch that divides it:
    CUDA, one process or DDP: trial steps of the real model (doubling by divisor, then bisection), the first
    that runs out of memory or leaves less than `margin` free ends the search; activation checkpointing is
    switched on when it buys a larger micro-batch.
    CUDA under FSDP, and CPU: the prediction above against the GPU's memory, or against half the RAM
    available now (split between the processes of the run) on a CPU. Untested on a GPU here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from gptforge.common import Runtime, UserError, is_out_of_memory
from gptforge.config import ModelConfig, TrainConfig
from gptforge.model import GPT
from gptforge.train.parallelize import apply_activation_checkpointing, remove_activation_checkpointing

ACTIVATION_VALUES = 20  # kept per token and per unit of width by one block (see the module docstring)
LOSS_CHUNK_ROWS = 1024  # model.linear_cross_entropy's chunk
GPU_MARGIN = 0.10  # of the GPU's memory left free: fragmentation, the allocator's cache, a longer step
RAM_SHARE = 0.5  # of the available RAM a CPU run plans to use


@dataclass
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations


def predict_memory(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype = torch.float32, optimizer: str = "adamw",
                   activation_checkpointing: bool = False, shards: int = 1) -> MemoryEstimate:
    """Bytes one process needs to train `cfg` on micro-batches of `micro_batch` sequences of block_size
    tokens (see the module docstring)."""
    P, T, C, L, V = cfg.parameter_count, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
    s = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    hidden = L * 12 * C * C  # the blocks' weight matrices: Muon keeps one momentum for them, AdamW two
    moments = 2 * P - (hidden if optimizer == "muon" else 0)
    per_block = ACTIVATION_VALUES * T * C * s
    kept = L * T * C * 4 + per_block if activation_checkpointing else L * per_block  # block inputs: the fp32 stream
    return MemoryEstimate(parameters=4 * P // shards + (2 * P if s == 2 and shards == 1 else 0),
                          gradients=4 * P // shards, optimizer=4 * moments // shards,
                          activations=micro_batch * kept + 4 * V * C + 4 * LOSS_CHUNK_ROWS * V)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_fitting(candidates: list[int], fits: Callable[[int], bool]) -> int:
    """The largest candidate (ascending) for which fits() holds, assuming that what fits, every smaller one
    does too: doubling through the list, then bisection. 0 when none fits."""
    lo, hi = -1, len(candidates)  # candidates[lo] fits, candidates[hi] does not (the ends: unknown)
    step = 1
    while lo + step < hi:  # doubling
        if fits(candidates[lo + step]):
            lo, step = lo + step, step * 2
        else:
            hi = lo + step
            break
    while hi - lo > 1:  # bisection
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            lo = mid
        else:
            hi = mid
    return candidates[lo] if lo >= 0 else 0


class MemoryMeter(Protocol):
    """Where a trial step's memory is read (CUDA's allocator; a test injects its own)."""

    def capacity(self) -> int: ...
    def reset(self) -> None: ...
    def peak(self) -> int: ...


class CudaMemory:
    def __init__(self, device: torch.device):
        self.device = device

    def capacity(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def reset(self) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def trial_fits(model: GPT, tc: TrainConfig, runtime: Runtime, meter: MemoryMeter,
               margin: float = GPU_MARGIN) -> Callable[[int], bool]:
    """fits(n): a forward and backward of n random sequences runs without running out of memory, and its
    peak plus the optimizer state (allocated at the first real step) leaves `margin` of the memory free.
    Every process tries the same n and they agree (all must fit)."""
    optimizer_bytes = predict_memory(model.config, 1, optimizer=tc.optimizer).optimizer
    generator = torch.Generator(device=runtime.device).manual_seed(0)

    def fits(n: int) -> bool:
        model.zero_grad(set_to_none=True)
        meter.reset()
        try:
            x = torch.randint(0, model.config.vocab_size, (n, model.config.block_size), device=runtime.device,
                              generator=generator)
            with runtime.autocast():
                _, loss = model(x, x)
            loss.backward()
            ok = meter.peak() + optimizer_bytes <= (1 - margin) * meter.capacity()
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            ok = False
        finally:
            model.zero_grad(set_to_none=True)
        return _everywhere(ok, runtime)

    return fits


def choose_micro_batch(model: GPT, tc: TrainConfig, runtime: Runtime, strategy: str,
                       meter: Optional[MemoryMeter] = None) -> TrainConfig:
    """`tc` with micro_batch_size "auto" replaced by a number (and activation checkpointing switched on when
    it buys a larger one); say what was chosen. `meter`: trial steps measured there (CUDA's by default)."""
    if not tc.tokens_per_step:
        raise UserError("--train.micro_batch_size auto keeps the global batch: give it with --train.tokens_per_step "
                        f"(e.g. {12 * model.config.block_size * runtime.world_size}: 12 sequences per process)")
    per_sequence = model.config.block_size * runtime.world_size
    if tc.tokens_per_step % per_sequence:
        raise UserError(f"train.tokens_per_step={tc.tokens_per_step} is not a whole number of sequences of "
                        f"block_size x processes = {per_sequence} tokens; use a multiple of {per_sequence}")
    candidates = divisors(tc.tokens_per_step // per_sequence)
    if meter is None and runtime.device_type == "cuda" and strategy != "fsdp":
        meter = CudaMemory(runtime.device)
    if meter is not None:
        how, largest = "the largest that ran a trial step", _trial_search(model, tc, runtime, meter, candidates)
    else:
        how, largest = "predicted: docs/scale.md", _predicted_search(model.config, tc, runtime, strategy, candidates)
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:  # trial steps draw dropout masks: the run's random streams are put back as they were
        chosen, checkpointing = _choose(candidates, largest, forced=tc.activation_checkpointing)
    finally:
        remove_activation_checkpointing(model)  # parallelize applies it if chosen
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
    if not chosen:
        raise UserError(f"not even one sequence per micro-batch fits in memory ({how}); use a smaller model or "
                        "context, --train.strategy fsdp over more processes, or more memory")
    accumulation = tc.tokens_per_step // (chosen * per_sequence)
    runtime.print(f"micro_batch_size auto: {chosen} sequences ({how}), {accumulation} micro-steps per step"
                  + ("; activation checkpointing on" if checkpointing else ""))
    return dataclasses.replace(tc, micro_batch_size=chosen, activation_checkpointing=checkpointing)


def _choose(candidates: list[int], largest: Callable[[bool], int], forced: bool) -> tuple[int, bool]:
    """(micro-batch, activation checkpointing): checkpointing when asked for, or when the plain search stops
    short of the largest candidate and checkpointing goes further."""
    if forced:
        return largest(True), True
    plain = largest(False)
    if plain < candidates[-1]:
        checkpointed = largest(True)
        if checkpointed > plain:
            return checkpointed, True
    return plain, False


def _trial_search(model: GPT, tc: TrainConfig, runtime: Runtime, meter: MemoryMeter,
                  candidates: list[int]) -> Callable[[bool], int]:
    fits = trial_fits(model, tc, runtime, meter)

    def largest(checkpointing: bool) -> int:
        if checkpointing:
            apply_activation_checkpointing(model)
        else:
            remove_activation_checkpointing(model)
        return largest_fitting(candidates, fits)

    return largest


def _predicted_search(cfg: ModelConfig, tc: TrainConfig, runtime: Runtime, strategy: str,
                      candidates: list[int]) -> Callable[[bool], int]:
    shards = runtime.world_size if strategy == "fsdp" else 1
    if runtime.device_type == "cuda":
        budget = (1 - GPU_MARGIN) * torch.cuda.get_device_properties(runtime.device).total_memory
    else:  # every process of the run on this machine, at worst
        budget = RAM_SHARE * available_ram() / runtime.world_size

    def largest(checkpointing: bool) -> int:
        return largest_fitting(candidates, lambda n: predict_memory(
            cfg, n, runtime.dtype, tc.optimizer, checkpointing, shards).total <= budget)

    return largest


def available_ram() -> int:
    """Bytes of RAM available now (Linux: MemAvailable), else the machine's total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _everywhere(ok: bool, runtime: Runtime) -> bool:
    if not runtime.distributed:
        return ok
    import torch.distributed as dist

    flag = torch.tensor(int(ok), device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)
