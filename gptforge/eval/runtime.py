"""How evaluation runs a model: unwrapped, in eval mode, without gradients, on one device and dtype.

Every scorer in gptforge.eval goes through `evaluating(model, device, dtype)`, so callers (the CLI, the
training loop mid-run) can hand over whatever they hold: a plain GPT, a torch.compile'd one or a
DDP-wrapped one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn

from gptforge.common import Runtime, UserError, pick_dtype
from gptforge.model import GPTClassifier

DTypeLike = Union[torch.dtype, str, None]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DDP (`.module`) wrappers.

    Evaluation feeds batches of many different shapes; through a compiled model each new shape would
    recompile (build-nanogpt had to skip HellaSwag with torch.compile for this reason). The uncompiled
    module computes the same numbers and shares the same parameters."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def resolve_dtype(dtype: DTypeLike, device: torch.device) -> torch.dtype:
    """None -> float32 (no autocast); names as `--dtype` takes them ('auto', 'bfloat16', ...)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return pick_dtype(dtype, device)


@dataclass
class EvalModel:
    """The unwrapped model with the runtime it is evaluated under."""

    model: nn.Module
    runtime: Runtime

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def block_size(self) -> int:
        return self.model.config.block_size


@contextlib.contextmanager
def evaluating(model: nn.Module, device: Optional[Union[torch.device, str]] = None,
               dtype: DTypeLike = None) -> Iterator[EvalModel]:
    """Unwrap `model`, switch it to eval mode without gradients, and restore its mode afterwards.

    device: None keeps the model where it is; another device moves the model there (in place).
    dtype: autocast dtype (None/float32: none)."""
    model = unwrap_model(model)
    if isinstance(model, GPTClassifier):  # its forward returns class logits, not next-token logits
        raise UserError("this is a classifier checkpoint, not a language model; use `gptforge classify`")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    if param.device != device:
        model.to(device)
    runtime = Runtime(device=device, dtype=resolve_dtype(dtype, device))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield EvalModel(model, runtime)
    finally:
        model.train(was_training)
