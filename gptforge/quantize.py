"""CPU inference weights: a loaded model's Linear layers (and its tied embedding/head) swapped for modules
that hold their weights as float32, bfloat16 or blockwise int8, cast once here and never per step.

    quantize_model(model, "int8")   # ~1/4 of the memory and of the bytes each decoding step reads
    quantize_model(model, "bf16")   # half; weights rounded to bfloat16, products in float32
    quantize_model(model, None)     # float32, the same results up to rounding, faster small products

Why it pays: decoding one token reads every weight once, so on a CPU a step costs about (bytes of weights)
/ (memory bandwidth). The products of a few rows (decoding, small batches) run in our C kernels
(`gptforge.native`: every core, each weight row streamed once, the int8 dot products on VNNI), over
weights kept in transparent huge pages (in a virtual machine, 4 KiB pages made the same loop ~30% slower
here: TLB misses). Larger products (a long prompt's prefill, eval batches) go to the same kernels for
int8/bf16 and to torch's matmul for float32. Without a C compiler every product runs in torch with the
same arithmetic, slower: weights are then dequantized a block of rows at a time, never all at once.

int8 numerics: one scale per 64 weights of a row (symmetric, round to nearest), llama.cpp's Q8_0 with
blocks of 64. Activations are quantized per call, per 64 values of a row, to two int8 digits: the first
rounds x to the block's int8 steps, the second rounds what is left in steps 254 times finer. Both digits
multiply the same int8 weights (two VNNI instructions a weight load: the step stays bound by reading the
weights), exact in int32, so the activations carry ~15 bits and nearly all the error is the weights' own
(measured in docs/benchmarks.md: fewer greedy flips than with one digit, Q8_0's way).
int8 layout: rows in groups of 16, four columns of each of the 16 rows side by side (see matvec.c), so one
VNNI instruction serves 16 rows; `dequantize_rows` and the tied embedding read rows back out of it.

Inference only: swapped modules have no gradients and their weights are not saved with the model.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge import native
from gptforge.common import UserError
from gptforge.lora import has_lora, merge_lora
from gptforge.model import Block

WEIGHTS = ("int8", "bf16")  # the values of --quantize; None keeps float32
QBLOCK = 64  # matvec.c's QB
GROUP = 16  # int8 weight rows interleaved together (matvec.c's layout)
X_DIGIT = 254  # matvec.c's XL: activations are two int8 digits, the second in 1/254 steps of the first
NATIVE_MAX_ROWS_F32 = 16  # float32 products of more rows of x than this go to torch's matmul (a GEMM)
FALLBACK_CHUNK_BYTES = 4 << 20  # the torch fallback dequantizes at most this much of a weight at once
_HUGE_PAGE = 2 << 20


def quantize_model(model: nn.Module, weights: Optional[str]) -> nn.Module:
    """Swap every nn.Linear of a CPU model (LoRA adapters folded in first) for a `PackedLinear` holding its
    weight as `weights` ('int8', 'bf16', or None for float32); a tied embedding then reads the head's
    packed rows. In place; returns the model, in eval mode. Calling it again on a prepared model is an error."""
    if weights not in (None, *WEIGHTS):
        raise UserError(f"unknown weight type {weights!r}; use {', '.join(WEIGHTS)} (or leave it out for float32)")
    if any(isinstance(m, (PackedLinear, PackedEmbedding)) for m in model.modules()):
        raise UserError("this model's weights are already packed for inference; load it again to change them")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"packed weights (--quantize) are for CPU inference; the model is on {device}: on a GPU "
                        "use --dtype bfloat16 instead")
    if has_lora(model):
        merge_lora(model)
    model.eval().requires_grad_(False)
    kind = weights or "f32"
    transformer = getattr(model, "transformer", None)
    tied = transformer is not None and getattr(model, "lm_head", None) is not None \
        and model.lm_head.weight is transformer.wte.weight
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PackedLinear.from_linear(module, kind))
    if tied:
        transformer.wte = PackedEmbedding(model.lm_head)
    if transformer is not None and hasattr(transformer, "h"):
        for i, block in enumerate(transformer.h):
            if isinstance(block, Block):
                transformer.h[i] = PackedBlock(block)
    model.packed_weights = kind  # for reports: what the model's products run on
    model.register_forward_pre_hook(_decode_step_begins, with_kwargs=True)
    model.register_forward_hook(_decode_step_ends, always_call=True)
    return model


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed as 'f32', 'bf16' or 'int8' (see the module docstring). Inference only."""

    def __init__(self, in_features: int, out_features: int, kind: str, packed: torch.Tensor,
                 scales: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        # not saved with the model: these are a derived, machine-specific form of its weights
        # f32/bf16 (N, K); int8 (N16 / GROUP, Kp / QBLOCK, QBLOCK / 4, GROUP, 4) uint8, rows interleaved
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)  # int8: (N16 / GROUP, Kp / QBLOCK, GROUP) float32
        self.register_buffer("bias", bias, persistent=False)  # (N,) float32 or None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> "PackedLinear":
        w = linear.weight.detach().float()  # (N, K)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        packed, scales = pack_weight(w, kind)
        return cls(linear.in_features, linear.out_features, kind, packed, scales, bias)

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight itself (float32 packing only): what the fused training loss and nn.Linear
        users read. Quantized packings have no float32 weight to give."""
        if self.kind != "f32":
            raise AttributeError(f"a {self.kind} PackedLinear has no float32 weight")
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K).float()  # (M, K)
        M = x2.size(0)
        lib = native.load() if x2.device.type == "cpu" else None
        if self.kind == "f32" and (lib is None or M > NATIVE_MAX_ROWS_F32):
            return F.linear(x2, self.packed, self.bias).view(*lead, self.out_features)
        if lib is None or M == 0:
            return self._torch_forward(x2).view(*lead, self.out_features)
        x2 = x2.contiguous()
        y = torch.empty(M, self.out_features)
        _sync_threads(lib)
        rc = lib.gf_matvec(native.KINDS[self.kind], x2.data_ptr(), self.packed.data_ptr(),
                           self.scales.data_ptr() if self.scales is not None else None,
                           self.bias.data_ptr() if self.bias is not None else None, y.data_ptr(),
                           M, self.out_features, K)
        if rc != 0:
            raise MemoryError(f"no memory for the int8 activations of {M} rows")
        return y.view(*lead, self.out_features)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The kernels' arithmetic in torch, a block of weight rows at a time (no C compiler here)."""
        if self.kind == "int8":
            x = fake_quantize_rows(x, self.padded_in_features)  # (M, Kp)
        y = torch.empty(x.size(0), self.out_features)
        rows = max(1, FALLBACK_CHUNK_BYTES // (4 * self.padded_in_features))
        for j in range(0, self.out_features, rows):
            y[:, j:j + rows] = x @ self.dequantize_rows(j, j + rows).t()
        return y + self.bias if self.bias is not None else y

    @property
    def padded_in_features(self) -> int:
        """Row length as packed: in_features, rounded up to QBLOCK for int8."""
        return -(-self.in_features // QBLOCK) * QBLOCK if self.kind == "int8" else self.in_features

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        """Weight rows [start, end) as float32 (N', K or Kp). Used by the torch fallback and embeddings,
        never on all rows of a large weight at once."""
        end = min(end, self.out_features)
        if self.kind != "int8":
            return self.packed[start:end].float()
        return self.dequantize(torch.arange(start, end))

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        """int8 weight rows `rows` (n,) as float32 (n, Kp), read out of the interleaved layout."""
        group, lane = rows // GROUP, rows % GROUP
        q = self.packed[group, :, :, lane, :]  # (n, Kp / QBLOCK, QBLOCK / 4, 4)
        blocks = q.reshape(rows.numel(), -1, QBLOCK).float().sub_(128)  # (n, Kp / QBLOCK, QBLOCK)
        return (blocks * self.scales[group, :, lane][:, :, None]).view(rows.numel(), -1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.kind}, " \
               f"bias={self.bias is not None}"


class PackedBlock(nn.Module):
    """A transformer block whose one-token decoding steps (a KV cache, one new position) run in C
    (gptforge/native/block.c: LayerNorm, the packed products, attention over the cache, GELU, residuals:
    the block's arithmetic without ~15 torch operations' dispatch). Everything else (prefill, no cache,
    no C compiler) runs the wrapped Block itself."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block
        self.train(block.training)
        self._desc, self._key, self._held = None, None, []  # the C descriptor and what it points into

    @property
    def attn(self) -> nn.Module:  # what GPT.set_attention reaches for
        return self.block.attn

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        lib = native.load() if cache is not None and x.size(1) == 1 else None
        desc = self._descriptor() if lib is not None and self._fits(x, attn_mask, cache) else None
        if desc is None:
            return self.block(x, attn_mask, cache)
        k, v, pos = cache  # (B, nh, max_len, hs) each
        B, _, C = x.shape
        out = x.contiguous().clone()  # (B, 1, C): the residual stream, updated in place by the C step
        mask = None
        if attn_mask is not None:  # (B, 1, 1, pos + 1): the slots each row attends
            mask = attn_mask.expand(B, 1, 1, pos + 1).reshape(B, pos + 1).contiguous()
        _sync_threads(lib)
        rc = lib.gf_block_step(ctypes.byref(desc), out.data_ptr(), B, C, self.block.attn.n_head,
                               k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2), pos,
                               mask.data_ptr() if mask is not None else None, pos + 1)
        if rc != 0:
            raise MemoryError(f"no memory for a decoding step of {B} rows")
        return out

    def _fits(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], cache) -> bool:
        """The C step's assumptions about this step's inputs; anything else takes the torch path."""
        k, v, pos = cache
        return (x.dtype == k.dtype == v.dtype == torch.float32 and x.device.type == "cpu" and not self.training
                and k.stride() == v.stride() and k.stride(3) == 1 and pos < k.size(2)
                and (attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.size(-1) == pos + 1
                                           and attn_mask.size(-2) == 1)))

    def _descriptor(self) -> Optional["native.Block"]:
        """The block as C reads it (None when the block is not what the C step computes: other dtypes or
        eps values); built once, and again after anything that may move its tensors (below)."""
        if self._key is None:
            b = self.block
            linears = (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
            self._desc = _block_descriptor(b, linears) if _c_step_computes(b, linears) else None
            # what the pointers point into stays alive even if the block's attributes are replaced
            self._held = [b.ln_1.weight, b.ln_1.bias, b.ln_2.weight, b.ln_2.bias,
                          *(getattr(p, name, None) for p in linears for name in ("packed", "scales", "bias"))]
            self._key = True
        return self._desc

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: tensors may move
        self._key = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict(assign=True) replaces tensors
        self._key = None
        return super()._load_from_state_dict(*args, **kwargs)


def _c_step_computes(b: Block, linears) -> bool:
    """block.c computes float32 LayerNorms with one eps, GELU (tanh) and products of packed weights."""
    weights = {"f32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}
    floats = [b.ln_1.weight, b.ln_1.bias, b.ln_2.weight, b.ln_2.bias, *(p.scales for p in linears),
              *(p.bias for p in linears)]
    return (b.ln_1.eps == b.ln_2.eps and getattr(b.mlp.gelu, "approximate", None) == "tanh"
            and b.ln_1.weight is not None and b.ln_2.weight is not None
            and all(isinstance(p, PackedLinear) and p.packed.dtype == weights[p.kind] for p in linears)
            and all(t is None or t.dtype == torch.float32 for t in floats))


def _block_descriptor(b: Block, linears) -> "native.Block":
    def ptr(t):
        return t.data_ptr() if t is not None else None

    def linear(p: PackedLinear) -> native.Linear:
        return native.Linear(native.KINDS[p.kind], p.out_features, p.in_features, ptr(p.packed), ptr(p.scales),
                             ptr(p.bias))

    return native.Block(ptr(b.ln_1.weight), ptr(b.ln_1.bias), ptr(b.ln_2.weight), ptr(b.ln_2.bias), b.ln_1.eps,
                        *(linear(p) for p in linears))


class PackedEmbedding(nn.Module):
    """A token embedding that reads its rows from the tied output head's packed weight (no second copy)."""

    def __init__(self, head: PackedLinear):
        super().__init__()
        self.head = [head]  # a list: the head stays registered once, as lm_head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self.head[0].weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        flat = idx.reshape(-1)
        if head.kind == "f32":
            rows = head.packed[flat]
        elif head.kind == "bf16":
            rows = head.packed[flat].float()
        else:
            rows = head.dequantize(flat)
        return rows[:, :self.embedding_dim].view(*idx.shape, self.embedding_dim)


def pack_weight(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(N, K) float32 -> (packed, int8 scales or None), in huge-page memory, converted a block of rows at a
    time (no full-size temporaries)."""
    N, K = w.shape
    if kind == "f32":
        return _huge_empty((N, K), torch.float32).copy_(w), None
    if kind == "bf16":
        return _huge_empty((N, K), torch.bfloat16).copy_(w), None
    Kp, groups = -(-K // QBLOCK) * QBLOCK, -(-N // GROUP)
    nb = Kp // QBLOCK
    packed = _huge_empty((groups * GROUP, Kp), torch.uint8).view(groups, nb, QBLOCK // 4, GROUP, 4)
    scales = torch.empty(groups, nb, GROUP)
    step = max(1, FALLBACK_CHUNK_BYTES // (4 * Kp * GROUP))  # groups converted at once
    for g in range(0, groups, step):
        rows = w[g * GROUP:(g + step) * GROUP]
        n = -(-rows.size(0) // GROUP)
        block = F.pad(rows, (0, Kp - K, 0, n * GROUP - rows.size(0))).view(n, GROUP, nb, QBLOCK)
        amax = block.abs().amax(dim=-1)  # (n, GROUP, nb)
        q = torch.round(block * _inverse_steps(amax)[..., None]).clamp_(-127, 127).add_(128).to(torch.uint8)
        # (n, GROUP, nb, QBLOCK / 4, 4) -> (n, nb, QBLOCK / 4, GROUP, 4): 4 columns of each row side by side
        packed[g:g + n] = q.view(n, GROUP, nb, QBLOCK // 4, 4).permute(0, 2, 3, 1, 4)
        scales[g:g + n] = (amax / 127.0).permute(0, 2, 1)
    return packed, scales


def fake_quantize_rows(x: torch.Tensor, Kp: int) -> torch.Tensor:
    """x (M, K) float32 rounded as the int8 kernel quantizes it: per row, one scale per QBLOCK values,
    two int8 digits (the second in steps of 1/X_DIGIT of the first's), zero-padded to Kp. Returns the
    dequantized values (M, Kp)."""
    blocks = F.pad(x, (0, Kp - x.size(1))).view(x.size(0), -1, QBLOCK)  # (M, Kp / QB, QB)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    u = blocks * _inverse_steps(amax)  # in steps of the first digit
    first = torch.round(u)
    second = torch.round((u - first) * X_DIGIT)
    return ((first * X_DIGIT + second) * (amax / 127.0 / X_DIGIT)).view(x.size(0), Kp)


def _inverse_steps(amax: torch.Tensor) -> torch.Tensor:
    """127 / amax (0 where amax is 0), rounded as matvec.c's `127.f / amax`: a true division (a Python
    number divided by a tensor is computed as a reciprocal times the number, which can differ in the last
    bit and then round an activation to the neighbouring int8 step)."""
    return torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))


def _huge_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in transparent huge pages where Linux offers them (madvise), else plain."""
    numel = shape[0] * shape[1]
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < _HUGE_PAGE or not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    address = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    offset = -address % _HUGE_PAGE  # start on a huge-page boundary
    # the tensor keeps the mapping alive (frombuffer holds the buffer) and it is unmapped with the tensor
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).view(shape)


# Threads. The kernels' pool uses as many threads as torch's operations (torch.set_num_threads), except
# during a decode step (one new token per row: every product is the kernels', torch's own operations are
# small: LayerNorm, attention over the cache, GELU). There torch runs on one thread and the pool gets them
# all: torch's OpenMP threads meet at a barrier after every operation, so on a busy machine each operation
# waits for a thread the OS has not scheduled yet (measured at load ~7 on 2 cores: 3.8 tok/s with torch on 2
# threads, 15-17 with torch on 1), while the pool's caller does the work of a worker that has not shown up.
# One inference thread at a time is assumed (torch's thread count is the process's).
_pool = {"threads": 0, "decode": 0}


def _sync_threads(lib) -> None:
    n = _pool["decode"] or torch.get_num_threads()
    if n != _pool["threads"]:
        lib.gf_set_threads(n)
        _pool["threads"] = n


def _decode_step_begins(model: nn.Module, args: tuple, kwargs: dict) -> None:
    idx = args[0] if args else kwargs.get("idx")
    n = torch.get_num_threads()
    if isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.size(1) == 1 and n > 1 and not _pool["decode"]:
        _pool["decode"] = n
        torch.set_num_threads(1)


def _decode_step_ends(model: nn.Module, args: tuple, output) -> None:
    if _pool["decode"]:
        torch.set_num_threads(_pool["decode"])
        _pool["decode"] = 0
