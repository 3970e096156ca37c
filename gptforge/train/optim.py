"""AdamW with decay / no-decay parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch

from gptforge.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    # Weight decay on matrices (Linear weights, embeddings); none on biases and LayerNorm gains, which
    # are 1-D: decaying them only pulls them towards zero without regularising anything useful.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel does the whole update in one pass over each tensor (CUDA and, since torch 2.4,
    # CPU), instead of a dozen elementwise passes; MPS keeps the default foreach path.
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, cosine decay to cfg.lr * min_lr_ratio at lr_decay_steps, then flat."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
