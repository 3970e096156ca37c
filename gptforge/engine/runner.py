"""The model side of decoding: a language model on its device, its prompts checked, its forward passes
run under the runtime's autocast. `DecodeBatch` schedules rows on top of it; it knows nothing of them."""

from __future__ import annotations

import inspect
from typing import Optional, Union

import torch

from gptforge.common import Runtime, UserError, as_runtime
from gptforge.model import GPTClassifier


class ModelRunner:
    """A model of `gptforge.model.GPT`'s interface, ready for decoding.

    model: put in eval mode (and moved to the runtime's device); a training loop that samples mid-run
        must call model.train() again afterwards.
    runtime: device and autocast dtype (`gptforge.common.inference_runtime`); a bare device means that
        device without autocast; None: the model's device, float32. On CPU, bf16 autocast re-casts the
        fp32 weights every step (measured ~3x slower than fp32 for GPT-2 124M); a model cast to bf16
        itself works too (the cache follows the weights' dtype).
    """

    def __init__(self, model: torch.nn.Module, runtime: Union[Runtime, torch.device, str, None] = None):
        if isinstance(getattr(model, "_orig_mod", model), GPTClassifier):  # also under torch.compile
            raise UserError("this is a classifier checkpoint, not a language model; use `gptforge classify`")
        param = next(model.parameters())
        self.runtime = as_runtime(runtime) or Runtime(device=param.device, dtype=torch.float32)
        self.model = model.to(self.runtime.device).eval()
        self.config = model.config
        # the cache must hold what attention computes in: the autocast dtype, else the weights' dtype
        self.cache_dtype = self.runtime.dtype if self.runtime.dtype != torch.float32 else param.dtype
        # GPT can skip the output head for all but the last position (long prompts prefill faster);
        # stand-in models of the same interface (tests) may not take the argument.
        self._last_only = "last_only" in inspect.signature(model.forward).parameters

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def check_prompts(self, prompts: list[list[int]], truncate: Optional[str] = None) -> list[list[int]]:
        """Prompts as fresh lists of ints, checked against the model's vocabulary and context window."""
        if truncate not in (None, "left"):
            raise UserError(f"truncate must be None or 'left', got {truncate!r}")
        block, vocab = self.config.block_size, self.config.vocab_size
        rows = []
        for i, prompt in enumerate(prompts):
            row = [int(t) for t in prompt]  # our own copy: rows grow as tokens are generated
            if not row:
                raise UserError(f"prompt {i} is empty; start it with a token such as the end-of-text id")
            if len(row) > block:
                if truncate != "left":
                    raise UserError(f"prompt has {len(row)} tokens but the model's context window is {block}; "
                                    "shorten it or truncate it on the left (--truncate left)")
                row = row[-block:]
            bad = next((t for t in row if not 0 <= t < vocab), None)
            if bad is not None:
                raise UserError(f"prompt {i} holds token id {bad}, outside the model's vocabulary of {vocab}")
            rows.append(row)
        return rows

    @torch.inference_mode()
    def last_logits(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """(B, T) ids -> (B, V) float32 logits of the last position (filling `cache` when given)."""
        extra = {"last_only": True} if self._last_only else {}
        with self.runtime.autocast():
            logits, _ = self.model(idx, kv_cache=cache, **extra)
        return logits[:, -1].float()
