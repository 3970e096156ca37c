"""Multiple-choice scoring by log-likelihood: the machinery under HellaSwag, PIQA and friends.

Each choice is scored as in lm-evaluation-harness: the sum of log p(continuation tokens | context), with
continuation = delimiter + choice (the leading space belongs to the continuation), context tokens =
encode(context) (the end-of-text token when the context is empty) and continuation tokens =
encode(delimiter + choice). A row longer than the model's context loses context tokens from the left;
the continuation is always scored whole (one longer than the context itself takes several windows,
which small models with a 64-token context meet on HellaSwag).

Metrics (one 0/1 correctness per example, averaged; stderr = sample std / sqrt(n), the harness's
`mean_stderr`):
    acc            argmax of the summed log-probability
    acc_norm       argmax of the sum divided by the choice's length in characters (harness: len(choice),
                   the choice without its delimiter)
    acc_per_token  argmax of the mean log-probability per continuation token (what build-nanogpt and
                   llm.c call acc_norm)

Speed: all rows (one per choice) of many examples go through the model together, sorted by length and
right-padded; causal attention means padding after a row's end cannot change its real positions, and
only real positions are read. `score_choices_one_by_one` is the plain one-row-per-forward reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from gptforge.common import UserError
from gptforge.eval.runtime import DTypeLike, EvalModel, evaluating
from gptforge.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChoiceExample:
    """One question: which of `choices` follows `context`? `label` indexes the right one."""

    context: str
    choices: tuple[str, ...]
    label: int
    delimiter: str = " "  # put between context and each choice, scored as part of the continuation


@dataclass
class ChoiceScore:
    """Per-choice results of one example."""

    logprobs: list[float]  # sum of log p(continuation tokens | context)
    tokens: list[int]  # continuation tokens scored
    chars: list[int]  # len(choice) in characters: acc_norm's denominator
    truncated: bool = False  # some choice did not fit one window: context cut on the left (or a split)

    @property
    def pred(self) -> int:
        return _argmax(self.logprobs)

    @property
    def pred_norm(self) -> int:
        return _argmax([lp / max(c, 1) for lp, c in zip(self.logprobs, self.chars)])

    @property
    def pred_per_token(self) -> int:
        return _argmax([lp / max(t, 1) for lp, t in zip(self.logprobs, self.tokens)])


def _argmax(values: Sequence[float]) -> int:
    return int(np.argmax(values))  # first of equal maxima, as the harness's np.argmax


@dataclass
class _Row:
    """One (example, choice) sequence: ids = context + continuation, its last n_cont ids scored."""

    example: int
    choice: int
    ids: list[int]
    n_cont: int
    truncated: bool = False


def encode_rows(tokenizer: Tokenizer, examples: Sequence[ChoiceExample], block_size: int) -> list[_Row]:
    """Tokenize every (example, choice) pair into rows that fit the model (inputs <= block_size).

    Usually one row per choice: context + continuation, context cut on the left when too long. A
    continuation longer than the model's context is split over several rows, each ending where the
    previous one's scored part begins, so every continuation token is still scored exactly once."""
    rows = []
    contexts = tokenizer.encode_batch([ex.context for ex in examples])
    continuations = tokenizer.encode_batch([ex.delimiter + c for ex in examples for c in ex.choices])
    k = 0
    for i, (ex, ctx) in enumerate(zip(examples, contexts)):
        ctx = ctx or [tokenizer.eot_id]  # the first continuation token needs something to follow
        for j in range(len(ex.choices)):
            cont = continuations[k]
            k += 1
            if not cont:
                raise UserError(f"example {i}: choice {j} is empty; every choice needs text to score")
            rows.extend(_split_row(i, j, ctx + cont, len(cont), block_size))
    return rows


def _split_row(example: int, choice: int, ids: list[int], n_cont: int, block_size: int) -> list[_Row]:
    # inputs are ids[:-1], so a row holds block_size + 1 ids and scores at most block_size targets
    rows, end = [], len(ids)
    truncated = len(ids) > block_size + 1
    while n_cont > 0:
        piece = ids[max(0, end - block_size - 1):end]
        scored = min(n_cont, len(piece) - 1)
        rows.append(_Row(example, choice, piece, scored, truncated))
        n_cont, end = n_cont - scored, end - scored
    return rows


def _score_batch(ev: EvalModel, rows: list[_Row]) -> np.ndarray:
    """Summed continuation log-probabilities of `rows`, in one right-padded forward pass."""
    L = max(len(r.ids) for r in rows) - 1
    idx = np.zeros((len(rows), L), dtype=np.int64)  # (B, L); the padding id is never read
    row_of, pos_of, target_of = [], [], []
    for b, r in enumerate(rows):
        n = len(r.ids)
        idx[b, : n - 1] = r.ids[:-1]
        # continuation token t = ids[n - n_cont + k] is predicted at input position n - n_cont - 1 + k
        row_of.extend([b] * r.n_cont)
        pos_of.extend(range(n - r.n_cont - 1, n - 1))
        target_of.extend(r.ids[n - r.n_cont:])
    device = ev.device
    with ev.runtime.autocast():
        logits, _ = ev.model(torch.from_numpy(idx).to(device))  # (B, L, V)
    picked = logits[torch.tensor(row_of, device=device), torch.tensor(pos_of, device=device)]  # (M, V)
    logprobs = torch.log_softmax(picked.float(), dim=-1)  # (M, V)
    chosen = logprobs.gather(1, torch.tensor(target_of, device=device)[:, None]).squeeze(1)  # (M,)
    # summed on the CPU in float64 (MPS has no float64)
    return np.bincount(np.asarray(row_of), weights=chosen.cpu().double().numpy(), minlength=len(rows))


def score_choices(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[ChoiceExample], *,
                  batch_size: int = 16, device=None, dtype: DTypeLike = None,
                  progress: bool = False) -> list[ChoiceScore]:
    """Score every choice of every example; batch_size = rows (choices) per forward pass.

    Rows are sorted longest first so each batch pads little; memory per pass is about
    batch_size x longest row x vocabulary floats of logits."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    with evaluating(model, device, dtype) as ev:
        rows = encode_rows(tokenizer, examples, ev.block_size)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
        sums = np.zeros(len(rows))
        bar = tqdm(total=len(rows), unit="row", desc="scoring", disable=not progress or None,
                   dynamic_ncols=True)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            sums[chunk] = _score_batch(ev, [rows[i] for i in chunk])
            bar.update(len(chunk))
        bar.close()
    return _collect(examples, rows, sums)


def _collect(examples: Sequence[ChoiceExample], rows: list[_Row], sums: np.ndarray) -> list[ChoiceScore]:
    scores = [ChoiceScore([0.0] * len(ex.choices), [0] * len(ex.choices), [len(c) for c in ex.choices])
              for ex in examples]
    for r, total in zip(rows, sums):  # a long continuation's rows add up
        s = scores[r.example]
        s.logprobs[r.choice] += float(total)
        s.tokens[r.choice] += r.n_cont
        s.truncated = s.truncated or r.truncated
    return scores


def score_choices_one_by_one(model: nn.Module, tokenizer: Tokenizer, examples: Sequence[ChoiceExample], *,
                             device=None, dtype: DTypeLike = None) -> list[ChoiceScore]:
    """Reference path: one forward pass per choice (per window of a continuation longer than the
    model's context), written out without batching, padding or gathering."""
    scores = []
    with evaluating(model, device, dtype) as ev:
        T = ev.block_size
        for ex in examples:
            ctx = tokenizer.encode(ex.context) or [tokenizer.eot_id]
            score = ChoiceScore([], [], [len(c) for c in ex.choices])
            for choice in ex.choices:
                ids = ctx + tokenizer.encode(ex.delimiter + choice)
                n_cont = len(ids) - len(ctx)
                total, end, left = 0.0, len(ids), n_cont
                while left > 0:
                    window = ids[max(0, end - T - 1):end]
                    n = min(left, len(window) - 1)
                    with ev.runtime.autocast():
                        logits, _ = ev.model(torch.tensor([window[:-1]], device=ev.device))  # (1, L, V)
                    lp = torch.log_softmax(logits[0, -n:].float(), dim=-1)  # (n, V)
                    target = torch.tensor(window[-n:], device=ev.device)
                    total += float(lp.gather(1, target[:, None]).sum().double())
                    left, end = left - n, end - n
                score.logprobs.append(total)
                score.tokens.append(n_cont)
                score.truncated = score.truncated or len(ids) > T + 1
            scores.append(score)
    return scores


# --- metrics ----------------------------------------------------------------------------------------
def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error, sample std (n - 1) / sqrt(n), as lm-evaluation-harness reports."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var) / math.sqrt(n)


def choice_metrics(scores: Sequence[ChoiceScore], labels: Sequence[int]) -> dict:
    """acc, acc_norm, acc_per_token (each with _stderr) and n over scored examples."""
    out: dict = {}
    for name, attr in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_per_token", "pred_per_token")):
        correct = [float(getattr(s, attr) == label) for s, label in zip(scores, labels)]
        out[name], out[f"{name}_stderr"] = mean_and_stderr(correct)
    out["n"] = len(scores)
    return out


def prediction_records(scores: Sequence[ChoiceScore], examples: Sequence[ChoiceExample],
                       indices: Optional[Sequence[int]] = None) -> list[dict]:
    """One JSON-ready record per example, for --predictions files."""
    indices = indices if indices is not None else range(len(scores))
    return [{"index": int(i), "label": ex.label, "pred": s.pred, "pred_norm": s.pred_norm,
             "pred_per_token": s.pred_per_token, "logprobs": s.logprobs, "tokens": s.tokens,
             "chars": s.chars, "truncated": s.truncated}
            for i, s, ex in zip(indices, scores, examples)]
