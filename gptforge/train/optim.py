"""Optimizers (AdamW; opt-in Muon for hidden matrices) and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch

from gptforge.common import UserError
from gptforge.config import TrainConfig


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return _adamw(model, cfg, device_type)
    if cfg.optimizer == "muon":
        return _muon(model, cfg)
    raise UserError(f"unknown optimizer '{cfg.optimizer}'; use adamw or muon")


def _adamw(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
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


def _muon(model: torch.nn.Module, cfg: TrainConfig) -> "Muon":
    # Muon only suits the hidden weight matrices (inside blocks); embeddings, the tied output head,
    # biases and LayerNorm gains keep an AdamW update.
    hidden, other_matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and ".h." in f".{name}":
            hidden.append(p)
        elif p.dim() >= 2:
            other_matrices.append(p)
        else:
            vectors.append(p)
    groups = [
        {"params": hidden, "use_muon": True, "lr_scale": cfg.muon_lr / cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": other_matrices, "use_muon": False, "lr_scale": 1.0, "weight_decay": cfg.weight_decay},
        {"params": vectors, "use_muon": False, "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    return Muon(groups, lr=cfg.lr, momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2))


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately replace g's singular values by 1 (U S V^T -> U V^T) with a quintic Newton-Schulz
    iteration; its coefficients push singular values in (0, 1] towards ~1 in few steps, trading exactness
    for speed (Muon needs only the rough orthogonal direction)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.t()  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.t() if tall else x


def _orthogonalize_whole(g: torch.Tensor) -> torch.Tensor:
    """orthogonalize(g) for a whole matrix, also when FSDP shards it by rows (a DTensor): the matrix is
    gathered on every process, each orthogonalises it (the same result everywhere: same input, same ops)
    and keeps its own rows. The other way, torchtitan's DistMuon, gives each matrix to one process and
    scatters the result: less arithmetic, more communication and code; docs/scale.md has the measurement."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(g, DTensor):
        return orthogonalize(g)
    return distribute_tensor(orthogonalize(g.full_tensor()), g.device_mesh, g.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz for hidden matrices; AdamW for every other group.

    Muon groups: Nesterov momentum, then the update is orthogonalised, so every direction of the
    matrix moves by a similar amount, scaled by sqrt(max(1, rows/cols)). Decoupled weight decay in both.
    The loop sets group["lr"] = schedule(step) * group["lr_scale"]."""

    def __init__(self, groups, lr: float, momentum: float = 0.95, betas=(0.9, 0.95), eps: float = 1e-8):
        super().__init__(groups, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, lr_scale=1.0,
                                      use_muon=False, weight_decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)
                if group["use_muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = _orthogonalize_whole(p.grad.add(buf, alpha=group["momentum"]))  # Nesterov
                    p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                else:
                    self._adamw_update(p, state, group)
        return None

    @staticmethod
    def _adamw_update(p, state, group):
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0  # a Python int: reading a device tensor here would sync every parameter
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


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
