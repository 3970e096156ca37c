"""Choosing the next token: sampling parameters, logits processing (penalties, temperature, top-k, top-p)
and what a decoding step reports. Pure functions, so tests can check the kept sets directly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gptforge.common import UserError
from gptforge.config import SampleConfig

StopCheck = Callable[[int, list[int]], bool]
"""stop_check(row_index, generated_ids) -> True to end that row (the text layer's stop strings)."""



@dataclass
class SamplingParams:
    """How to pick each next token. Invalid values raise UserError when the object is built."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: Optional[int] = None  # None or 0 = off
    top_p: Optional[float] = None  # None or 1.0 = off
    repetition_penalty: float = 1.0  # CTRL-style over prompt + output; 1.0 = off, > 1 discourages repeats
    presence_penalty: float = 0.0  # OpenAI's: logit -= presence * (count > 0), counting generated tokens
    frequency_penalty: float = 0.0  # OpenAI's: logit -= frequency * count
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{name} must be a finite number (0 turns it off), got {getattr(self, name)}")
        self.stop_token_ids = frozenset(int(i) for i in self.stop_token_ids)

    @classmethod
    def from_config(cls, sample: SampleConfig, stop_token_ids=()) -> "SamplingParams":
        return cls(max_new_tokens=sample.max_new_tokens, temperature=sample.temperature,
                   top_k=sample.top_k, top_p=sample.top_p, repetition_penalty=sample.repetition_penalty,
                   stop_token_ids=frozenset(stop_token_ids), seed=sample.seed)


@dataclass
class StepOutput:
    """What one decoding step produced for every row of a call (a group)."""

    tokens: list[Optional[int]]
    """The new token of each row; None for a row that has ended (a stop token is never returned)."""
    finished: list[Optional[str]]
    """None while a row runs; once it has ended, why: "stop" (stop token or stop_check) or "length"."""
    logprobs: Optional[list[Optional[float]]] = None
    """Only when asked for: log-probability of each row's new token under the model's raw distribution
    (before penalties, temperature, top-k and top-p), as vLLM and OpenAI report it."""
    top_logprobs: Optional[list[Optional[list[tuple[int, float]]]]] = None
    """Only when asked for: the n most likely (token, logprob) pairs of each row, most likely first."""


# --- logits processing -------------------------------------------------------------------------------
def presence_mask(rows: list[list[int]], vocab_size: int, device=None) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each row; the history the repetition penalty looks at."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        seen[b, torch.tensor(row, dtype=torch.long, device=device)] = True
    return seen


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
                   counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token logits (B, V) -> the float32 logits to sample from (softmax of the result); -inf marks a
    token that cannot be picked. `seen` (B, V) bool is the history for the repetition penalty, `counts`
    (B, V) how often each token was generated so far, for the presence and frequency penalties.

    Order: penalties, then (unless greedy) temperature, top-k, top-p. With temperature 0 only the
    penalties apply: the argmax is inside every top-k/top-p set anyway. The input is never modified.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        # CTRL (Keskar et al. 2019), as in HF: shrink positive logits, push negative ones further down,
        # so a seen token always becomes less likely whatever its sign.
        p = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits = logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
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
                generator: Optional[torch.Generator] = None,
                counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when greedy, else a draw from the processed distribution."""
    processed = process_logits(logits, params, seen, counts)
    if params.temperature == 0:
        return processed.argmax(dim=-1)
    probs = F.softmax(processed, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
