"""Tokenize a source into binary shards plus a manifest: the folder `train` memory-maps.

Layout of a prepared folder:
    tokenizer/            the tokenizer that made the shards (tok.save)
    train_000000.bin ...  raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
    val_000000.bin ...
    manifest.json         written last: its presence means the folder is complete

Documents are separated by the end-of-text token (each document is followed by one). Shard contents do
not depend on the number of processes: work goes out in order-tagged batches and comes back in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from gptforge.checks import checked
from gptforge.common import UserError, atomic_write_text, cache_dir, human_count, write_dir_atomically
from gptforge.config import DataConfig
from gptforge.files import contained_name, read_json, regular_file
from gptforge.data.sources import Piece, iter_documents, source_total_bytes
from gptforge.options import PrepareOptions
from gptforge.tokenizer import build_tokenizer, load_tokenizer, tokenizer_needs_corpus

MANIFEST = "manifest.json"
FORMAT = "gptforge-shards"
FORMAT_VERSION = 1
BATCH_BYTES = 1 << 19  # text per task: big enough to amortise the hop, small enough that a ~1 MB text
# chunk is a task of its own and the workers share the load evenly
BATCH_DOCS = 4096
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


# --- encoding (shared by the in-process path and the pool workers) --------------------------------
def _encode(tok, texts: list[str], ends: list[bool], vals: list[bool], dtype: np.dtype):
    """Texts -> (train ids, val ids, train docs ended, val docs ended); an EOT follows each document end.
    Returns arrays, never Python lists of ints: they pickle as one buffer and write with tofile."""
    enc = getattr(tok, "enc", None)
    if tok.kind == "byte":  # byte ids are the UTF-8 bytes themselves: skip the list of ints entirely
        arrays = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    elif tok.kind == "gpt2" and hasattr(enc, "encode_to_numpy"):
        # tiktoken >= 0.8 writes ids straight into a numpy buffer with the GIL released: no Python int per
        # token, which is the part of encoding that does not scale over threads. With no allowed specials
        # and disallowed_special=() it is exactly encode_ordinary ("<|endoftext|>" in text stays text).
        arrays = [enc.encode_to_numpy(t, disallowed_special=()) for t in texts]
    else:
        arrays = [np.fromiter(ids, dtype=dtype, count=len(ids)) for ids in tok.encode_batch(texts)]
    eot = np.array([tok.eot_id], dtype=dtype)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for arr, end, val in zip(arrays, ends, vals):
        parts[val].append(arr)
        if end:
            parts[val].append(eot)
    out = [np.concatenate(parts[v]).astype(dtype, copy=False) if parts[v] else np.empty(0, dtype)
           for v in (False, True)]
    return out[0], out[1], sum(e for e, v in zip(ends, vals) if not v), sum(e for e, v in zip(ends, vals) if v)


_worker_state: dict = {}


def _worker_init(tok_dir: str, dtype: str) -> None:
    # Runs once per worker: the tokenizer is loaded from its saved folder, never pickled per task.
    _worker_state["tok"] = load_tokenizer(Path(tok_dir))
    _worker_state["dtype"] = np.dtype(dtype)


def _worker_encode(job):
    return _encode(_worker_state["tok"], *job, _worker_state["dtype"])


def _batches(pieces: Iterator[Piece]) -> Iterator[tuple[tuple[list, list, list], int]]:
    """Group pieces into ((texts, ends, vals), nbytes) jobs of about BATCH_BYTES."""
    texts, ends, vals, nbytes = [], [], [], 0
    for p in pieces:
        texts.append(p.text), ends.append(p.end), vals.append(p.val)
        nbytes += p.nbytes
        if nbytes >= BATCH_BYTES or len(texts) >= BATCH_DOCS:
            yield (texts, ends, vals), nbytes
            texts, ends, vals, nbytes = [], [], [], 0
    if texts:
        yield (texts, ends, vals), nbytes


# Which tokenizers run in threads of this process rather than in worker processes. tiktoken (gpt2) and
# Hugging Face tokenizers (bpe) encode in Rust with the GIL released, so threads use every core with no
# start-up cost and no pickling; a spawned process must first re-import and rebuild its tokenizer (~0.5
# CPU-seconds for gpt2: a third of the whole job for 20 MB on 2 cores). byte is a memcpy, where a process
# hop only adds pickling. Encoders that run Python per character (char) get worker processes.
THREAD_KINDS = ("gpt2", "bpe", "byte")


def _thread_encode(tok, dtype):
    return lambda job: _encode(tok, *job, dtype)


def _ordered_results(jobs, num_proc: int, tok, tok_dir: Path, dtype: np.dtype):
    """Yield (result, nbytes) in job order, so shards do not depend on num_proc. A bounded window of
    submitted batches (2 per worker) gives back-pressure; Pool.imap would not: its feeder thread drains
    the whole input into the task queue as fast as it reads, holding a big corpus in memory.
    ProcessPoolExecutor rather than multiprocessing.Pool because a worker that cannot start (an unguarded
    script under spawn) raises BrokenProcessPool there, where Pool respawns it forever and hangs."""
    if num_proc == 1:
        for job, nbytes in jobs:
            yield _encode(tok, *job, dtype), nbytes
        return
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if tok.kind in THREAD_KINDS:
        pool, fn = ThreadPoolExecutor(num_proc), _thread_encode(tok, dtype)
    else:
        # spawn, not fork: forking a parent whose tokenizer/tqdm threads may hold locks can deadlock the
        # child. Each worker loads the tokenizer once from its saved folder (_worker_init).
        pool = ProcessPoolExecutor(num_proc, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                   initargs=(str(tok_dir), dtype.str))
        fn = _worker_encode
    try:
        window: deque = deque()
        for job, nbytes in jobs:
            window.append((pool.submit(fn, job), nbytes))
            if len(window) >= 2 * num_proc:
                fut, n = window.popleft()
                yield fut.result(), n
        while window:
            fut, n = window.popleft()
            yield fut.result(), n
    except BrokenProcessPool:
        raise UserError(
            "tokenizer worker processes failed to start; when calling gptforge from a script, put the call "
            "under `if __name__ == \"__main__\":` (needed by the spawn start method), or set data.num_proc=1"
        ) from None
    finally:  # on an error or Ctrl-C, drop queued batches instead of encoding them first
        pool.shutdown(wait=True, cancel_futures=True)


# --- shard writing ----------------------------------------------------------------------------------
class _ShardWriter:
    """Streams one split into shards of at most `shard_tokens`, hashing as it writes (no shard buffer)."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._f = None
        self._hash = None
        self._count = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._f is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self._f, self._hash, self._count = open(self.out_dir / name, "wb"), hashlib.sha256(), 0
                self.shards.append({"file": name, "tokens": 0, "sha256": None})
            take = ids[: self.shard_tokens - self._count]
            take.tofile(self._f)
            self._hash.update(take.data)
            self._count += len(take)
            ids = ids[len(take):]
            if self._count == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest())
            self._f = None

    def finish(self) -> dict:
        self._close()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
                "documents": self.documents}


# --- prepare ----------------------------------------------------------------------------------------
def prepare_command(options: PrepareOptions) -> None:
    """`gptforge prepare`: prepare, then one line on what was written."""
    manifest = prepare(options.data, overwrite=options.overwrite)
    splits = ", ".join(f"{name} {s['tokens']:,} tokens" for name, s in manifest["splits"].items())
    print(f"prepared {options.data.dir}: {splits}; tokenizer {manifest['tokenizer']['kind']} "
          f"(vocab {manifest['tokenizer']['vocab_size']})")


def prepare(cfg: DataConfig, out_dir: Optional[Path] = None, progress: bool = True,
            overwrite: bool = False) -> dict:
    """Tokenize `cfg.source` into shards in `out_dir` (default cfg.dir); returns the manifest."""
    if out_dir is None:
        if not cfg.dir:
            raise UserError("no output folder for prepared data; set --data.dir")
        out_dir = cfg.dir
    out_dir = Path(out_dir).expanduser()
    cfg.validate()
    _check_target(out_dir, overwrite)
    num_proc = cfg.num_proc or os.cpu_count() or 1


    def fill(tmp: Path) -> dict:
        tok = _make_tokenizer(cfg)
        tok.save(tmp / "tokenizer")
        dtype = token_dtype(tok.vocab_size)
        writers = {val: _ShardWriter(tmp, name, dtype, cfg.shard_tokens) for val, name in ((False, "train"), (True, "val"))}
        _tokenize_into(cfg, tok, tmp / "tokenizer", dtype, num_proc, writers, progress)
        splits = {w.split: w.finish() for w in writers.values()}
        if splits["train"]["tokens"] == 0:
            raise UserError(f"{cfg.source} gave no training text (all of it went to validation); "
                            "lower --data.val_fraction or add data")
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                          "describe": tok.describe(), "dir": "tokenizer"},
            "dtype": dtype.name, "source": cfg.source, "data_config": dataclasses.asdict(cfg),
            "splits": splits, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))  # last: marks completeness
        return manifest

    return write_dir_atomically(out_dir, fill)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not (out_dir / MANIFEST).is_file():
        raise UserError(f"{out_dir} exists and is not a prepared data folder; choose another --data.dir")
    if not overwrite:
        raise UserError(f"{out_dir} already holds prepared data; use --overwrite to replace it or pick "
                        "another --data.dir")


def _make_tokenizer(cfg: DataConfig):
    if not tokenizer_needs_corpus(cfg.tokenizer):
        return build_tokenizer(cfg.tokenizer, vocab_size=cfg.bpe_vocab_size)
    # A first streaming pass. char learns from every document (as nanoGPT's shakespeare_char), because a
    # char tokenizer cannot encode characters it has not seen; bpe learns from train only (byte-level BPE
    # encodes anything, so validation text stays unseen).
    use_val = cfg.tokenizer == "char"
    texts = (p.text for p in iter_documents(cfg) if use_val or not p.val)
    return build_tokenizer(cfg.tokenizer, texts=texts, vocab_size=cfg.bpe_vocab_size)


def _tokenize_into(cfg, tok, tok_dir, dtype, num_proc, writers, progress) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=source_total_bytes(cfg), unit="B", unit_scale=True, desc="tokenizing",
               disable=not progress, dynamic_ncols=True)
    start, tokens, last_post = time.perf_counter(), 0, 0.0
    try:
        for (train_ids, val_ids, n_train, n_val), nbytes in _ordered_results(
            _batches(iter_documents(cfg)), num_proc, tok, tok_dir, dtype
        ):
            writers[False].write(train_ids)
            writers[True].write(val_ids)
            writers[False].documents += n_train
            writers[True].documents += n_val
            tokens += len(train_ids) + len(val_ids)
            bar.update(nbytes)
            now = time.perf_counter()
            if now - last_post > 0.5:  # tokens/s as a postfix; the bar's own rate is bytes/s
                bar.set_postfix_str(f"{human_count(tokens / max(now - start, 1e-9))} tok/s", refresh=False)
                last_post = now
        bar.set_postfix_str(f"{human_count(tokens / max(time.perf_counter() - start, 1e-9))} tok/s")
    finally:
        bar.close()


# --- reading a prepared folder back -----------------------------------------------------------------
@dataclass
class _Shard:
    file: str
    tokens: int
    sha256: str


@dataclass
class _Split:
    shards: list[_Shard]
    tokens: int
    documents: int


@dataclass
class _TokenizerInfo:
    kind: str
    vocab_size: int
    eot_id: int
    describe: str
    dir: str


MANIFEST_FIELDS = {"format": str, "version": int, "tokenizer": _TokenizerInfo, "dtype": str, "data_config": dict,
                   "splits": dict}
VERIFY_MODES = ("full", "fast", "off")


def load_manifest(data_dir: Path) -> dict:
    """The manifest of a prepared folder, with every field the readers use checked (types, shard files
    inside the folder, sizes that agree); UserError when the folder is missing, incomplete or corrupt."""
    data_dir = Path(data_dir).expanduser()
    path = data_dir / MANIFEST
    hint = f"{data_dir} is not a prepared data folder; run `gptforge prepare --data.dir {data_dir}` first"
    try:
        manifest = read_json(path, root=data_dir)
    except FileNotFoundError:
        raise UserError(hint) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(hint + f" ({MANIFEST} is corrupt)")
    try:
        for key, annotation in MANIFEST_FIELDS.items():
            checked(manifest.get(key), annotation, key)
        for split in SPLITS:
            checked(manifest["splits"].get(split), _Split, f"splits.{split}")
    except UserError as e:
        raise UserError(f"{path} is corrupt ({e}); prepare {data_dir} again") from None
    if manifest["version"] > FORMAT_VERSION:
        raise UserError(f"{data_dir} was prepared by a newer gptforge (format {manifest['version']}); "
                        "upgrade gptforge or prepare again")
    _check_manifest_values(manifest, data_dir)
    return manifest


def _check_manifest_values(manifest: dict, data_dir: Path) -> None:
    def corrupt(what: str) -> UserError:
        return UserError(f"{data_dir / MANIFEST} is corrupt ({what}); prepare {data_dir} again")

    if manifest["dtype"] not in ("uint16", "uint32"):
        raise corrupt(f"token dtype {manifest['dtype']!r}, not uint16 or uint32")
    vocab = manifest["tokenizer"]["vocab_size"]
    if not 0 < vocab <= np.iinfo(manifest["dtype"]).max + 1:
        raise corrupt(f"vocab_size {vocab} does not fit {manifest['dtype']} shards")
    contained_name(manifest["tokenizer"]["dir"], data_dir, f"{MANIFEST}'s tokenizer")
    for split in SPLITS:
        info = manifest["splits"][split]
        for shard in info["shards"]:
            contained_name(shard["file"], data_dir, f"{MANIFEST}'s {split} split")
            if shard["tokens"] < 0:
                raise corrupt(f"shard {shard['file']} has {shard['tokens']} tokens")
        if info["tokens"] != sum(s["tokens"] for s in info["shards"]):
            raise corrupt(f"the {split} split's token count is not the sum of its shards'")


def verify_shards(data_dir: Path, mode: str = "fast") -> dict:
    """The manifest, after checking every shard: a regular file inside the folder with the size the manifest
    says, and (mode full, or fast for shards not seen since they last passed) its sha256 and that every id
    is inside the vocabulary. fast remembers passed shards by size and modification time."""
    if mode not in VERIFY_MODES:
        raise UserError(f"unknown data.verify '{mode}'; use full, fast or off")
    data_dir = Path(data_dir).expanduser()
    manifest = load_manifest(data_dir)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    vocab = manifest["tokenizer"]["vocab_size"]
    passed = _PassedShards(data_dir) if mode == "fast" else None
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = data_dir / shard["file"]
            size = shard_size(path, data_dir)
            if size != shard["tokens"] * dtype.itemsize:
                raise UserError(f"shard {path} has {size} bytes, expected {shard['tokens'] * dtype.itemsize}; "
                                f"prepare {data_dir} again")
            if mode == "off":
                continue
            stamp = [size, path.stat().st_mtime_ns, shard["sha256"], vocab]
            if passed is not None and passed.get(shard["file"]) == stamp:
                continue
            _check_shard(path, shard["sha256"], dtype, vocab, data_dir)
            if passed is not None:
                passed.add(shard["file"], stamp)
    if passed is not None:
        passed.save()
    return manifest


def shard_size(path: Path, data_dir: Path) -> int:
    """Bytes of a shard, which must be a regular file inside the data folder."""
    try:
        return regular_file(path, root=data_dir).stat().st_size
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing; prepare {data_dir} again") from None


def _check_shard(path: Path, sha256: str, dtype: np.dtype, vocab: int, data_dir: Path) -> None:
    h, offset = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):  # a multiple of every itemsize
            h.update(block)
            ids = np.frombuffer(block, dtype=dtype)
            if ids.size and ids.max() >= vocab:
                at = offset + int(np.argmax(ids >= vocab))
                raise UserError(f"shard {path} holds token id {int(ids.max())} at token offset {at}, outside the "
                                f"vocabulary of {vocab}; the shard is corrupt: prepare {data_dir} again")
            offset += ids.size
    if h.hexdigest() != sha256:
        raise UserError(f"shard {path} does not match its sha256 in the manifest (changed or corrupt since it "
                        f"was prepared); prepare {data_dir} again")


class _PassedShards:
    """Shards of one data folder that passed verification, with the size, mtime, sha256 and vocabulary they
    had then; kept in the user's cache (a data folder may be read-only or shared)."""

    def __init__(self, data_dir: Path):
        key = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:24]
        self.path = cache_dir() / "verified-shards" / f"{key}.json"
        try:
            entries = read_json(self.path)
        except (FileNotFoundError, UserError):
            entries = {}
        self.entries = entries if isinstance(entries, dict) else {}

    def get(self, file: str) -> object:
        return self.entries.get(file)

    def add(self, file: str, stamp: list) -> None:
        self.entries[file] = stamp

    def save(self) -> None:
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs a re-check
            atomic_write_text(self.path, json.dumps(self.entries))
