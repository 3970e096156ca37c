"""Continuous batching: rows of many generation requests decoded together in shared key/value buffers.
See `gptforge.engine` for how decoding runs."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from gptforge.common import UserError
from gptforge.engine.runner import ModelRunner
from gptforge.engine.sampling import SamplingParams, StepOutput, StopCheck, presence_mask, sample_next
from gptforge.model import KVCache

WINDOW_KEEP_FRACTION = 0.5
"""On a window slide keep this fraction of block_size (the newest tokens of the row). Half a window
means one rebuild per block_size/2 new tokens, instead of a full forward pass per token."""

SLIDE_MARGIN_FRACTION = 0.125
"""When the buffers are full, rows within this fraction of block_size of a full window that will fill it
before they end slide early, with the full ones: a slide then frees many slots at once, instead of moving
the buffers' contents one slot every step."""


@dataclass
class _CacheView:
    """The KVCache interface (k, v, pos, pad_lens) over a slice of DecodeBatch's buffers: the model writes
    new keys and values through the view into the shared buffers."""

    k: torch.Tensor  # (L, B, nh, max_len, hs)
    v: torch.Tensor
    pos: int
    pad_lens: Optional[torch.Tensor]  # (B,) or None when no row is padded

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class _Row:
    """One sequence being generated: prompt + sampled tokens (the last one not fed to the model yet)."""

    __slots__ = ("group", "index", "seq", "n_prompt", "slot", "pad")

    def __init__(self, group: "_Group", index: int, seq: list[int]):
        self.group, self.index, self.seq = group, index, seq
        self.n_prompt = len(seq)
        self.slot = -1  # buffer row while running
        self.pad = 0  # padding slots before the row's first cached token

    @property
    def n_sampled(self) -> int:
        return len(self.seq) - self.n_prompt


class _Group:
    """The rows of one `DecodeBatch.add` call: they share sampling params, random generator, stop rule and
    logprob request, and are reported together in one StepOutput per step."""

    def __init__(self, gid: int, prompts: list[list[int]], params: SamplingParams,
                 stop_check: Optional[StopCheck], n_top: Optional[int], vocab_size: int, device):
        self.id, self.params, self.stop_check, self.n_top = gid, params, stop_check, n_top
        self.rows = [_Row(self, i, seq) for i, seq in enumerate(prompts)]
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.finished: list[Optional[str]] = [None] * len(prompts)
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()  # fresh nondeterministic seed, private to this group
        else:
            self.generator.manual_seed(params.seed)
        self.seen = self.counts = None  # penalty state, kept only when a penalty is on
        if params.repetition_penalty != 1.0:
            self.seen = presence_mask(prompts, vocab_size, device)
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(len(prompts), vocab_size, device=device)

    def pick(self, logits: torch.Tensor, local: list[int]):
        """Sample the next token of rows `local` (indices within the group) from their logits (n, V)."""
        at = torch.tensor(local, device=logits.device) if self.seen is not None or self.counts is not None \
            else None
        seen = self.seen[at] if self.seen is not None else None
        counts = self.counts[at] if self.counts is not None else None
        tokens = sample_next(logits, self.params, seen, self.generator, counts)  # (n,)
        if self.seen is not None:
            self.seen[at, tokens] = True
        if self.counts is not None:
            self.counts.index_put_((at, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)
        lp = None
        if self.n_top is not None:  # computed only on request: the default path pays nothing
            logp = F.log_softmax(logits.float(), dim=-1)  # (n, V) raw distribution
            chosen = logp.gather(1, tokens[:, None]).squeeze(1)  # (n,)
            top = logp.topk(self.n_top, dim=-1) if self.n_top > 0 else None
            lp = (chosen.tolist(), top.indices.tolist() if top is not None else None,
                  top.values.tolist() if top is not None else None)
        return tokens, lp


class DecodeBatch:
    """Rows of many generation requests decoded together, one token per running row per step. Requests
    (groups) join with `add` and leave when their rows end or on `cancel`, between any two steps.
    max_rows caps the rows running at once (None: no cap): the rest wait, first come first served, and
    start as running rows end, so the key/value buffers never hold more than max_rows rows.
    Runs on `runner` (an Engine is one): its forward passes and prompt checks, and nothing else of it.
    Not thread-safe: one thread adds, cancels and steps."""

    def __init__(self, runner: ModelRunner, use_cache: bool = True, max_rows: Optional[int] = None):
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise UserError(f"max_rows must be an integer >= 1 or None, got {max_rows!r}")
        self.runner, self.use_cache, self.max_rows = runner, use_cache, max_rows
        self.groups: dict[int, _Group] = {}
        self.waiting: deque[_Row] = deque()  # added, not started yet: prefilled at a step with free rows
        self.running: list[_Row] = []  # rows in the buffers, in buffer-row order
        self.k = self.v = None  # (L, R, nh, C, hs) buffers, allocated while rows run
        self.pos = 0  # slots filled, common to all rows
        self.keep = max(1, int(runner.config.block_size * WINDOW_KEEP_FRACTION))
        self._next_id = 0

    @property
    def n_rows(self) -> int:
        """Rows running or waiting to start."""
        return len(self.running) + len(self.waiting)

    def add(self, prompts: list[list[int]], params: SamplingParams, stop_check: Optional[StopCheck] = None,
            logprobs: Optional[int] = None, truncate: Optional[str] = None) -> int:
        """Queue a group of rows; returns its id. Bad input raises here. A group with nothing to generate
        (no prompts, max_new_tokens 0) is never running and produces no output."""
        rows = self.runner.check_prompts(prompts, truncate)
        vocab = self.runner.config.vocab_size
        if logprobs is not None and not 0 <= logprobs <= vocab:
            raise UserError(f"logprobs must be between 0 and the vocabulary size, got {logprobs}")
        gid, self._next_id = self._next_id, self._next_id + 1
        if rows and params.max_new_tokens > 0:
            with torch.inference_mode():
                group = _Group(gid, rows, params, stop_check, logprobs, vocab, self.runner.device)
            self.groups[gid] = group
            self.waiting.extend(group.rows)
        return gid

    def is_running(self, gid: int) -> bool:
        return gid in self.groups

    def cancel(self, gid: int) -> None:
        """Drop a group at once; its buffer rows are free for the next step."""
        group = self.groups.pop(gid, None)
        if group is None:
            return
        if any(r.group is group for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if r.group is not group)
        started = [r for r in group.rows if r.slot >= 0]
        if started:
            with torch.inference_mode():  # the buffers are inference tensors
                self._remove(started)

    def outputs_of(self, gid: int) -> Iterator[StepOutput]:
        """Step the batch until group `gid` has ended, yielding its output of each step (raising its error
        if it fails)."""
        while gid in self.groups:
            out = self.step().get(gid)
            if out is not None and out.error is not None:
                raise out.error
            if out is not None:
                yield out

    @torch.inference_mode()
    def step(self) -> dict[int, StepOutput]:
        """One token for every running row (and the first one for rows that just joined); returns the
        output of each group that had rows this step. Groups whose rows have all ended are dropped."""
        old = list(self.running)
        free = len(self.waiting) if self.max_rows is None else min(len(self.waiting), self.max_rows - len(old))
        new = [self.waiting.popleft() for _ in range(free)]
        parts = []
        if old:
            parts.append(self._decode())
        if new:
            parts.append(self._admit(new))
        if not parts:
            return {}
        return self._sample(old + new, torch.cat(parts) if len(parts) > 1 else parts[0])

    # --- forward passes ------------------------------------------------------------------------------
    def _decode(self) -> torch.Tensor:
        """Feed each running row its newest token -> (B, V) logits."""
        if not self.use_cache:
            return self._full_forward(self.running)
        if self.pos == self.k.shape[3]:
            self._make_room()
        B = len(self.running)
        idx = torch.tensor([[r.seq[-1]] for r in self.running], dtype=torch.long, device=self.runner.device)
        view = _CacheView(self.k[:, :B], self.v[:, :B], self.pos, self._pad_lens(self.running))
        logits = self.runner.last_logits(idx, view)
        self.pos += 1
        return logits

    def _admit(self, rows: list[_Row]) -> torch.Tensor:
        """Prefill joining rows into free buffer rows, aligned to end at the common position -> logits."""
        B = len(self.running)
        if not self.use_cache:
            self._place(rows, [0] * len(rows))
            return self._full_forward(rows)
        T = max(len(r.seq) for r in rows)
        if self.k is None:  # first rows: room for what they can generate, as far as the window allows
            most = max(r.group.params.max_new_tokens for r in rows)
            self._reserve(len(rows), min(self.runner.config.block_size, T + most - 1))
        else:
            self._reserve(B + len(rows), T)
        if T > self.pos:
            self._shift(self.pos - T)  # right: the running rows' contents end at T too
        self.pos = max(self.pos, T)
        start, pads = self.pos - T, [T - len(r.seq) for r in rows]
        idx = torch.tensor([[0] * p + r.seq for p, r in zip(pads, rows)], dtype=torch.long,
                           device=self.runner.device)
        end = B + len(rows)
        pad_lens = torch.tensor(pads, device=self.runner.device) if any(pads) else None
        view = _CacheView(self.k[:, B:end, :, start:], self.v[:, B:end, :, start:], 0, pad_lens)
        logits = self.runner.last_logits(idx, view)
        self._place(rows, [start + p for p in pads])
        return logits

    def _full_forward(self, rows: list[_Row]) -> torch.Tensor:
        """Reference path: a full forward per row over its last block_size tokens."""
        run, block = self.runner, self.runner.config.block_size
        return torch.cat([run.last_logits(torch.tensor([r.seq[-block:]], dtype=torch.long, device=run.device))
                          for r in rows])  # (B, V)

    def _pad_lens(self, rows: list[_Row]) -> Optional[torch.Tensor]:
        # no padding (e.g. one row) -> no mask: decode steps then run plain, unmasked attention
        if not any(r.pad for r in rows):
            return None
        return torch.tensor([r.pad for r in rows], device=self.runner.device)

    # --- buffer management ---------------------------------------------------------------------------
    def _place(self, rows: list[_Row], pads: list[int]) -> None:
        for r, pad in zip(rows, pads):
            r.slot, r.pad = len(self.running), pad
            self.running.append(r)

    def _reserve(self, n_rows: int, length: int) -> None:
        """Make the buffers hold at least n_rows rows and `length` slots, keeping their contents."""
        R, C = (self.k.shape[1], self.k.shape[3]) if self.k is not None else (0, 0)
        if n_rows <= R and length <= C:
            return
        cfg = self.runner.config
        R2 = max(n_rows, 2 * R) if n_rows > R else R  # doubling: joins rarely reallocate
        if self.max_rows is not None:
            R2 = min(R2, max(n_rows, self.max_rows))  # never more rows than can run at once
        shape = (cfg.n_layer, R2, cfg.n_head, max(length, C), cfg.head_dim)
        # zeros, not empty: masked padding slots are still multiplied (by 0), and NaN * 0 is NaN
        k = torch.zeros(shape, device=self.runner.device, dtype=self.runner.cache_dtype)
        v = torch.zeros_like(k)
        if self.k is not None:
            B = len(self.running)
            k[:, :B, :, :self.pos] = self.k[:, :B, :, :self.pos]
            v[:, :B, :, :self.pos] = self.v[:, :B, :, :self.pos]
        self.k, self.v = k, v

    def _shift(self, d: int) -> None:
        """Move every running row's contents d slots left (d < 0: right), keeping each row's positions."""
        B, pos = len(self.running), self.pos
        for buf in (self.k, self.v):
            if d > 0:
                buf[:, :B, :, :pos - d] = buf[:, :B, :, d:pos].clone()
            else:
                buf[:, :B, :, -d:pos - d] = buf[:, :B, :, :pos].clone()
        for r in self.running:
            r.pad -= d
        self.pos -= d

    def _make_room(self) -> None:
        """The buffers are full: grow them up to the window, else slide the rows that fill it."""
        block, C = self.runner.config.block_size, self.k.shape[3]
        if C < block:
            left = max(r.group.params.max_new_tokens - r.n_sampled for r in self.running)
            self._reserve(len(self.running), min(block, max(self.pos + left, 2 * C)))
            return
        full = [r for r in self.running if self._slides_now(r, block)]
        n_ctx = self.keep - 1  # the newest token is fed by the decode step that follows
        if full and n_ctx > 0:
            run = self.runner
            ctx = torch.tensor([r.seq[-self.keep:-1] for r in full], dtype=torch.long, device=run.device)
            fresh = KVCache(run.config, len(full), n_ctx, run.device, run.cache_dtype)
            run.last_logits(ctx, fresh)  # only its keys and values are needed
            slots = torch.tensor([r.slot for r in full], device=run.device)
            self.k[:, slots, :, self.pos - n_ctx:self.pos] = fresh.k
            self.v[:, slots, :, self.pos - n_ctx:self.pos] = fresh.v
        for r in full:
            r.pad = self.pos - n_ctx
        self._shift(min(r.pad for r in self.running))

    def _slides_now(self, row: _Row, block: int) -> bool:
        """A row slides when its window is full, or nearly full if it would fill it before ending anyway;
        a row that fits its window to the end never slides, so it generates exactly what it would alone."""
        length = self.pos - row.pad
        if length >= block:
            return True
        still_fed = row.group.params.max_new_tokens - row.n_sampled  # the pending token, and later ones
        return length > block * (1 - SLIDE_MARGIN_FRACTION) and length + still_fed > block

    def _remove(self, rows: list[_Row]) -> None:
        """Take rows out of the buffers; the last running row moves into each freed buffer row."""
        for r in sorted(rows, key=lambda r: r.slot, reverse=True):
            last = self.running.pop()
            if last is not r:
                if self.use_cache:
                    self.k[:, r.slot, :, :self.pos] = self.k[:, last.slot, :, :self.pos]
                    self.v[:, r.slot, :, :self.pos] = self.v[:, last.slot, :, :self.pos]
                last.slot = r.slot
                self.running[r.slot] = last
            r.slot = -1
        if not self.running:  # idle: give the memory back
            self.k = self.v = None
            self.pos = 0

    # --- sampling ------------------------------------------------------------------------------------
    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> dict[int, StepOutput]:
        at_of: dict[_Group, list[int]] = {}
        for i, r in enumerate(rows):
            at_of.setdefault(r.group, []).append(i)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        picked, failed = {}, {}
        for group, at in at_of.items():
            whole = len(at) == len(rows)
            index = None if whole else torch.tensor(at, device=logits.device)
            try:
                group_tokens, picked[group] = group.pick(logits if whole else logits[index],
                                                         [rows[i].index for i in at])
            except Exception as e:  # noqa: BLE001 - one request's failure must not end its neighbours'
                failed[group] = e
                continue
            if whole:
                tokens = group_tokens
            else:
                tokens[index] = group_tokens
        ids = tokens.tolist()  # the one host sync per step
        outputs, ended = {}, []
        for group, at in at_of.items():
            if group in failed:
                continue
            try:
                outputs[group.id], done = self._record(group, [rows[i] for i in at], [ids[i] for i in at],
                                                       picked[group])
            except Exception as e:  # noqa: BLE001 - e.g. its stop check raised
                failed[group] = e
                continue
            ended += done
        self._remove(ended)
        for group, error in failed.items():
            self.cancel(group.id)
            outputs[group.id] = StepOutput([None] * len(group.rows), list(group.finished), error=error)
        return outputs

    def _record(self, group: _Group, rows: list[_Row], ids: list[int], picked) -> tuple[StepOutput, list[_Row]]:
        """Append one group's sampled tokens to its rows -> its StepOutput and the rows that ended."""
        out: list[Optional[int]] = [None] * len(group.rows)
        ended = []
        for row, tok in zip(rows, ids):
            row.seq.append(tok)
            if self._keep_token(group, row, tok):
                out[row.index] = tok
            if group.finished[row.index]:
                ended.append(row)
        output = StepOutput(out, list(group.finished), *self._logprob_lists(group, picked, rows, out))
        if all(group.finished):
            del self.groups[group.id]
        return output, ended

    @staticmethod
    def _keep_token(group: _Group, row: _Row, tok: int) -> bool:
        """Record a sampled token; False for a stop token (which ends the row and is not returned)."""
        b, params = row.index, group.params
        if tok in params.stop_token_ids:
            group.finished[b] = "stop"
            return False
        group.generated[b].append(tok)
        if group.stop_check is not None and group.stop_check(b, group.generated[b]):
            group.finished[b] = "stop"
        elif row.n_sampled == params.max_new_tokens:
            group.finished[b] = "length"
        return True

    @staticmethod
    def _logprob_lists(group: _Group, lp, rows: list[_Row], out: list[Optional[int]]):
        if lp is None:
            return None, None
        chosen, top_ids, top_values = lp
        logprobs: list[Optional[float]] = [None] * len(group.rows)
        tops: Optional[list] = [None] * len(group.rows) if top_ids is not None else None
        for j, row in enumerate(rows):
            if out[row.index] is None:
                continue
            logprobs[row.index] = chosen[j]
            if tops is not None:
                tops[row.index] = list(zip(top_ids[j], top_values[j]))
        return logprobs, tops
