"""Fine-tuning batches: examples (data/examples.py) -> token ids -> (x, y) batches that resume exactly.

    pack_documents(docs, tok) -> stream       PackedTextBatches(stream, ...)   text: (B, T) windows
    encode_instructions / encode_conversations SFTBatches(sequences, ...)      instruct, chat: padded, masked
    encode_labeled(examples, tok, names, ...)  ClassifyBatches(sequences, ...) classify: ids + class index

Order. An epoch is a seeded permutation of the source's items (windows, sequences, texts); a balanced
classifier draws each epoch's items per class first. Rows run epoch after epoch without a gap: global
row r is item order(r // n)[r % n] (n items per epoch), so every item is seen exactly once per epoch, a
batch may hold the end of one epoch and the start of the next, and `epoch` (rows / n) is exact. As in
TokenLoader, global micro-batch g has B * world_size rows and rank r takes rows [r*B, (r+1)*B); counting
rows (not calls) lets a resumed run change batch size or world size and continue at the same row.

Resume. state_dict() holds the row counter, the seed, the ordering options and a fingerprint of the
encoded data; after load_state_dict() the next batch is bitwise the one the saved source would have
produced next. Changed data or options are refused: the order would silently differ.

Targets hold -100 where nothing is learned (model.py leaves -100 out of the loss). Classification rows
are padded with id -1 in x, which the classifier uses to find each row's last real token.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch

from gptforge.common import UserError
from gptforge.data.examples import Document, LabeledText
from gptforge.prompts import ROLE_TOKENS
from gptforge.tokenizer import Tokenizer

IGNORE = -100  # target that is not learned (F.cross_entropy's default ignore_index)
CLASSIFY_PAD = -1  # padding id in classifier inputs: never a real token, so the last real one is findable
BALANCES = ("none", "downsample", "oversample")
KEEPS = ("start", "end")

Batch = tuple[torch.Tensor, torch.Tensor]


class Encoded(NamedTuple):
    sequences: list
    truncated: int  # examples cut to fit the context
    dropped: int  # examples left with nothing to learn after the cut, and so left out


# --- encoding --------------------------------------------------------------------------------------------
def pack_documents(documents: Sequence[Document], tokenizer: Tokenizer) -> np.ndarray:
    """One token stream: end-of-text, then each document (its tag token first, if any) followed by an
    end-of-text. The leading end-of-text makes every document token a target predicted from a document
    start, as generation from end-of-text (plus a tag) sees it."""
    eot = tokenizer.eot_id
    parts = [[eot]]
    for i, doc in enumerate(documents):
        ids = tokenizer.encode_tagged(doc.text, doc.tag)
        if len(ids) == (0 if doc.tag is None else 1):  # nothing but the tag
            raise UserError(f"document {i} ({doc.text[:30]!r}) encodes to no tokens; remove it")
        parts += [ids, [eot]]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def encode_instructions(examples: Sequence, tokenizer: Tokenizer, block_size: int) -> Encoded:
    """Alpaca examples -> (ids, mask) pairs of at most block_size + 1 tokens. A longer example keeps its
    start (the prompt and as much of the response as fits) and is dropped if no response token fits."""
    def encoded() -> Iterator[tuple[tuple[list[int], list[int]], tuple]]:
        for i, example in enumerate(examples):
            try:
                yield tokenizer.encode_instruction(example), ()
            except UserError as e:
                raise UserError(f"instruct example {i}: {e}") from None

    return _fit_all(encoded(), block_size)


def encode_conversations(conversations: Sequence, tokenizer: Tokenizer, block_size: int) -> Encoded:
    """Conversations -> (ids, mask) pairs (Tokenizer.encode_chat: loss on assistant turns) of at most
    block_size + 1 tokens. A longer conversation keeps the whole turns from its start that fit, if they
    include a learned assistant token; otherwise its first block_size + 1 tokens (so the first assistant
    turn is learned in part). One with no assistant token left is dropped."""
    role_ids = {tokenizer.special_tokens.get(name) for name in ROLE_TOKENS.values()}

    def encoded() -> Iterator[tuple[tuple[list[int], list[int]], list[int]]]:
        for messages in conversations:
            ids, mask = tokenizer.encode_chat(messages)
            yield (ids, mask), [i for i, t in enumerate(ids) if t in role_ids and i > 0]  # turn starts

    return _fit_all(encoded(), block_size)


def _fit_all(items: Iterable[tuple[tuple[list[int], list[int]], Sequence[int]]], block_size: int) -> Encoded:
    """fit_sequence over ((ids, mask), cuts) items, counting the cut and the dropped."""
    if block_size < 1:
        raise UserError(f"block_size must be positive, got {block_size}")
    out, truncated, dropped = [], 0, 0
    for (ids, mask), cuts in items:
        truncated += len(ids) > block_size + 1
        fitted = fit_sequence(ids, mask, block_size + 1, cuts)
        if fitted is None:
            dropped += 1
        else:
            out.append(fitted)
    return Encoded(out, truncated, dropped)


def fit_sequence(ids: list[int], mask: list[int], limit: int,
                 cuts: Sequence[int] = ()) -> Optional[tuple[list[int], list[int]]]:
    """At most `limit` tokens, cut at the last of `cuts` that fits and keeps a learned target, else at
    `limit`; then without the tail after the last learned target (it would cost compute and teach
    nothing). None when no learned target is left. Position 0 is never a target (x = ids[:-1])."""
    if len(ids) > limit:
        fitting = [c for c in cuts if c <= limit and any(mask[1:c])]
        cut = max(fitting) if fitting else limit
        ids, mask = ids[:cut], mask[:cut]
    last = max((i for i in range(1, len(mask)) if mask[i]), default=0)
    return (list(ids[: last + 1]), list(mask[: last + 1])) if last else None


def encode_labeled(examples: Sequence[LabeledText], tokenizer: Tokenizer, class_names: Sequence[str],
                   max_length: int, keep: str = "start") -> Encoded:
    """Texts -> (ids, class index) pairs; a text over max_length tokens keeps its start or its end."""
    if keep not in KEEPS:
        raise UserError(f"unknown keep '{keep}'; use {' or '.join(KEEPS)} (which part of a long text to keep)")
    if max_length < 1:
        raise UserError(f"max_length must be positive, got {max_length}")
    index = {name: i for i, name in enumerate(class_names)}
    out, truncated = [], 0
    for i, ex in enumerate(examples):
        if ex.label not in index:
            raise UserError(f"example {i} has label '{ex.label}', not one of the classes {', '.join(class_names)}")
        ids = tokenizer.encode(ex.text)
        if not ids:
            raise UserError(f"example {i} ({ex.text[:30]!r}) encodes to no tokens; remove it")
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length] if keep == "start" else ids[-max_length:]
        out.append((ids, index[ex.label]))
    return Encoded(out, truncated, 0)


# --- the shared sampler -------------------------------------------------------------------------------------
class EpochBatches:
    """Seeded epochs over n items, row-counted and resumable (see the module docstring). Subclasses say
    how items become a batch (`_collate`) and may change an epoch's items (`_epoch_order`)."""

    kind = "items"

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int, world_size: int,
                 device: torch.device | str, fingerprint: str, epoch_size: Optional[int] = None):
        if n_items <= 0:
            raise UserError("no examples to make batches from; check the data and its split")
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.n_items, self.B, self.seed = n_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.fingerprint = fingerprint
        self.epoch_size = epoch_size or n_items  # items per training epoch
        self.rows = 0  # global rows handed out so far (all ranks)
        self._orders: dict[int, list[int]] = {}

    # --- what subclasses provide ----------------------------------------------------------------------
    def _collate(self, items: list[int]) -> Batch:
        raise NotImplementedError

    def _options(self) -> dict:
        """Settings besides the seed that decide the order; a resume must use the same."""
        return {}

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.n_items))
        self._rng(epoch).shuffle(order)
        return order

    def _rng(self, epoch: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + epoch)  # stable across Python versions

    # --- training order ---------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders[epoch] = self._epoch_order(epoch)
        return self._orders[epoch]

    def next_batch(self) -> Batch:
        """This rank's B rows of the next global micro-batch, as (x, y) on the source's device."""
        n = self.epoch_size
        start = self.rows + self.rank * self.B
        items = [self._order(r // n)[r % n] for r in range(start, start + self.B)]
        self.rows += self.B * self.world_size
        for e in [e for e in self._orders if e < self.rows // n]:  # keep only epochs still ahead
            del self._orders[e]
        return self._collate(items)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> float:
        """Epochs done so far (exact: rows handed out / items per epoch)."""
        return self.rows / self.epoch_size

    @property
    def steps_per_epoch(self) -> int:
        """next_batch() calls that cover one epoch (an optimizer step with k accumulation micro-steps
        makes k calls)."""
        return math.ceil(self.epoch_size / (self.B * self.world_size))

    def iter_epoch(self, batch_size: Optional[int] = None, max_batches: Optional[int] = None) -> Iterator[Batch]:
        """One pass over all items in their order, unshuffled and unbalanced, for evaluation: this rank
        takes items rank, rank + world_size, ...; the last batch may be smaller. Leaves the training
        position alone."""
        mine = list(range(self.rank, self.n_items, self.world_size))
        size = batch_size or self.B
        for k, i in enumerate(range(0, len(mine), size)):
            if max_batches is not None and k >= max_batches:
                return
            yield self._collate(mine[i:i + size])

    # --- resuming ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": self.kind, "rows": self.rows, "seed": self.seed, "epoch_size": self.epoch_size,
                "fingerprint": self.fingerprint, "options": self._options(), "batch_size": self.B,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved source stopped (its seed wins over this one's)."""
        try:
            kind, rows, seed = state["kind"], int(state["rows"]), int(state["seed"])
            fingerprint, options = state["fingerprint"], state["options"]
        except (KeyError, TypeError, ValueError):
            raise UserError("fine-tuning batch state is incomplete or corrupt; resume from another "
                            "checkpoint or start a new run") from None
        if kind != self.kind:
            raise UserError(f"the checkpoint's batches are {kind}, not {self.kind}; resume in the same mode")
        if fingerprint != self.fingerprint:
            raise UserError("the training data differs from the checkpoint's (examples, split, tokenizer or "
                            "block size changed); resume with the same data and options, or start a new run")
        if options != self._options():
            raise UserError(f"the checkpoint's batches used {options}, this run {self._options()}; resume "
                            "with the same options")
        self.rows, self.seed = rows, seed
        self._orders.clear()

    def _to_device(self, *tensors: torch.Tensor) -> Batch:
        if self.device.type == "cuda":  # page-locked memory lets the copy overlap with compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
        return tuple(t.to(self.device) for t in tensors)


def _fingerprint(*parts: object) -> str:
    """sha256 over token arrays and small values: equal data gives an equal fingerprint."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return h.hexdigest()


def _flat(sequences: Sequence[Sequence[int]]) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences] or [np.zeros(0, np.int64)])


# --- the three sources ---------------------------------------------------------------------------------------
class PackedTextBatches(EpochBatches):
    """Text mode: window i is stream[i*T : i*T + T + 1], x = w[:-1], y = w[1:] (B, T). Windows overlap by
    one token, so every stream token after the first is a target exactly once per epoch; the last window
    is padded (x with end-of-text, y with -100) rather than dropped."""

    kind = "packed_text"

    def __init__(self, stream: np.ndarray, block_size: int, batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        if block_size < 1:
            raise UserError(f"block_size must be positive, got {block_size}")
        self.stream = np.asarray(stream, dtype=np.int64)
        if len(self.stream) < 2:
            raise UserError("the text split holds no tokens to learn from; add documents")
        self.T, self.pad_id = block_size, pad_id
        n_windows = math.ceil((len(self.stream) - 1) / block_size)
        super().__init__(n_windows, batch_size, seed, rank, world_size, device,
                         _fingerprint(self.stream, block_size))

    def _collate(self, items: list[int]) -> Batch:
        T = self.T
        buf = np.full((len(items), T + 1), self.pad_id, dtype=np.int64)  # (B, T+1)
        lengths = []
        for row, i in enumerate(items):
            w = self.stream[i * T : i * T + T + 1]
            buf[row, : len(w)] = w
            lengths.append(len(w))
        x = torch.from_numpy(buf[:, :-1].copy())  # (B, T)
        y = torch.from_numpy(buf[:, 1:].copy())  # (B, T)
        for row, n in enumerate(lengths):
            y[row, n - 1 :] = IGNORE  # padding past the stream's end
        return self._to_device(x, y)

    @property
    def n_tokens(self) -> int:
        """Targets per epoch: every stream token but the first."""
        return len(self.stream) - 1


class SFTBatches(EpochBatches):
    """Instruct and chat: one (ids, mask) sequence per row, padded to the batch's longest. x = ids[:-1]
    (padding: pad_id, usually end-of-text), y = ids[1:] with -100 where the target's mask is 0 and at
    padding (B, L-1), L <= block_size + 1 when the sequences come from encode_*."""

    kind = "sft"

    def __init__(self, sequences: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.sequences = list(sequences)
        for i, (ids, mask) in enumerate(self.sequences):
            if len(ids) != len(mask) or len(ids) < 2:
                raise UserError(f"sequence {i} must have ids and mask of equal length >= 2")
        self.pad_id = pad_id
        lengths = [len(ids) for ids, _ in self.sequences]
        super().__init__(len(self.sequences), batch_size, seed, rank, world_size, device,
                         _fingerprint(np.asarray(lengths), _flat([s[0] for s in self.sequences]),
                                      _flat([s[1] for s in self.sequences])))

    def _collate(self, items: list[int]) -> Batch:
        L = max(len(self.sequences[i][0]) for i in items)
        ids = np.full((len(items), L), self.pad_id, dtype=np.int64)  # (B, L)
        mask = np.zeros((len(items), L), dtype=bool)  # (B, L)
        for row, i in enumerate(items):
            seq_ids, seq_mask = self.sequences[i]
            ids[row, : len(seq_ids)] = seq_ids
            mask[row, : len(seq_mask)] = seq_mask
        x = torch.from_numpy(ids[:, :-1].copy())  # (B, L-1)
        y = torch.from_numpy(np.where(mask[:, 1:], ids[:, 1:], IGNORE))  # (B, L-1)
        return self._to_device(x, y)


class ClassifyBatches(EpochBatches):
    """Classify: x (B, L) token ids right-padded with -1 (L = the batch's longest), y (B,) class indices.

    balance (training order only; iter_epoch always covers the split as it is):
      none        each epoch is a permutation of the examples;
      downsample  each epoch takes, per class, a fresh random subset the size of the smallest class
                  (the LLMs-from-scratch book downsamples once; a fresh subset per epoch uses all data);
      oversample  each epoch takes every class up to the largest class's size: whole shuffled copies of
                  the class, then a random subset for the rest."""

    kind = "classify"

    def __init__(self, sequences: Sequence[tuple[list[int], int]], num_classes: int, batch_size: int,
                 balance: str = "none", seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        if balance not in BALANCES:
            raise UserError(f"unknown balance '{balance}'; use {', '.join(BALANCES)}")
        self.sequences, self.balance, self.num_classes = list(sequences), balance, num_classes
        self.by_class: list[list[int]] = [[] for _ in range(num_classes)]
        for i, (ids, label) in enumerate(self.sequences):
            if not 0 <= label < num_classes or not ids:
                raise UserError(f"example {i} has class {label} of {num_classes} or no tokens")
            self.by_class[label].append(i)
        counts = [len(c) for c in self.by_class if c]
        per_class = {"none": None, "downsample": min(counts, default=0), "oversample": max(counts, default=0)}
        self.per_class = per_class[balance]
        labels = np.asarray([label for _, label in self.sequences])
        super().__init__(len(self.sequences), batch_size, seed, rank, world_size, device,
                         _fingerprint(labels, np.asarray([len(s[0]) for s in self.sequences]),
                                      _flat([s[0] for s in self.sequences]), num_classes),
                         epoch_size=self.per_class * len(counts) if self.per_class else None)

    @property
    def class_counts(self) -> list[int]:
        return [len(c) for c in self.by_class]

    def _options(self) -> dict:
        return {"balance": self.balance}

    def _epoch_order(self, epoch: int) -> list[int]:
        if self.balance == "none":
            return super()._epoch_order(epoch)
        rng, k, order = self._rng(epoch), self.per_class, []
        for members in (c for c in self.by_class if c):
            copies, rest = divmod(k, len(members))
            for _ in range(copies):  # oversample only: whole shuffled copies first
                copy = list(members)
                rng.shuffle(copy)
                order += copy
            order += rng.sample(members, rest)
        rng.shuffle(order)
        return order

    def _collate(self, items: list[int]) -> Batch:
        L = max(len(self.sequences[i][0]) for i in items)
        x = np.full((len(items), L), CLASSIFY_PAD, dtype=np.int64)  # (B, L)
        for row, i in enumerate(items):
            ids = self.sequences[i][0]
            x[row, : len(ids)] = ids
        y = torch.tensor([self.sequences[i][1] for i in items], dtype=torch.int64)  # (B,)
        return self._to_device(torch.from_numpy(x), y)
