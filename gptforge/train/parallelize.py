"""Training techniques applied from outside the model, in one function and in this order (as torchtitan's
`parallelize_llama`): activation checkpointing wraps each block, then torch.compile, then DDP.

The model (model.py) stays single-device math with no training flags; everything here changes how it is run,
never what it computes (tests hold each technique to the plain path).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.nn as nn

from gptforge.common import Runtime, UserError
from gptforge.config import TrainConfig
from gptforge.model import GPT

STRATEGIES = ("auto", "single", "ddp")


@dataclass
class Parallel:
    """A model set up for training: `module` is what the training forward calls (compiled, wrapped), `model`
    the GPT underneath (what is saved, sampled and evaluated on rank 0)."""

    module: nn.Module
    model: GPT
    strategy: str

    def no_sync(self) -> ContextManager:
        """Around every micro-step of an accumulation but the last: gradients are all-reduced once per step."""
        if self.strategy == "ddp":
            return self.module.no_sync()
        return contextlib.nullcontext()


def resolve_strategy(requested: str, runtime: Runtime) -> str:
    """auto: DDP under torchrun with several processes, else one process (today's behaviour)."""
    if requested not in STRATEGIES:
        raise UserError(f"unknown --train.strategy '{requested}'; use {', '.join(STRATEGIES)}")
    if requested == "auto":
        return "ddp" if runtime.distributed else "single"
    if requested == "single" and runtime.distributed:
        raise UserError(f"--train.strategy single trains in one process, but torchrun started {runtime.world_size}; "
                        "use --train.strategy ddp, or launch one process")
    if requested == "ddp" and not runtime.distributed:
        return "single"  # DDP over one process is plain training
    return requested


def parallelize(model: GPT, tc: TrainConfig, runtime: Runtime) -> Parallel:
    """Activation checkpointing, then compile, then the data-parallel strategy; the optimizer is built after."""
    strategy = resolve_strategy(tc.strategy, runtime)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    module: nn.Module = torch.compile(model) if tc.compile else model  # a wrapper: `model` stays uncompiled
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[runtime.local_rank] if runtime.device_type == "cuda" else None)
    return Parallel(module=module, model=model, strategy=strategy)


# --- activation checkpointing ------------------------------------------------------------------------
class _RecomputedInBackward:
    """Mixed into a block's class: during a training forward that a backward will follow, keep only the
    block's input and recompute the rest in backward. A block then holds one (B, T, C) tensor instead of the
    ~16 (B, T, C)-sized ones its backward needs otherwise, for one extra forward of the blocks (~1/3 more
    compute). Forwards without a backward (eval, no_grad, decoding with the KV cache) run as before."""

    def forward(self, x, attn_mask=None, cache=None):
        if self.training and torch.is_grad_enabled() and cache is None:
            # Non-reentrant: works under torch.compile and with frozen inputs; the RNG state is saved and
            # restored, so dropout draws the same masks when the block is recomputed.
            return torch.utils.checkpoint.checkpoint(super().forward, x, attn_mask, use_reentrant=False)
        return super().forward(x, attn_mask, cache)


_recomputed_classes: dict[type, type] = {}


def apply_activation_checkpointing(model: GPT) -> GPT:
    """Checkpoint every block, in place. The block's class is swapped for a subclass (as FSDP's fully_shard
    does) rather than the block wrapped in another module, so parameter names, state dicts, LoRA and the
    optimizer see the same model."""
    import torch.utils.checkpoint  # noqa: F401  (the submodule _RecomputedInBackward calls)

    for block in model.transformer.h:
        cls = type(block)
        if not isinstance(block, _RecomputedInBackward):
            if cls not in _recomputed_classes:
                _recomputed_classes[cls] = type(f"Recomputed{cls.__name__}", (_RecomputedInBackward, cls), {})
            block.__class__ = _recomputed_classes[cls]
    return model


def is_activation_checkpointed(model: GPT) -> bool:
    return all(isinstance(block, _RecomputedInBackward) for block in model.transformer.h)
