"""The module an ONNX export traces: gptforge's own blocks, with the key/value cache passed in and out.

`GPT.forward` keeps its cache in static buffers (`KVCache`) that the engine owns; a runtime outside torch
needs the cache as plain inputs and outputs instead, with the same file serving the prefill (past length
0) and every one-token decode step:

    input_ids (B, T), attention_mask (B, P+T), past k/v per layer (B, nh, P, hs)
    -> logits (B, T, vocab_size), present k/v per layer (B, nh, P+T, hs)

attention_mask is 1 on real tokens and 0 on left padding (as the engine pads a batch); positions and the
causal mask over padding come from it exactly as the engine computes them
(`GPT._cache_positions_and_mask`). Each block runs unchanged (`Block.forward` with a cache of P + T slots,
the last T filled by the block), so the exported graph is the model's own math, not a copy of it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn

from gptforge.model import GPT


class CachedDecoder(nn.Module):
    def __init__(self, model: GPT):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past: list[tuple[torch.Tensor, torch.Tensor]]):
        B, T = input_ids.shape
        P = past[0][0].shape[2]
        pad_lens = (attention_mask == 0).sum(dim=1)  # (B,) left padding of each row
        slots = torch.arange(P, P + T, device=input_ids.device)  # (T,) cache slots of the new tokens
        positions, mask = GPT._cache_positions_and_mask(SimpleNamespace(pad_lens=pad_lens), slots, P)
        tr = self.model.transformer
        x = tr.wte(input_ids) + tr.wpe(positions)  # (B, T, C)
        present = []
        for block, (past_k, past_v) in zip(tr.h, past):
            new_slots = past_k.new_zeros(B, past_k.shape[1], T, past_k.shape[3])  # (B, nh, T, hs)
            k, v = torch.cat([past_k, new_slots], dim=2), torch.cat([past_v, new_slots], dim=2)
            x = block(x, mask, (k, v, P))  # writes this step's keys and values into the last T slots
            present.append((k, v))  # (B, nh, P+T, hs) each
        logits = self.model.lm_head(tr.ln_f(x))[..., :self.model.config.vocab_size]  # (B, T, V)
        return logits, present
