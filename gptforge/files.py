"""Reading files that come from outside: bounded, confined to their folder, checked before use.

A checkpoint, a prepared data folder or a downloaded model folder is input like an HTTP body: a JSON
file in it may be a link to /dev/zero, a directory, a FIFO, a symlink loop, gigabytes long, not UTF-8 or
nested 100k levels deep, and a file it names (a shard, an index entry) may point outside the folder.
Each of those is one UserError line here, before anything is allocated from the file's contents.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Optional

from gptforge.common import UserError

MAX_JSON_BYTES = 16 << 20  # configs, meta, trainer state, manifests, indexes: far larger than any we write
MAX_TOKENIZER_BYTES = 128 << 20  # a tokenizers-library BPE of a 256k vocabulary is ~30 MB
SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"}


def confined(path: Path, root: Path) -> Path:
    """`path` with links resolved, refused unless it lies inside `root` (whose own links are followed)."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if real == real_root or os.path.commonpath([real_root, real]) != real_root:
        raise UserError(f"{path} points outside {root} (to {real}); files of a checkpoint or data folder must "
                        "lie inside it: replace the link by the file itself")
    return Path(real)


def regular_file(path: Path, root: Optional[Path] = None) -> Path:
    """`path` resolved and confined to `root` (default: its folder), refused unless it is a regular file
    (not a directory, device, FIFO or socket). FileNotFoundError when it does not exist."""
    path = Path(path)
    real = confined(path, path.parent if root is None else root)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise
    except OSError as e:  # a symlink loop (ELOOP), a file used as a folder (ENOTDIR), no permission
        raise UserError(f"{path} cannot be read ({e.strerror}); restore it from a good copy") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{path} is not a regular file ({_kind(mode)}); restore it from a good copy")
    return real


def read_bytes(path: Path, root: Optional[Path] = None, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """A regular file's bytes (see `regular_file`), refused when larger than max_bytes."""
    path = Path(path)
    real = regular_file(path, root)
    try:  # O_NONBLOCK: should the file have been swapped for a FIFO since the check, open does not wait
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); restore it from a good copy") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path} is not a regular file; restore it from a good copy")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UserError(f"{path} is larger than {max_bytes >> 20} MiB, far more than such a file holds; "
                        "it is corrupt or not what it should be")
    return data


def read_json(path: Path, root: Optional[Path] = None, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file read by `read_bytes`: UTF-8, at most max_bytes, nesting Python can parse.
    FileNotFoundError when it is missing (callers say what that means); UserError for anything else."""
    data = read_bytes(path, root, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); it is corrupt") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); it is corrupt") from None
    except RecursionError:
        raise UserError(f"{path} nests too deeply to be what it should be; it is corrupt") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{path} holds an unreadable value ({e}); it is corrupt") from None


def contained_name(name: object, folder: Path, what: str) -> Path:
    """A file named inside a folder's own JSON (a shard of a manifest or an index): a plain relative path
    that stays inside `folder`."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in re.split(r"[\\/]", name):
        raise UserError(f"{what} names {name!r}, which is not a file inside {folder}; the folder is corrupt")
    return Path(folder) / name


def safetensors_header(path: Path, root: Optional[Path] = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, read from its header alone (the library checks
    the header's length, offsets and sizes against the file) without loading any tensor."""
    from safetensors import SafetensorError, safe_open

    real = regular_file(path, root)
    try:
        with safe_open(str(real), framework="numpy") as f:
            return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is corrupt ({str(e).splitlines()[0]}); use another copy") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"
