"""Choosing the next token: sampling parameters, logits processing (penalties, temperature, top-k, top-p)
and what a decoding step reports. Pure functions, so tests can check the kept sets directly."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gptforge.common import UserError

StopCheck = Callable[[int, list[int]], bool]
"""stop_check(row_index, generated_ids) -> True to end that row (the text layer's stop strings)."""

GREEDY_BELOW = 1e-5
"""A temperature under this (0 included) picks the argmax: dividing logits by a tinier one overflows float32
to inf, and inf - inf is NaN. vLLM draws the line at the same place."""

LIMITS = {"repetition_penalty": (0.01, 100.0), "presence_penalty": (-100.0, 100.0),
          "frequency_penalty": (-100.0, 100.0)}
"""Closed ranges of the penalties. Inside them every processed logit stays finite (a factor of 1e-45
turns a logit of 1 into inf; one of 1e45 turns -1 into -inf for every seen token), so every row has a
distribution to sample from."""

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes (the upper end excluded)


class InvalidParam(UserError):
    """A sampling parameter out of its range; `name` is the field, so a server can name its own."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass
class SamplingParams:
    """How to pick each next token. Invalid values raise InvalidParam (a UserError) when the object is
    built, so whatever is built can be sampled: the CLI, the server and chat share these checks.
    The defaults sample the model's own distribution (temperature 1, no top-k), as the OpenAI API's do;
    the CLI's SampleConfig has its own (gptforge.config.SampleConfig says why)."""

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0 (or anything under GREEDY_BELOW) = greedy (argmax)
    top_k: Optional[int] = None  # None or 0 = off; more than the vocabulary keeps all of it
    top_p: Optional[float] = None  # None or 1.0 = off; a tiny p keeps the most likely token only
    repetition_penalty: float = 1.0  # CTRL-style over prompt + output; 1.0 = off, > 1 discourages repeats
    presence_penalty: float = 0.0  # OpenAI's: logit -= presence * (count > 0), counting generated tokens
    frequency_penalty: float = 0.0  # OpenAI's: logit -= frequency * count
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)  # end a row; not returned
    seed: Optional[int] = None  # None = nondeterministic

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise InvalidParam("max_new_tokens",
                               f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        # `not (x >= 0)` style comparisons also reject NaN
        if not _is_number(self.temperature) or not (0 <= self.temperature < math.inf):
            raise InvalidParam("temperature", f"temperature must be a finite number >= 0 (0 means greedy), got "
                                              f"{self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise InvalidParam("top_k", f"top_k must be an integer >= 0 (0 or None turns it off), got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise InvalidParam("top_p", f"top_p must be in (0, 1] (1 or None turns it off), got {self.top_p!r}")
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if not _is_number(value) or not low <= value <= high:
                off = 1 if name == "repetition_penalty" else 0
                raise InvalidParam(name, f"{name} must be between {low:g} and {high:g} ({off} turns it off), got "
                                         f"{value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise InvalidParam("seed", f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}")
        self.stop_token_ids = frozenset(int(i) for i in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


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
    error: Optional[Exception] = None
    """Set when the call failed at this step (its sampling or stop check raised): its rows have left the
    batch, the other fields say nothing, and no output follows. Other calls in the batch go on."""


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

    Order: penalties, then (unless greedy) temperature, top-k, top-p. Greedy (a temperature under
    GREEDY_BELOW), only the penalties apply: the argmax is inside every top-k/top-p set anyway. The input
    is never modified.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        # CTRL (Keskar et al. 2019), as in HF: shrink positive logits, push negative ones further down,
        # so a seen token always becomes less likely whatever its sign.
        p = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        logits = logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    if params.greedy:
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
        # mass is >= p. The first token always stays: p is compared in float32, where a tiny p is 0.
        drop_sorted = before >= params.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None,
                counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when greedy, else a draw from the processed distribution."""
    processed = process_logits(logits, params, seen, counts)
    if params.greedy:
        return processed.argmax(dim=-1)
    probs = F.softmax(processed, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
