"""Our C kernels, compiled on first use with the system's C compiler and loaded through ctypes: the
matrix-vector products of decoding (matvec.c) and a whole block's one-token decoding step (block.c);
`gptforge.quantize` calls them.

Nothing here is required: without a C compiler (or with GPTFORGE_NATIVE=0, or on a failed build) `load()`
returns None, `status()` says why in one line, and the callers use torch's own operations instead, with
the same arithmetic. The library is built once per source, compiler and CPU into the gptforge cache
(`gptforge.common.cache_dir()/native`), written atomically, so concurrent first uses do not collide.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

from gptforge.common import cache_dir

FOLDER = Path(__file__).parent
SOURCES = [FOLDER / "matvec.c", FOLDER / "block.c"]
HEADERS = [FOLDER / "matvec.h"]
ABI = 2  # matvec.h's GF_ABI: the signatures below
KINDS = {"f32": 0, "bf16": 1, "int8": 2}
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-std=c11"]
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_status = "not loaded yet"
_tried = False


def load() -> Optional[ctypes.CDLL]:
    """The kernels' library, built if needed; None when they cannot be had here (see `status()`)."""
    global _lib, _status, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _load()
                _status = f"native kernels ({features_of(_lib)})"
            except _Unavailable as e:
                _status = f"torch fallback: {e}"
        return _lib


def status() -> str:
    """One line: which kernels run products here, or why the native ones do not."""
    load()
    return _status


def set_threads(n: int) -> None:
    """Threads the kernels use, the caller's included (default: torch's intra-op thread count)."""
    lib = load()
    if lib is not None:
        lib.gf_set_threads(max(1, int(n)))


def features_of(lib: ctypes.CDLL) -> str:
    bits = lib.gf_features()
    return ", ".join([("AVX-512" if bits & 1 else "portable C") + " float32/bfloat16",
                      "AVX-512 VNNI int8" if bits & 2 else "portable C int8"])


class _Unavailable(Exception):
    pass


def _load() -> ctypes.CDLL:
    if os.environ.get("GPTFORGE_NATIVE", "1") == "0":
        raise _Unavailable("GPTFORGE_NATIVE=0")
    if sys.platform == "win32":
        raise _Unavailable("not built on Windows")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise _Unavailable("no C compiler found (install gcc or clang, or set CC)")
    path = _built(compiler)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise _Unavailable(f"cannot load {path}: {e}") from None
    if lib.gf_abi() != ABI:
        raise _Unavailable(f"{path} has ABI {lib.gf_abi()}, expected {ABI}")
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.gf_matvec.argtypes = [i, p, p, p, p, p, i, i, i]
    lib.gf_matvec.restype = i
    lib.gf_set_threads.argtypes = [i]
    lib.gf_block_step.argtypes = [p, p, i, i, i, p, p, ctypes.c_long, ctypes.c_long, ctypes.c_long, i, p,
                                  ctypes.c_long]
    lib.gf_block_step.restype = i
    import torch

    lib.gf_set_threads(torch.get_num_threads())
    return lib


def _built(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU, compiling it if it is not in the cache."""
    source = b"\0".join(f.read_bytes() for f in SOURCES + HEADERS)
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise _Unavailable(f"cannot run the C compiler {compiler}: {e}") from None
    # -march=native builds for this CPU: the CPU's flags are part of the key, so a cache folder shared
    # between machines never hands one machine another's build.
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    folder = cache_dir() / "native"
    path = folder / f"matvec-{key}.so"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".matvec-", suffix=".so")
        os.close(fd)
    except OSError as e:
        raise _Unavailable(f"cannot write to {folder}: {e}") from None
    names = " and ".join(f.name for f in SOURCES)
    try:
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise _Unavailable(f"{Path(compiler).name} failed on {names}: {last}")
        os.replace(tmp, path)
    except subprocess.TimeoutExpired:
        raise _Unavailable(f"compiling {names} took over {BUILD_TIMEOUT_S} s") from None
    except OSError as e:
        raise _Unavailable(f"cannot build {names}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n" + "\n".join(sorted(set(lines)))


class Linear(ctypes.Structure):
    """block.c's gf_linear: one packed weight product."""
    _fields_ = [("kind", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("w", ctypes.c_void_p),
                ("sw", ctypes.c_void_p), ("b", ctypes.c_void_p)]


class Block(ctypes.Structure):
    """block.c's gf_block: a transformer block's LayerNorms and packed products."""
    _fields_ = [("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p),
                ("ln2_b", ctypes.c_void_p), ("eps", ctypes.c_float), ("qkv", Linear), ("proj", Linear),
                ("fc", Linear), ("out", Linear)]
