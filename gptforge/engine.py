"""Token-level generation: the one engine behind the CLI, the HTTP server, eval and the web UI.

The engine works on token ids only and never decodes text; `gptforge.textgen` puts text on top of it.

How a call runs:
- Prompts of different lengths are batched by LEFT padding them to a common length, with
  `KVCache(pad_lens=...)` masking the padding out, so every row's next token sits in the last column.
- One static KVCache is allocated per call and reused; each step feeds one token per row.
- When a row's context would pass the model's `block_size`, the window slides: the cache is rebuilt from
  the last `block_size * WINDOW_KEEP_FRACTION` tokens of every row and decoding goes on, so models with a
  small context (64, 256) still write long samples (as nanoGPT's sample.py does by cropping).
- `use_cache=False` is the reference path: every step runs a full forward over each row's last
  `block_size` tokens. Greedy outputs of both paths are identical as long as no window shift happens;
  after one they differ, because the cached path restarts from half a window while the uncached path
  keeps a full, one-token-shifted window every step.
- Window shifts happen when the LONGEST row of a batch fills the window, so after a shift a batched row
  may differ from the same prompt generated alone; before any shift they are identical (greedy).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from gptforge.common import UserError
from gptforge.config import SampleConfig
from gptforge.model import KVCache

WINDOW_KEEP_FRACTION = 0.5
"""On a window shift keep this fraction of block_size (the newest tokens of each row). Half a window
means one cache rebuild per block_size/2 new tokens, instead of a full forward pass per token."""

StopCheck = Callable[[int, list[int]], bool]
"""stop_check(row_index, generated_ids) -> True to end that row (the text layer's stop strings)."""


@dataclass
class SamplingParams:
    """How to pick each next token. Invalid values raise UserError when the object is built."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: Optional[int] = None  # None or 0 = off
    top_p: Optional[float] = None  # None or 1.0 = off
    repetition_penalty: float = 1.0  # CTRL-style; 1.0 = off, > 1 discourages repeats
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)  # end a row; not returned
    seed: Optional[int] = None  # None = nondeterministic

    def __post_init__(self):
        # `not (x >= 0)` style comparisons also reject NaN
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise UserError(f"top_k must be an integer >= 0 (0 or None turns it off), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 or None turns it off), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        self.stop_token_ids = frozenset(int(i) for i in self.stop_token_ids)

    @classmethod
    def from_config(cls, sample: SampleConfig, stop_token_ids=()) -> "SamplingParams":
        return cls(max_new_tokens=sample.max_new_tokens, temperature=sample.temperature,
                   top_k=sample.top_k, top_p=sample.top_p, repetition_penalty=sample.repetition_penalty,
                   stop_token_ids=frozenset(stop_token_ids), seed=sample.seed)


@dataclass
class StepOutput:
    """What one decoding step produced for every row of the batch."""

    tokens: list[Optional[int]]
    """The new token of each row; None for a row that has ended (a stop token is never returned)."""
    finished: list[Optional[str]]
    """None while a row runs; once it has ended, why: "stop" (stop token or stop_check) or "length"."""
    logprobs: Optional[list[Optional[float]]] = None
    """Only when asked for: log-probability of each row's new token under the model's raw distribution
    (before repetition penalty, temperature, top-k and top-p), as vLLM and OpenAI report it."""
    top_logprobs: Optional[list[Optional[list[tuple[int, float]]]]] = None
    """Only when asked for: the n most likely (token, logprob) pairs of each row, most likely first."""


# --- logits processing: pure functions, so tests can check the kept sets directly --------------------
def presence_mask(rows: list[list[int]], vocab_size: int, device=None) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each row; the history the repetition penalty looks at."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        seen[b, torch.tensor(row, dtype=torch.long, device=device)] = True
    return seen


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token logits (B, V) -> the float32 logits to sample from (softmax of the result); -inf marks a
    token that cannot be picked. `seen` (B, V) bool is the history for the repetition penalty.

    Order: repetition penalty, then (unless greedy) temperature, top-k, top-p. With temperature 0 only the
    penalty applies: the argmax is inside every top-k/top-p set anyway. The input is never modified.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        # CTRL (Keskar et al. 2019), as in HF: shrink positive logits, push negative ones further down,
        # so a seen token always becomes less likely whatever its sign.
        p = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.size(-1))
        values, indices = torch.topk(logits, k, dim=-1)  # (B, k)
        # scatter rather than `logits < kth value`: exactly k tokens survive even when values tie
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(dim=-1)
        before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # mass of the better tokens
        # Drop a token once the better ones already reach p: what is left is the smallest prefix whose
        # mass is >= p, and never empty (the first token has nothing before it and p > 0).
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when greedy, else a draw from the processed distribution."""
    processed = process_logits(logits, params, seen)
    if params.temperature == 0:
        return processed.argmax(dim=-1)
    probs = F.softmax(processed, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# --- the engine ----------------------------------------------------------------------------------------
class Engine:
    """Batched token generation with a model of `gptforge.model.GPT`'s interface.

    model: put in eval mode (and moved to `device` when one is given); a training loop that samples
        mid-run must call model.train() again afterwards. Calls keep no state on the engine.
    dtype: autocast dtype; float32 (default) means no autocast. On CPU, bf16 autocast re-casts the fp32
        weights every step (measured ~3x slower than fp32 for GPT-2 124M); a model cast to bf16 itself
        works too (the cache follows the weights' dtype).
    """

    def __init__(self, model: torch.nn.Module, device=None, dtype: torch.dtype = torch.float32):
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype
        self.config = model.config
        # the cache must hold what attention computes in: the autocast dtype, else the weights' dtype
        self.cache_dtype = dtype if dtype != torch.float32 else param.dtype

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
        rows = self._check_prompts(prompts, truncate)
        if logprobs is not None and not 0 <= logprobs <= self.config.vocab_size:
            raise UserError(f"logprobs must be between 0 and the vocabulary size, got {logprobs}")
        if not rows or params.max_new_tokens == 0:
            return iter(())
        return self._decode(rows, params, stop_check, use_cache, logprobs)

    # --- internals ---------------------------------------------------------------------------------
    def _check_prompts(self, prompts: list[list[int]], truncate: Optional[str]) -> list[list[int]]:
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

    def _decode(self, rows, params, stop_check, use_cache, n_top) -> Iterator[StepOutput]:
        B, N = len(rows), params.max_new_tokens
        runner = _CachedRunner(self, rows, N) if use_cache else _UncachedRunner(self)
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()  # fresh nondeterministic seed, private to this call
        else:
            generator.manual_seed(params.seed)
        seen = None
        if params.repetition_penalty != 1.0:
            with torch.inference_mode():
                seen = presence_mask(rows, self.config.vocab_size, self.device)
        generated: list[list[int]] = [[] for _ in range(B)]
        finished: list[Optional[str]] = [None] * B

        logits = runner.start(rows)
        for step in range(N):
            tokens, lp = self._pick(logits, params, seen, generator, n_top)
            ids = tokens.tolist()  # the one host sync per step
            out: list[Optional[int]] = [None] * B
            for b, tok in enumerate(ids):
                rows[b].append(tok)  # every row grows, so padded lengths stay equal (ended rows: ignored)
                if finished[b]:
                    continue
                if tok in params.stop_token_ids:
                    finished[b] = "stop"
                    continue
                out[b] = tok
                generated[b].append(tok)
                if stop_check is not None and stop_check(b, generated[b]):
                    finished[b] = "stop"
                elif step == N - 1:
                    finished[b] = "length"
            yield StepOutput(out, list(finished), *self._logprob_lists(lp, tokens, out))
            if step == N - 1 or all(finished):
                return
            logits = runner.next(tokens, rows)

    @torch.inference_mode()
    def _pick(self, logits, params, seen, generator, n_top):
        tokens = sample_next(logits, params, seen, generator)  # (B,)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        lp = None
        if n_top is not None:  # computed only on request: the default path pays nothing
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, V) raw distribution
            chosen = logp.gather(1, tokens[:, None]).squeeze(1)  # (B,)
            top = logp.topk(n_top, dim=-1) if n_top > 0 else None
            lp = (chosen, top)
        return tokens, lp

    @staticmethod
    def _logprob_lists(lp, tokens, out):
        if lp is None:
            return None, None
        chosen, top = lp
        chosen = chosen.tolist()
        logprobs = [c if t is not None else None for c, t in zip(chosen, out)]
        if top is None:
            return logprobs, None
        values, indices = top.values.tolist(), top.indices.tolist()
        tops = [list(zip(i, v)) if t is not None else None for i, v, t in zip(indices, values, out)]
        return logprobs, tops

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def _last_logits(self, idx: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """(B, T) ids -> (B, V) logits of the last position."""
        with self._autocast():
            logits, _ = self.model(idx, kv_cache=cache)
        return logits[:, -1].float()


class _CachedRunner:
    """Left-padded batch in one static KVCache, allocated once per call; slides the window when full."""

    def __init__(self, engine: Engine, rows: list[list[int]], max_new_tokens: int):
        self.engine = engine
        block = engine.config.block_size
        # The prompt takes `longest` slots and every new token but the last is fed back: one slot each.
        self.max_len = min(block, max(map(len, rows)) + max_new_tokens - 1)
        self.keep = max(1, int(block * WINDOW_KEEP_FRACTION))
        self.cache: Optional[KVCache] = None

    def start(self, rows: list[list[int]]) -> torch.Tensor:
        return self._prefill(rows)

    def next(self, tokens: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        if self.cache.pos < self.cache.max_len:
            return self.engine._last_logits(tokens[:, None], self.cache)  # (B, 1) -> (B, V)
        # Window full (only possible when max_len == block_size): restart from each row's newest tokens,
        # which include the token just sampled.
        return self._prefill([row[-self.keep:] for row in rows])

    def _prefill(self, seqs: list[list[int]]) -> torch.Tensor:
        e = self.engine
        T = max(map(len, seqs))
        pads = [T - len(s) for s in seqs]
        idx = torch.tensor([[0] * p + s for p, s in zip(pads, seqs)], dtype=torch.long, device=e.device)
        # no padding (e.g. batch 1) -> no mask: decode steps then run plain, unmasked attention
        pad_lens = torch.tensor(pads, device=e.device) if any(pads) else None
        if self.cache is None:
            self.cache = KVCache(e.config, len(seqs), self.max_len, e.device, e.cache_dtype, pad_lens)
        else:  # reuse the buffers: slots past `pos` are overwritten before attention reads them
            self.cache.pos, self.cache.pad_lens = 0, pad_lens
        return e._last_logits(idx, self.cache)


class _UncachedRunner:
    """Reference path: a full forward per row per step over its last block_size tokens."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def start(self, rows: list[list[int]]) -> torch.Tensor:
        return self.next(None, rows)

    def next(self, tokens, rows: list[list[int]]) -> torch.Tensor:
        e, block = self.engine, self.engine.config.block_size
        return torch.cat([
            e._last_logits(torch.tensor([row[-block:]], dtype=torch.long, device=e.device)) for row in rows
        ])  # (B, V)
