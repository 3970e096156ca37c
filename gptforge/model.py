"""GPT-2, written out: embeddings, pre-LayerNorm blocks, tied output head. Pure math, no I/O.

Notation in shape comments: B batch, T new tokens, Tk keys attended (cache + new), C = n_embd,
nh = n_head, hs = head size = C / nh, V = padded vocabulary.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import ModelConfig


class KVCache:
    """Static key/value buffers for incremental decoding, filled left to right.

    Rows of a batch may be left-padded to a common length: `pad_lens[b]` slots at the start of row b are
    padding, masked out of attention, and positions count from the first real token of each row.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, pad_lens: Optional[torch.Tensor] = None):
        if max_len > config.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size {config.block_size}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nh, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # slots filled so far
        self.pad_lens = pad_lens.to(device) if pad_lens is not None else None  # (B,)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def manual_attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
    """Reference attention, written out; must agree with F.scaled_dot_product_attention."""
    # q: (B, nh, T, hs), k/v: (B, nh, Tk, hs)
    T, Tk = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, Tk)
    if is_causal:
        attn_mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = True  # False selects manual_attention, the reference path

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        is_causal = attn_mask is None and T > 1
        if cache is not None:
            k_cache, v_cache, pos = cache  # (B, nh, max_len, hs) each
            k_cache[:, :, pos:pos + T] = k
            v_cache[:, :, pos:pos + T] = v
            k, v = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]  # (B, nh, Tk, hs)
            # SDPA's is_causal aligns the mask top-left, which is only right when nothing is cached
            is_causal = is_causal and pos == 0
        dropout_p = self.dropout if self.training else 0.0
        attend = F.scaled_dot_product_attention if self.use_sdpa else manual_attention
        y = attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # padded: faster matmuls
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections into the residual stream are scaled down by
        # 1/sqrt(2 * n_layer) because each block adds two of them to the stream.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attention(self, impl: str) -> None:
        """'sdpa' (fast, default) or 'manual' (the written-out reference)."""
        if impl not in ("sdpa", "manual"):
            raise ValueError(f"unknown attention implementation {impl!r}")
        for block in self.transformer.h:
            block.attn.use_sdpa = impl == "sdpa"

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, last_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), None), or with targets -> (None, loss).

        targets (B, T): next-token ids; positions holding -100 are left out of the loss. The loss is
        computed by `linear_cross_entropy` without materialising the logits (see there).
        kv_cache: continue from the cached prefix instead of attending only within idx.
        last_only: logits of the last position only, (B, 1, vocab_size): all that generation needs, and
        it skips the output head over the other positions (a large share of a long prompt's prefill).
        """
        B, T = idx.size()
        x = self.hidden_states(idx, kv_cache)  # (B, T, C)
        if targets is not None:
            # Training/eval: the loss straight from the hidden states, never materialising (B, T, V) logits.
            if isinstance(self.lm_head, nn.Linear):
                loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                            self.config.vocab_size)
            else:  # a head swapped in for inference (gptforge.quantize): its own logits, a chunk at a time
                loss = head_cross_entropy(x.reshape(B * T, -1), self.lm_head, targets.reshape(-1),
                                          self.config.vocab_size)
            return None, loss
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        # Padded vocabulary slots are dropped here, so they can never be sampled.
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, vocab_size)
        return logits, None

    def hidden_states(self, idx: torch.Tensor, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """idx (B, T) -> final hidden states (B, T, C) after ln_f: what every head (LM, classifier) reads."""
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        slots = torch.arange(start, start + T, device=idx.device)  # (T,) absolute cache slots
        positions, attn_mask = slots, None
        if kv_cache is not None:
            positions, attn_mask = self._cache_positions_and_mask(kv_cache, slots, start)

        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            cache = (kv_cache.k[i], kv_cache.v[i], start) if kv_cache is not None else None
            x = block(x, attn_mask, cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def grow_vocab(self, vocab_size: int) -> None:
        """Make room for new tokens (e.g. chat roles added to the tokenizer). New rows start near the mean
        of the existing embeddings, a point the model already reads sensibly (rows drawn at GPT-2's init
        scale would start with arbitrary logits), each nudged apart by a small fixed-seed offset so the
        new tokens are distinguishable even when the embedding stays frozen (LoRA); the same call always
        gives the same rows, so adapter checkpoints can rebuild them. Padding rows stay zero."""
        old_vocab, C = self.config.vocab_size, self.config.n_embd
        if vocab_size < old_vocab:
            raise ValueError(f"cannot shrink the vocabulary from {old_vocab} to {vocab_size}")
        self.config = type(self.config)(**{**vars(self.config), "vocab_size": vocab_size})
        padded = self.config.padded_vocab_size

        def grown(weight: torch.Tensor) -> nn.Parameter:
            new = torch.zeros(padded, C, device=weight.device, dtype=weight.dtype)  # (V_padded, C)
            new[:old_vocab] = weight.data[:old_vocab]
            existing = weight.data[:old_vocab].float()  # (V_old, C)
            seed = torch.Generator().manual_seed(old_vocab * 1_000_003 + vocab_size)
            offsets = torch.randn(vocab_size - old_vocab, C, generator=seed) * existing.std(dim=0) * 0.1
            new[old_vocab:vocab_size] = (existing.mean(dim=0) + offsets.to(existing.device)).to(weight.dtype)
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        tied = self.lm_head.weight is self.transformer.wte.weight
        self.transformer.wte.weight = grown(self.transformer.wte.weight)
        self.transformer.wte.num_embeddings = padded
        self.lm_head.weight = self.transformer.wte.weight if tied else grown(self.lm_head.weight)
        self.lm_head.out_features = padded

    @staticmethod
    def _cache_positions_and_mask(cache: KVCache, slots: torch.Tensor, start: int):
        """Positions of the new tokens and the attention mask over the cache (None = plain causal)."""
        T = slots.numel()
        if cache.pad_lens is None:
            # Without padding, a decode step (T == 1) sees all keys and a prefill from slot 0 is plain
            # causal; only a multi-token append to a non-empty cache needs an explicit mask.
            if T == 1 or start == 0:
                return slots, None
            keys = torch.arange(start + T, device=slots.device)
            return slots, keys[None, :] <= slots[:, None]  # (T, Tk)
        pad = cache.pad_lens[:, None]  # (B, 1)
        positions = (slots[None, :] - pad).clamp(min=0)  # (B, T): count from each row's first token
        keys = torch.arange(start + T, device=slots.device)  # (Tk,)
        causal = keys[None, :] <= slots[:, None]  # (T, Tk)
        real = keys[None, None, :] >= pad[:, :, None]  # (B, 1, Tk)
        # A padding query attends to itself only, so no row is fully masked (which would give NaN).
        itself = keys[None, :] == slots[:, None]  # (T, Tk)
        mask = (causal[None] & real) | itself[None]  # (B, T, Tk)
        return positions, mask[:, None]  # (B, 1, T, Tk), broadcast over heads


class GPTClassifier(GPT):
    """GPT-2 with a classification head reading the hidden state of each row's last real token.

    Inputs are right-padded with -1: a causal model's last real token has seen the whole text and none of
    the padding, so padding needs no attention mask. The LM head stays (tied, unused) so the weights keep
    GPT-2's names and a classifier checkpoint is a GPT checkpoint plus `classifier.*`."""

    def __init__(self, config: ModelConfig, n_classes: int):
        super().__init__(config)
        self.classifier = nn.Linear(config.n_embd, n_classes)
        self.init_classifier()

    def init_classifier(self) -> None:
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """idx (B, T) ids, -1 = padding -> (class logits (B, n_classes), loss or None); targets (B,)."""
        real = idx >= 0  # (B, T)
        last = real.sum(dim=1).clamp(min=1) - 1  # (B,) index of each row's last real token
        h = self.hidden_states(idx.clamp(min=0))  # (B, T, C)
        logits = self.classifier(h[torch.arange(idx.size(0), device=idx.device), last])  # (B, n_classes)
        loss = F.cross_entropy(logits.float(), targets) if targets is not None else None
        return logits, loss


LOSS_CHUNK_ROWS = 1024  # rows of logits alive at once in linear_cross_entropy


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                         chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of logits = x @ weight.T (columns >= vocab_size excluded) against targets,
    ignoring targets == -100. Equal to F.cross_entropy on the full logits (tested), but computed
    chunk by chunk with the gradient formed in the same pass: the (N, V) logits, their log-softmax and
    its gradient never exist at once, which saves most of the memory traffic of the output layer.
    x (N, C), weight (V_padded, C), targets (N,)."""
    if torch.compiler.is_compiling():  # the compiler fuses the plain expression well on its own
        logits = (x @ weight.t())[:, :vocab_size].float()
        return F.cross_entropy(logits, targets, ignore_index=-100)
    grad_enabled = torch.is_grad_enabled()
    # A frozen head (LoRA, a frozen body) needs no weight gradient: skip its matmul and buffer.
    needs_grad = (grad_enabled and x.requires_grad, grad_enabled and weight.requires_grad)
    return _LinearCrossEntropy.apply(x, weight, targets, vocab_size, chunk_rows, needs_grad)


def head_cross_entropy(x: torch.Tensor, head: nn.Module, targets: torch.Tensor, vocab_size: int,
                       chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """linear_cross_entropy for any head module (logits = head(x)): the same mean, chunk by chunk, with
    autograd's gradient. x (N, C), targets (N,)."""
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    for i in range(0, x.size(0), chunk_rows):
        logits = head(x[i:i + chunk_rows])[:, :vocab_size].float()  # (n, vocab_size)
        total = total + F.cross_entropy(logits, targets[i:i + chunk_rows], ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk_rows, needs_grad):
        device = x.device.type
        # Under autocast do the matmuls in the autocast dtype, as nn.Linear would.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xd, wd = x.to(dtype), weight.to(dtype)
        n_valid = (targets != -100).sum().clamp(min=1)
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        needs_grad_x, needs_grad_w = needs_grad
        grad_x = torch.empty_like(x) if needs_grad_x else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad_w else None
        for i in range(0, x.size(0), chunk_rows):
            xc, tc = xd[i:i + chunk_rows], targets[i:i + chunk_rows]  # (n, C), (n,)
            logits = (xc @ wd.t()).float()  # (n, V_padded)
            logits[:, vocab_size:] = float("-inf")  # padding columns are not part of the vocabulary
            valid = tc != -100
            safe = tc.clamp(min=0)[:, None]  # (n, 1)
            target_logit = logits.gather(1, safe).squeeze(1)  # (n,)
            # log-sum-exp in place, in as few passes over the (n, V) block as possible
            row_max = logits.amax(dim=1, keepdim=True)  # (n, 1)
            exps = logits.sub_(row_max).exp_()  # the logits are not needed any more
            sums = exps.sum(dim=1, keepdim=True)  # (n, 1)
            lse = (row_max + sums.log()).squeeze(1)  # (n,)
            loss += ((lse - target_logit) * valid).sum()
            if needs_grad_x or needs_grad_w:
                # d(mean loss)/d logits = (softmax - onehot(target)) / n_valid on counted rows
                probs = exps.mul_((valid / n_valid)[:, None] / sums)
                probs.scatter_add_(1, safe, -(valid / n_valid)[:, None].to(probs.dtype))
                probs = probs.to(dtype)
                if needs_grad_x:
                    grad_x[i:i + chunk_rows] = probs @ wd  # (n, C)
                if needs_grad_w and grad_w.dtype == dtype:
                    grad_w.addmm_(probs.t(), xc)  # (V_padded, C), accumulated without a temporary
                elif needs_grad_w:
                    grad_w.add_(probs.t() @ xc)  # low-precision product, accumulated in fp32
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype) if grad_w is not None else None)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * grad_loss if grad_x is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None, None)


def count_parameters(model: GPT) -> int:
    """Parameters as published for GPT-2: tied weights once, vocabulary padding not counted."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    padding_rows = cfg.padded_vocab_size - cfg.vocab_size
    total -= padding_rows * cfg.n_embd
    if not cfg.tie_embeddings:
        total -= padding_rows * cfg.n_embd  # the separate lm_head is padded too
    return total
