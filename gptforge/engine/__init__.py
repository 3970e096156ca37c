"""Token-level generation: the one engine behind the CLI, the HTTP server, eval and the web UI.

The engine works on token ids only and never decodes text; `gptforge.textgen` puts text on top of it.

How decoding runs (`DecodeBatch`, which `Engine.stream` drives for a single call):
- Requests ("groups" of rows: several prompts, or n samples of one) join and leave a running batch
  between steps (continuous batching). Each step feeds one token per running row; rows that joined are
  prefilled in the same step, so they get their first token without waiting for the others to finish.
- At most `max_batch_rows` rows run at once (the key/value buffers grow with it); the rest of a call's
  rows wait and start, in prompt order, as running rows end. A call's rows share one random generator,
  so a seeded call with more rows than the cap samples differently from an uncapped one (greedy rows
  that fit their window do not change).
- Rows sit LEFT-padded in one set of key/value buffers with a common write position; `pad_lens` masks each
  row's padding, and positions count from each row's first real token. A row joining with a prompt
  longer than the rows already there shifts their contents right; a finished row's buffer row is reused.
- Each group keeps its own sampling parameters, random generator, penalties and logprob request, so a
  request's output does not depend on what else is in the batch (up to float rounding in batched math).
- When the buffers are full at `block_size`, rows whose window is full slide: they are rebuilt from
  their newest `block_size * WINDOW_KEEP_FRACTION` tokens, and every row's contents move left, so models
  with a small context (64, 256) still write long samples (as nanoGPT's sample.py does by cropping).
  Rows that would fill their window soon anyway (within block_size/8) slide with them, so a batched row
  may slide a little earlier than it would alone; a row whose prompt + max_new_tokens fits the window
  never slides, so batching never changes what it generates (greedy; up to float rounding).
- `use_cache=False` is the reference path: every step runs a full forward over each row's last
  `block_size` tokens. Greedy outputs of both paths are identical as long as no window slide happens;
  after one they differ, because the cached path restarts from half a window while the uncached path
  keeps a full, one-token-shifted window every step.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Optional

import torch

from gptforge.common import UserError
from gptforge.engine.batch import SLIDE_MARGIN_FRACTION, WINDOW_KEEP_FRACTION, DecodeBatch
from gptforge.engine.sampling import (GREEDY_BELOW, LIMITS, InvalidParam, SamplingParams, StepOutput, StopCheck,
                                      presence_mask, process_logits, sample_next)
from gptforge.model import GPTClassifier

__all__ = ["Engine", "DecodeBatch", "SamplingParams", "StepOutput", "StopCheck", "presence_mask",
           "process_logits", "sample_next", "WINDOW_KEEP_FRACTION", "SLIDE_MARGIN_FRACTION", "GREEDY_BELOW", "LIMITS",
           "InvalidParam"]


# --- the engine ----------------------------------------------------------------------------------------
class Engine:
    """Batched token generation with a model of `gptforge.model.GPT`'s interface.

    model: put in eval mode (and moved to `device` when one is given); a training loop that samples
        mid-run must call model.train() again afterwards. Calls keep no state on the engine.
    dtype: autocast dtype; float32 (default) means no autocast. On CPU, bf16 autocast re-casts the fp32
        weights every step (measured ~3x slower than fp32 for GPT-2 124M); a model cast to bf16 itself
        works too (the cache follows the weights' dtype).
    max_batch_rows: the most rows (prompts x samples) one call decodes at once; the others wait for rows
        to end. Bounds the key/value buffers (they grow with the rows running: thousands of prompts at once
        would not fit in memory). None: no cap.
    """

    def __init__(self, model: torch.nn.Module, device=None, dtype: torch.dtype = torch.float32,
                 max_batch_rows: Optional[int] = 64):
        if isinstance(getattr(model, "_orig_mod", model), GPTClassifier):  # also under torch.compile
            raise UserError("this is a classifier checkpoint, not a language model; use `gptforge classify`")
        if max_batch_rows is not None and (not isinstance(max_batch_rows, int) or max_batch_rows < 1):
            raise UserError(f"max_batch_rows must be an integer >= 1 or None, got {max_batch_rows!r}")
        self.max_batch_rows = max_batch_rows
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype
        self.config = model.config
        # the cache must hold what attention computes in: the autocast dtype, else the weights' dtype
        self.cache_dtype = dtype if dtype != torch.float32 else param.dtype
        # GPT can skip the output head for all but the last position (long prompts prefill faster);
        # stand-in models of the same interface (tests) may not take the argument.
        self._last_only = "last_only" in inspect.signature(model.forward).parameters

    def generate(self, prompts: list[list[int]], params: SamplingParams, stop_check: Optional[StopCheck] = None,
                 use_cache: bool = True, truncate: Optional[str] = None) -> list[list[int]]:
        """Generated ids of each row (prompt and stop token not included)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, params, stop_check, use_cache, truncate):
            for row, tok in zip(out, step.tokens):
                if tok is not None:
                    row.append(tok)
        return out

    def stream(self, prompts: list[list[int]], params: SamplingParams, stop_check: Optional[StopCheck] = None,
               use_cache: bool = True, truncate: Optional[str] = None,
               logprobs: Optional[int] = None) -> Iterator[StepOutput]:
        """One StepOutput per decoding step, until every row has ended or max_new_tokens steps.

        stop_check(row, generated_ids) is called after each token a row keeps; True ends the row
        (the token that triggered it is still returned). truncate='left' keeps the last block_size
        tokens of a prompt that is too long (otherwise it is a UserError). logprobs=n also reports the
        chosen token's logprob and the n most likely alternatives (0: chosen token only).
        Bad input raises here, at the call, not at the first step.
        """
        batch = DecodeBatch(self, use_cache=use_cache, max_rows=self.max_batch_rows)
        group = batch.add(prompts, params, stop_check, logprobs, truncate)
        return batch.outputs_of(group)

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
                                    "shorten it or pass truncate='left'")
                row = row[-block:]
            bad = next((t for t in row if not 0 <= t < vocab), None)
            if bad is not None:
                raise UserError(f"prompt {i} holds token id {bad}, outside the model's vocabulary of {vocab}")
            rows.append(row)
        return rows

    # --- forward passes, used by DecodeBatch -------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def last_logits(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """(B, T) ids -> (B, V) float32 logits of the last position (filling `cache` when given)."""
        extra = {"last_only": True} if self._last_only else {}
        with self._autocast():
            logits, _ = self.model(idx, kv_cache=cache, **extra)
        return logits[:, -1].float()
