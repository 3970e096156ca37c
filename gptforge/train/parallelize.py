"""Training techniques applied from outside the model, in one function and in this order (as torchtitan's
`parallelize_llama`): activation checkpointing wraps each block, then torch.compile, then DDP or FSDP.

The model (model.py) stays single-device math with no training flags; everything here changes how it is run,
never what it computes (tests hold each technique to the plain path).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
import torch.nn as nn

from gptforge.common import Runtime, UserError
from gptforge.config import TrainConfig
from gptforge.model import GPT

STRATEGIES = ("auto", "single", "ddp", "fsdp")


@dataclass
class Parallel:
    """A model set up for training: `module` is what the training forward calls (compiled, wrapped), `model`
    the GPT underneath (sharded in place under FSDP). `skeleton`: under FSDP, a copy of the model's structure
    without storage (meta tensors), from which `plain_model` builds whole copies."""

    module: nn.Module
    model: GPT
    strategy: str
    runtime: Runtime
    skeleton: Optional[GPT] = None

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def no_sync(self) -> ContextManager:
        """Around every micro-step of an accumulation but the last: gradients are reduced once per step."""
        if self.strategy == "ddp":
            return self.module.no_sync()
        if self.sharded:
            return _fsdp_without_gradient_sync(self.model)
        return contextlib.nullcontext()

    def plain_model(self) -> Optional[GPT]:
        """The whole model as one ordinary module on rank 0 (None on other ranks), for what runs there alone:
        samples, benchmarks, consolidated checkpoints. Without FSDP it is the model itself; under FSDP a copy
        gathered from every rank's shards (a collective: every rank calls it at the same point)."""
        if not self.sharded:
            return self.model if self.runtime.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.runtime.is_main:
            return None
        plain = copy.deepcopy(self.skeleton).to_empty(device=self.runtime.device)
        plain.load_state_dict(full, assign=True)
        if plain.config.tie_embeddings:
            plain.lm_head.weight = plain.transformer.wte.weight
        return plain


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
    """Activation checkpointing, then compile, then the data-parallel strategy; the optimizer is built after
    (under FSDP it must see the sharded parameters)."""
    strategy = resolve_strategy(tc.strategy, runtime)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if strategy == "fsdp":
        if runtime.dtype == torch.float16:
            raise UserError("--train.dtype float16 needs a loss scaler that FSDP does not share here; use "
                            "--train.dtype bfloat16 (or float32) with --train.strategy fsdp")
        skeleton = meta_copy(model)
        if tc.compile:
            for block in model.transformer.h:  # per block, in place, before sharding (as torchtitan)
                block.compile()
        apply_fsdp(model, runtime)
        return Parallel(module=model, model=model, strategy=strategy, runtime=runtime, skeleton=skeleton)
    module: nn.Module = torch.compile(model) if tc.compile else model  # a wrapper: `model` stays uncompiled
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(module, device_ids=[runtime.local_rank] if runtime.device_type == "cuda" else None)
    return Parallel(module=module, model=model, strategy=strategy, runtime=runtime)


# --- FSDP2 ----------------------------------------------------------------------------------------------
def apply_fsdp(model: GPT, runtime: Runtime) -> None:
    """Shard the model over all processes with FSDP2: one unit per block, and the root (tied token embedding
    and head, positions, final norm, a classifier) as one more. Each rank then holds 1/N of every
    parameter, gradient and optimizer state; a unit's parameters are gathered just before it runs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(runtime)
    # An explicit mesh of the runtime's device type: without one, a CPU run on a machine that sees CUDA
    # would put the shards on the GPU, where gloo cannot reach them (pytorch issue 132471).
    mesh = init_device_mesh(runtime.device_type, (runtime.world_size,))
    if dist.get_world_size() > 1:  # as DDP does: every rank starts from rank 0's weights (seeds differ by rank)
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    policy = _mixed_precision(runtime)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _mixed_precision(runtime: Runtime):
    """On GPUs with bfloat16: parameters gathered and computed in bf16, gradients reduced in fp32 (the
    sharded master weights and optimizer stay fp32). Elsewhere: fp32 throughout. Untested on a GPU here."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if runtime.device_type == "cuda" and runtime.dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def ensure_process_group(runtime: Runtime) -> None:
    """FSDP needs a process group even in one process (a run resumed on one rank keeps its sharded format)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if runtime.device_type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def _fsdp_without_gradient_sync(model: GPT):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def meta_copy(model: GPT) -> GPT:
    """The model's structure with every parameter replaced by a meta tensor (no storage), tied weights still
    tied and requires_grad kept: a template for whole copies of a sharded model."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


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


def remove_activation_checkpointing(model: GPT) -> GPT:
    """Undo apply_activation_checkpointing (micro_batch_size auto tries both)."""
    for block in model.transformer.h:
        if isinstance(block, _RecomputedInBackward):
            block.__class__ = type(block).__bases__[1]
    return model


def is_activation_checkpointed(model: GPT) -> bool:
    return all(isinstance(block, _RecomputedInBackward) for block in model.transformer.h)
