"""Loss, perplexity and bits per byte of a model on long text, scored with a sliding window.

The text is one token stream: a raw text file encoded with the model's tokenizer, or a split of a
prepared shard folder. An end-of-text token is put in front (as lm-evaluation-harness's rolling
log-likelihood does, and as every document in training followed one), so every token of the text is
scored, including the first.

Windows (HF's "perplexity of fixed-length models" scheme, with a full-length last window):
    - the first window scores targets 1..T with whatever context precedes them;
    - each further window ends `stride` targets later, holds the T tokens before its end as input, and
      scores only the targets no earlier window scored.
So every token is scored exactly once; stride == T (the default) gives non-overlapping windows, the
cheapest and the same numbers as the chunked validation loss, while a smaller stride gives every
scored token at least T - stride tokens of context (stride 1: the full T), at T/stride times the cost.

bits per byte = total nats / (ln 2 * UTF-8 bytes of the scored tokens). Special tokens (the
end-of-text separators of shards) count their nats but no bytes: they are not part of the text. Bytes
do not depend on the tokenizer, so models with different vocabularies can be compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from gptforge.common import UserError
from gptforge.data.prepare import MANIFEST, SPLITS, verify_shards
from gptforge.eval.runtime import DTypeLike, EvalModel, evaluating
from gptforge.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Window:
    """Input ids[start:end], targets ids[start + 1:end + 1]; targets from index `first` on are scored."""

    start: int
    end: int
    first: int


def window_plan(n_ids: int, block_size: int, stride: int) -> Iterator[Window]:
    """Windows scoring targets 1..n_ids-1 of a stream of n_ids ids, each exactly once (generated lazily:
    stride 1 over a long text means millions of windows)."""
    if not 1 <= stride <= block_size:
        raise UserError(f"stride must be between 1 and the model's context length {block_size}, got {stride}")
    return _windows(n_ids, block_size, stride)


def _windows(n_ids: int, block_size: int, stride: int) -> Iterator[Window]:
    last = n_ids - 1  # index of the last target
    if last < 1:
        return
    end = min(block_size, last)
    yield Window(0, end, 1)
    while end < last:
        new_end = min(end + stride, last)
        yield Window(new_end - block_size, new_end, end + 1)  # new_end > block_size, so start > 0
        end = new_end


def text_bytes(tokenizer: Tokenizer, ids: np.ndarray) -> int:
    """UTF-8 bytes of the text that `ids` stand for; special tokens are not text and count 0."""
    ordinary = ids[ids < tokenizer.base_vocab_size]
    return len(tokenizer.decode_bytes(ordinary.tolist()))


@dataclass
class StreamScore:
    nll: float  # total nats over the scored tokens
    tokens: int
    bytes: int

    def metrics(self) -> dict:
        loss = self.nll / max(self.tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                "bits_per_byte": self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan"),
                "tokens": self.tokens, "bytes": self.bytes}


def score_stream(ev: EvalModel, ids: np.ndarray, tokenizer: Tokenizer, stride: int,
                 batch_size: int = 8, progress: bool = False) -> StreamScore:
    """Sliding-window negative log-likelihood of every target of `ids` (see the module docstring).

    Uses the model's own loss (model(idx, targets), fused and chunked, so no (B, T, V) logits):
    its mean over the non-ignored targets times their count is the batch's total."""
    from tqdm.auto import tqdm

    T = ev.block_size
    windows = window_plan(len(ids), T, stride)
    n_windows = 0 if len(ids) < 2 else 1 + math.ceil(max(len(ids) - 1 - T, 0) / stride)
    bar = tqdm(total=n_windows, unit="win", desc="scoring", disable=not progress or None, dynamic_ncols=True)
    score = StreamScore(0.0, 0, 0)
    batch: list[Window] = []
    for window in windows:
        batch.append(window)
        if len(batch) == batch_size:
            _score_windows(ev, ids, tokenizer, batch, score)
            bar.update(len(batch))
            batch = []
    if batch:
        _score_windows(ev, ids, tokenizer, batch, score)
        bar.update(len(batch))
    bar.close()
    return score


def _score_windows(ev: EvalModel, ids: np.ndarray, tokenizer: Tokenizer, windows: list[Window],
                   score: StreamScore) -> None:
    # All windows but a lone first one have length T, so a batch never needs padding.
    x = np.stack([ids[w.start:w.end] for w in windows]).astype(np.int64)  # (B, L)
    y = np.stack([ids[w.start + 1:w.end + 1] for w in windows]).astype(np.int64)  # (B, L)
    scored = np.concatenate([ids[w.first:w.end + 1] for w in windows]).astype(np.int64)
    for row, w in enumerate(windows):
        y[row, : w.first - w.start - 1] = -100  # already scored by an earlier window
    with ev.runtime.autocast():
        _, loss = ev.model(torch.from_numpy(x).to(ev.device), torch.from_numpy(y).to(ev.device))
    score.nll += float(loss) * len(scored)
    score.tokens += len(scored)
    score.bytes += text_bytes(tokenizer, scored)


# --- sources ----------------------------------------------------------------------------------------
def read_token_stream(source: Union[str, Path], tokenizer: Tokenizer, split: str = "val",
                      limit: Optional[int] = None) -> np.ndarray:
    """[end-of-text] + the source's tokens (only the first `limit` of them, if given).

    source: a prepared shard folder (its `split`), or a UTF-8 text file encoded with `tokenizer`."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"evaluation data not found: {path}; pass a text file or a prepared data folder")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be a positive number of tokens, got {limit}")
    if path.is_dir():
        tokens = _shard_tokens(path, tokenizer, split, limit)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; pass a text file or a prepared data folder") from None
        if not text.strip():
            raise UserError(f"{path} holds no text to evaluate")
        tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)[:limit]
    # shard dtypes hold the end-of-text id: it belongs to the same (checked) vocabulary
    return np.concatenate([np.array([tokenizer.eot_id], dtype=tokens.dtype), tokens])


def _shard_tokens(data_dir: Path, tokenizer: Tokenizer, split: str, limit: Optional[int]) -> np.ndarray:
    if not (data_dir / MANIFEST).is_file():
        raise UserError(f"{data_dir} is a folder but not a prepared data folder (no {MANIFEST}); pass a "
                        "text file or run `gptforge prepare` first")
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; use {' or '.join(SPLITS)}")
    manifest = verify_shards(data_dir)
    shard_tok = load_tokenizer(data_dir / manifest["tokenizer"]["dir"], root=data_dir)
    if not same_ordinary_vocabulary(shard_tok, tokenizer):
        raise UserError(f"{data_dir} was tokenized with {shard_tok.describe()} but the model uses "
                        f"{tokenizer.describe()}; evaluate a raw text file instead, or prepare the data "
                        "with the model's tokenizer")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    parts, have = [], 0
    for shard in manifest["splits"][split]["shards"]:
        if limit is not None and have >= limit:
            break
        path = data_dir / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
            raise UserError(f"shard {path} is missing or truncated; prepare {data_dir} again")
        part = np.memmap(path, dtype=dtype, mode="r")
        parts.append(part if limit is None else part[: limit - have])
        have += len(parts[-1])
    if not have:
        raise UserError(f"{data_dir} has no tokens in its {split} split; prepare it with data.val_fraction > 0 "
                        "or pass --split train")
    return np.concatenate(parts)


def same_ordinary_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether ids mean the same text under both tokenizers (specials added later may differ)."""
    return a.kind == b.kind and a.eot_id == b.eot_id and a._state() == b._state()


def evaluate_lm(model: nn.Module, tokenizer: Tokenizer, source: Union[str, Path], *,
                stride: Optional[int] = None, split: str = "val", limit: Optional[int] = None,
                batch_size: int = 8, device=None, dtype: DTypeLike = None, progress: bool = False) -> dict:
    """Loss, perplexity and bits per byte of `model` on a text file or a prepared folder's split.

    stride: new targets per window (default: the model's context length, i.e. non-overlapping windows).
    limit: score only the first `limit` tokens. batch_size: windows per forward pass.
    Returns {"task": "loss", "loss", "perplexity", "bits_per_byte", "tokens", "bytes", "stride"}."""
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    ids = read_token_stream(source, tokenizer, split, limit)
    with evaluating(model, device, dtype) as ev:
        stride = ev.block_size if stride is None else int(stride)
        score = score_stream(ev, ids, tokenizer, stride, batch_size, progress)
    return {"task": "loss", **score.metrics(), "stride": stride}
