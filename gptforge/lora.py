"""LoRA: low-rank adapters swapped into an existing model's Linear layers. Pure math, no I/O.

A frozen weight W (out, in) gets a trainable update scale * B @ A with A (r, in), B (out, r), r << in:
    y = x W^T + b + scale * dropout(x) A^T B^T,    scale = alpha / r
B starts at zero, so a freshly wrapped model computes exactly what the base model does; training moves
only A and B (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

`LoRALinear` subclasses nn.Linear and keeps the base layer's own `weight`/`bias` Parameters, so the
base weights keep their state_dict names (`...attn.c_attn.weight`) and a checkpoint written from an
adapted model differs from a plain one only by the added `...lora_A` / `...lora_B` entries.

Targets are named groups of Linear layers inside every transformer block:
    attn  attn.c_attn (fused q, k, v) and attn.c_proj (attention output)
    qkv   attn.c_attn only (closest to the paper's q/v-only setting, the cheapest)
    mlp   mlp.c_fc and mlp.c_proj
The output head is never wrapped: it is tied to the token embedding, and the loss reads
`lm_head.weight` directly (model.linear_cross_entropy), which would bypass an adapter.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.common import UserError
from gptforge.config import LORA_TARGETS, LoRAConfig  # noqa: F401 - LoRAConfig: lora's own API too

ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Linear):
    """An nn.Linear whose frozen weight is adapted by scale * B @ A.

    Built around an existing layer: it takes over that layer's `weight` and `bias` Parameters (same
    tensors, no copy), so state_dict names and any tying stay as they were.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate and initialise a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in)
        self.register_parameter("bias", base.bias)  # (out,) or None
        if getattr(base, "residual_projection", False):
            self.residual_projection = True  # keep the marker GPT._init_weights reads
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # (out, r): zero => no change
        # A is initialised the way nn.Linear initialises a weight (as peft does), so the first updates of
        # B see the input projected onto r random directions of sensible size.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        update = self.lora_dropout(x) @ self.lora_A.t()  # (..., r): through the bottleneck first
        return y + (update @ self.lora_B.t()) * self.scale  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, the (out, in) update this adapter adds to the weight, computed in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _target_paths(targets: list[str]) -> set[str]:
    return {path for t in targets for path in LORA_TARGETS[t]}


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every parameter of `model` and swap adapters into the target layers, in place.

    Returns the model. Layers are found by name (`....attn.c_attn`, ...), so a wrapper around a GPT
    (a classification model, say) works too; a head it adds stays frozen until the caller unfreezes it.
    """
    cfg.validate()
    if has_lora(model):
        raise ValueError("model already has LoRA adapters; merge_lora it first to stack another set")
    paths = _target_paths(cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    swaps = []
    for name, module in model.named_modules():
        parent_name, _, child = name.rpartition(".")
        if type(module) is nn.Linear and ".".join(name.split(".")[-2:]) in paths:
            swaps.append((model.get_submodule(parent_name), child, module))
    if not swaps:
        raise UserError(f"no layers matching lora targets {cfg.targets} in {type(model).__name__}")
    for parent, child, linear in swaps:
        setattr(parent, child, LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only, under their full module names (`transformer.h.0.attn.c_attn.lora_A`, ...)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(ADAPTER_SUFFIXES)}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapters into a model that `apply_lora` prepared with the same targets and rank.

    Strict: names and shapes must match exactly. Copies in place, so an optimizer built over the
    adapters keeps pointing at them.
    """
    own = lora_state_dict(model)
    if not own:
        raise UserError("the model has no LoRA adapters; call apply_lora with the adapters' config first")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"LoRA adapters do not match the model: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}; apply_lora with the targets they were trained with")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise UserError(f"LoRA adapter {name} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(own[name].shape)}; apply_lora with the rank they were trained with")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale * B @ A) and put plain nn.Linear back.

    In place; returns the model. The result has the base model's structure and state_dict names, and
    all its parameters are trainable again, as a freshly loaded model's are.
    """
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, lora in swaps:
        with torch.no_grad():
            lora.weight += lora.delta_weight().to(lora.weight.dtype)
        linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        linear.weight, linear.bias = lora.weight, lora.bias  # the same Parameters, now merged
        if getattr(lora, "residual_projection", False):
            linear.residual_projection = True
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once."""
    params = list(model.parameters())  # nn.Module.parameters() already yields a tied tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
