"""Batches of token windows from prepared shards: memory-mapped, rank-aware and resumable.

The split is one virtual stream: its shards in order, memory-mapped (never loaded). A window may cross a
shard boundary; the stream is contiguous text in shard order, so that is just more of the same stream.

Distributed training sees exactly what single-process training with the same global batch sees: one
global cursor `rows` counts the rows handed out by all ranks; the next global micro-batch is rows
[rows, rows + B * world_size) and rank r takes B of them from rows + r*B. Global row i is always the same
window, whatever the batch size, number of ranks or gradient accumulation, so one process with batch 2B,
two ranks with batch B and one process with batch B and 2 accumulation micro-steps train on the same rows.
- random: the window start of global row i is drawn uniformly over all windows (as nanoGPT's
  torch.randint(len(data) - T, (B,))) by a torch.Generator seeded from (seed, i // DRAW_BLOCK), which
  draws the starts of DRAW_BLOCK consecutive rows at once.
- sequential: a pass over the stream in consecutive windows; global row i starts at (i * T) mod L,
  L = the largest multiple of T with a full T + 1 window at every start.

state_dict()/load_state_dict() resume exactly: the next batch after loading is the one the saved loader
would have produced next. The state is the global cursor, independent of the number of ranks, so a run
saved on N ranks resumes on M with the same global batch (accumulation adjusted) and trains on the same
rows as the uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptforge.common import UserError
from gptforge.data.prepare import load_manifest, shard_size

SAMPLINGS = ("random", "sequential")
DRAW_BLOCK = 4096  # random window starts drawn per generator seed (a micro-batch rarely needs a second block)


class TokenLoader:
    def __init__(self, data_dir: Path, split: str, batch_size: int, block_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, sampling: str = "random",
                 device: torch.device | str = "cpu"):
        if split not in ("train", "val"):
            raise UserError(f"unknown split '{split}'; use train or val")
        if sampling not in SAMPLINGS:
            raise UserError(f"unknown sampling '{sampling}'; use {' or '.join(SAMPLINGS)}")
        if batch_size <= 0 or block_size <= 0:
            raise UserError(f"batch size and block size must be positive, got {batch_size} and {block_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.data_dir, self.split = Path(data_dir).expanduser(), split
        self.B, self.T, self.rank, self.world_size = batch_size, block_size, rank, world_size
        self.seed, self.sampling = seed, sampling
        self.device = torch.device(device)
        self.g = 0  # next_batch() calls so far (kept for the record; the cursor is `rows`)
        self.rows = 0  # the global cursor: rows handed out so far, by all ranks
        self._drawn: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))  # random: the last block drawn

        manifest = load_manifest(self.data_dir)
        self.manifest = manifest
        info = manifest["splits"][split]
        if info["tokens"] == 0:
            raise UserError(f"{self.data_dir} has no {split} split (prepared with data.val_fraction="
                            f"{manifest['data_config'].get('val_fraction')}); prepare with val_fraction > 0")
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        self.shards: list[np.memmap] = []
        self.shard_paths: list[Path] = []
        for shard in info["shards"]:
            path = self.data_dir / shard["file"]
            if shard_size(path, self.data_dir) != shard["tokens"] * dtype.itemsize:
                raise UserError(f"shard {path} is missing or truncated; prepare {self.data_dir} again")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
            self.shard_paths.append(path)
        # starts[i] = offset of shard i in the virtual stream
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.starts[-1])
        if self.n_tokens < self.T + 1:
            raise UserError(f"the {split} split has only {self.n_tokens} tokens, fewer than block_size + 1 = "
                            f"{self.T + 1}; use a smaller block_size or more data")
        self.usable = (self.n_tokens - 1) // self.T * self.T  # sequential: window starts cycle in [0, usable)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()

    # --- which windows ------------------------------------------------------------------------------
    def _global_starts(self) -> np.ndarray:
        """Window starts of all B * world_size rows of the current global micro-batch."""
        rows = self.rows + np.arange(self.B * self.world_size, dtype=np.int64)
        if self.sampling == "random":
            return np.array([self._random_start(int(i)) for i in rows], dtype=np.int64)
        return rows * self.T % self.usable

    def _random_start(self, row: int) -> int:
        block, offset = divmod(row, DRAW_BLOCK)
        if self._drawn[0] != block:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + block) % (2**63))
            self._drawn = (block, torch.randint(self.n_tokens - self.T, (DRAW_BLOCK,), generator=gen).numpy())
        return self._drawn[1][offset]

    def _window(self, start: int) -> np.ndarray:
        """Tokens [start, start + T + 1) of the virtual stream, possibly spanning shards."""
        stop = start + self.T + 1
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - int(self.starts[i])
        if stop <= self.starts[i + 1]:  # the common case: inside one shard
            return self.shards[i][local : local + self.T + 1]
        parts = []
        while start < stop:
            take = min(stop, int(self.starts[i + 1])) - start
            parts.append(self.shards[i][local : local + take])
            start, i, local = start + take, i + 1, 0
        return np.concatenate(parts)

    # --- batches ---------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 tensors of shape (B, T) on the loader's device; y is x shifted left by one."""
        starts = self._global_starts()[self.rank * self.B : (self.rank + 1) * self.B]
        rows = np.stack([self._window(int(s)) for s in starts])  # (B, T+1)
        if rows.max() >= self.vocab_size:  # on the host, before the ids can index an embedding
            self._refuse_out_of_range(rows, starts)
        buf = torch.from_numpy(rows.astype(np.int64))  # (B, T+1)
        self.g += 1
        self.rows += self.B * self.world_size
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        if self._pin:  # page-locked memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def _refuse_out_of_range(self, rows: np.ndarray, starts: np.ndarray) -> None:
        row, col = np.argwhere(rows >= self.vocab_size)[0]
        position = int(starts[row]) + int(col)  # in the split's virtual stream
        i = int(np.searchsorted(self.starts, position, side="right")) - 1
        raise UserError(f"shard {self.shard_paths[i]} holds token id {int(rows[row, col])} at token offset "
                        f"{position - int(self.starts[i])}, outside the vocabulary of {self.vocab_size}; the "
                        f"shard is corrupt: prepare {self.data_dir} again (--data.verify full checks every shard)")

    @property
    def epoch(self) -> float:
        """Passes over the split so far (sequential: exact; random: in expectation)."""
        return self.rows * self.T / max(self.n_tokens, 1)

    # --- resuming ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"g": self.g, "rows": self.rows, "seed": self.seed, "sampling": self.sampling,
                "batch_size": self.B, "block_size": self.T, "world_size": self.world_size,
                "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved loader stopped (its seed and sampling win over this loader's)."""
        try:
            self.g = int(state["g"])
            self.seed = int(state["seed"])
            sampling = state["sampling"]
            self.rows = int(state.get("rows", self.g * int(state["batch_size"]) * int(state["world_size"])))
        except (KeyError, TypeError, ValueError):
            raise UserError("data loader state is incomplete or corrupt; resume from another checkpoint "
                            "or start a new run") from None
        if sampling not in SAMPLINGS:
            raise UserError(f"data loader state names unknown sampling '{sampling}'")
        self.sampling = sampling
