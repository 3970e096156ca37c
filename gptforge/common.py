"""Device, dtype, rank and seeding are decided here, once; plus the project's error type.

This is the only module that reads the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, TypeVar

if TYPE_CHECKING:  # annotations only: importing torch here would slow every CLI start
    import torch

T = TypeVar("T")


def iter_jsonl(lines: Iterable[str], where: object, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSON Lines file; a line that is not JSON is a
    UserError naming the file and line (hint: what the file should hold)."""
    import json

    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} line {number}: not valid JSON ({e.msg}){hint}") from None


class UserError(Exception):
    """A problem with the user's input: printed as one line by the CLI, with a non-zero exit."""


def read_user_text(path: "str | Path", what: str = "") -> str:
    """A UTF-8 text file the user named (a prompt, a list of texts), or a UserError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what + ' ' if what else ''}{path}: {e}") from None


def cache_dir() -> Path:
    """Where downloaded corpora and files are cached (GPTFORGE_CACHE overrides)."""
    root = os.environ.get("GPTFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptforge"
    )
    return Path(root)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file (and a full disk
    is a UserError that leaves the old file as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_disk_full(e):
            raise UserError(_no_space(path, len(data))) from None
        raise


def default_file_mode() -> int:
    """0o666 less the process umask: what a plain open(path, 'w') would give."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_dir_atomically(target: Path, fill: Callable[[Path], T], size_hint: int = 0) -> T:
    """Let `fill` populate a temp dir beside `target`, then swap it in with renames. A kill at any moment
    leaves either the old or the new directory complete (an interrupted swap is repaired by
    `recover_interrupted_swap`, which also removes the temp dirs of killed writers); a failing `fill`
    leaves the old one untouched, and a full disk is a UserError saying how much space the write needs
    (about size_hint bytes, or what the old directory holds). Returns fill's result."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(target)
    recover_interrupted_swap(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lock = _hold_lock(tmp)  # tells writers in other processes that this temp dir is alive
    try:
        try:
            result = fill(tmp)
            mode = default_file_mode()
            for f in tmp.rglob("*"):  # data must be on disk before the rename makes it visible
                if f.is_file():
                    os.chmod(f, mode)
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        except BaseException as e:
            written = _tree_size(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_disk_full(e):
                raise UserError(_no_space(target, max(size_hint, written, _tree_size(target)))) from None
            raise
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(lock)
    return result


def check_replaceable(target: Path) -> None:
    """Refuse to write a directory through a symbolic link: the swap would replace the link, or fail on it,
    and the folder it points to is not ours to change."""
    target = Path(target)
    if target.is_symlink():
        raise UserError(f"{target} is a symbolic link (to {os.readlink(target)}); gptforge replaces this folder "
                        "as a whole and will not write through a link: remove the link (what it points to is "
                        "left alone) or write somewhere else")


def recover_interrupted_swap(target: Path) -> None:
    """Finish a `write_dir_atomically` swap that was killed between its two renames, and remove the temp
    dirs of writers that were killed while filling them (each a partial copy of the directory)."""
    target = Path(target)
    old = target.parent / f".{target.name}.old"
    if old.is_symlink() or (old.exists() and not old.is_dir()):
        with contextlib.suppress(OSError):  # ours is always a real folder: a link there goes, unfollowed
            old.unlink()
    elif not target.exists() and not target.is_symlink() and old.is_dir():
        os.rename(old, target)
    remove_stale_temp_dirs(target)


def remove_stale_temp_dirs(target: Path) -> None:
    """Remove `.NAME.tmp-PID` dirs beside `target` whose writer is gone: its pid is not a live process
    here and nobody holds the lock a writer keeps on its temp dir (a writer on another machine sharing the
    folder, or a live process that reused the pid, keeps its dir)."""
    import glob

    for tmp in Path(target).parent.glob(f".{glob.escape(Path(target).name)}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if tmp.is_symlink() or not tmp.is_dir() or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            lock = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _try_lock(lock):
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(lock)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError):  # no such process, or a number no pid can be
        return False
    return True


def _hold_lock(folder: Path) -> int:
    """An open descriptor of `folder` holding an exclusive advisory lock, released when it is closed or the
    process dies."""
    fd = os.open(folder, os.O_RDONLY)
    _try_lock(fd)
    return fd


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): the pid check alone decides
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _tree_size(folder: Path) -> int:
    if Path(folder).is_symlink() or not Path(folder).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and not f.is_symlink())


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _no_space(target: Path, needed: int) -> str:
    free = shutil.disk_usage(target.parent).free
    kept = f"; the previous {target.name} is unchanged" if target.exists() else ""
    return (f"no space left on the device to write {target}: it needs about {human_count(needed)}B, "
            f"{human_count(free)}B are free; free some space or write to another disk{kept}")


@dataclass
class Runtime:
    """Where and how this process computes. Built by `setup_runtime`, passed to everything else."""

    device: "torch.device"
    dtype: "torch.dtype"  # autocast dtype; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    weights: Optional[str] = None  # inference on a CPU: int8, bf16 or f32 packed weights (gptforge.quantize)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device_type(self) -> str:
        return self.device.type

    def autocast(self):
        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def print(self, *args, **kwargs) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


def pick_device(requested: str = "auto") -> "torch.device":
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device '{requested}'; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{requested}' requested but CUDA is not available here; use device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{requested}' requested but MPS is not available here; use device cpu or auto")
    return device


def pick_dtype(requested: str, device: "torch.device") -> "torch.dtype":
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested not in names:
        raise UserError(f"unknown dtype '{requested}'; use float32, bfloat16, float16 or auto")
    dtype = names[requested]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("float16 autocast is not supported on CPU; use bfloat16 or float32")
    return dtype


def setup_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Training's runtime: device, autocast dtype and distributed rank; initialises the process group under
    torchrun. Inference commands use `inference_runtime`."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if world_size > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    _allow_tf32(dev)
    if rank != 0:
        _quiet_rank()
    return Runtime(device=dev, dtype=pick_dtype(dtype, dev), rank=rank, local_rank=local_rank,
                   world_size=world_size)


QUANTIZE = ("int8", "bf16", "f32")  # the weights a CPU model can compute with (gptforge.quantize)
QUANTIZE_CHOICES = ("auto", "none", *QUANTIZE)  # --quantize's values


def inference_runtime(device: str = "auto", dtype: str = "auto", quantize: Optional[str] = "auto") -> Runtime:
    """The runtime of every inference command (generate, chat, classify, eval, serve) and the library
    functions behind them: one process on one device, never a process group (even under torchrun).
    quantize: 'auto' (float32 on a CPU: the checkpoint's weights packed for our kernels, the same results up
    to float32 rounding, ~2x faster one-token steps; elsewhere torch's own layers), 'none' or None (torch's
    own layers: the reference), or one of QUANTIZE (CPU only)."""
    quantize = "none" if quantize is None else quantize
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize takes {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    dev = pick_device(device)
    if quantize in QUANTIZE and dev.type != "cpu":
        raise UserError(f"--quantize is for CPU inference and the model would run on {dev}; leave --quantize out "
                        "(on a GPU, --dtype bfloat16 halves the work) or add --device cpu")
    _allow_tf32(dev)
    dt = pick_dtype(dtype, dev)
    if quantize == "auto":
        import torch

        weights = "f32" if dev.type == "cpu" and dt == torch.float32 else None
    else:
        weights = None if quantize == "none" else quantize
    return Runtime(device=dev, dtype=dt, weights=weights)


def as_runtime(where: "Runtime | torch.device | str | None") -> "Runtime | None":
    """The Python API's `runtime` arguments: a Runtime as it is; a bare device (the older, shorter form) as
    that device without autocast; None stays None (the callee's default, usually the model's device)."""
    import torch

    if where is None or isinstance(where, Runtime):
        return where
    return Runtime(device=torch.device(where), dtype=torch.float32)


def _allow_tf32(device: "torch.device") -> None:
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _quiet_rank() -> None:
    """Every process of a multi-process run but rank 0 prints nothing (the run's lines and library warnings
    once, not once per process); errors still reach standard error."""
    import sys
    import warnings

    sys.stdout = open(os.devnull, "w")
    warnings.simplefilter("ignore")


def teardown_runtime(runtime: Runtime) -> None:
    """Close the process group: torchrun's, or the one-process group FSDP made (train/parallelize.py)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed % (2**64))  # torch takes 64 bits; a seed near 2**64 plus a rank would not fit


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is running out of (GPU or host) memory: torch's OutOfMemoryError, or a RuntimeError
    whose message says so (CPU allocations, older CUDA paths)."""
    import torch  # lazily, as everywhere here; whoever caught a torch error has it loaded already

    message = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in message \
        or "out of memory" in message


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}T"

