"""`gptforge runs [DIR]`: the runs under a folder, from what their directories already hold (config.yaml,
metrics.jsonl, checkpoints/*/meta.json and trainer state), each read through the validating readers. A run
that cannot be read is listed with a short reason, never a traceback."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gptforge.checkpoint import CHECKPOINTS, FINETUNE_META, load_trainer_state, read_meta, run_checkpoint
from gptforge.checks import checked
from gptforge.common import UserError, human_count
from gptforge.train.history import effective_config
from gptforge.train.metrics import MetricsLog

RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINTS)  # any of them marks a folder as a run


@dataclass
class RunSummary:
    name: str
    kind: str = "?"
    step: Optional[int] = None
    max_steps: Optional[int] = None
    best_val_loss: Optional[float] = None
    tokens: Optional[int] = None
    size_bytes: int = 0
    updated: float = 0.0
    problem: str = ""


def find_runs(root: Path) -> list[Path]:
    """Run directories: `root` itself if it is one, else its subfolders that are (one level down)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; give the folder that holds your runs (default: runs)")
    if _is_run(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _is_run(p))


def _is_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def summarize_run(run_dir: Path) -> RunSummary:
    """What the run directory says about itself; the first thing that cannot be read becomes `problem`."""
    summary = RunSummary(name=run_dir.name, size_bytes=_tree_size(run_dir), updated=_last_update(run_dir))
    try:
        config = effective_config(run_dir)  # config.yaml and the changes of later resumes
        train = config.get("train") if isinstance(config.get("train"), dict) else {}
        summary.max_steps = checked(train.get("max_steps"), Optional[int], "config.yaml: train.max_steps")
        summary.kind = f"finetune {checked(config['mode'], str, 'config.yaml: mode')}" if "mode" in config \
            else "pretrain"
        latest = run_checkpoint(run_dir, "latest")
        if latest is not None:
            meta = read_meta(latest)
            if FINETUNE_META in meta:
                summary.kind = f"finetune {meta[FINETUNE_META]['mode']}"
            if meta.get("lora"):
                summary.kind += " lora"
            state = load_trainer_state(latest)
            summary.step, summary.best_val_loss = state["step"], state["best_val_loss"]
            summary.tokens = state.get("tokens")
        best = run_checkpoint(run_dir, "best")
        if best is not None and summary.best_val_loss is None:
            summary.best_val_loss = read_meta(best).get("val_loss")
        if summary.step is None or summary.tokens is None:  # no checkpoint yet: the metrics say how far
            records = MetricsLog(run_dir / "metrics.jsonl").read()
            steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
            tokens = [r["tokens"] for r in records if isinstance(r.get("tokens"), int)]
            summary.step = summary.step if summary.step is not None else max(steps, default=None)
            summary.tokens = summary.tokens if summary.tokens is not None else max(tokens, default=None)
    except UserError as e:
        summary.problem = str(e)
    except OSError as e:
        summary.problem = f"unreadable: {e.strerror or e}"
    return summary


def _tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):  # links are not followed: a linked folder is not this run's
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass  # removed while we walk
    return total


def _last_update(run_dir: Path) -> float:
    paths = [run_dir / "metrics.jsonl", run_dir / "config.yaml", run_dir / CHECKPOINTS / "latest",
             run_dir / CHECKPOINTS / "best", run_dir]
    return max((p.lstat().st_mtime for p in paths if os.path.lexists(p)), default=0.0)


def format_runs(summaries: list[RunSummary]) -> str:
    """One line per run under a header; a broken run shows its reason instead of numbers."""
    header = f"{'run':<24}{'kind':<22}{'step/max':>14}{'best val':>10}{'tokens':>10}{'size':>9}  updated"
    lines = [header, "-" * len(header)]
    for s in summaries:
        when = datetime.datetime.fromtimestamp(s.updated).strftime("%Y-%m-%d %H:%M") if s.updated else "-"
        if s.problem:
            lines.append(f"{s.name:<24}{'(unreadable: ' + s.problem + ')'}")
            continue
        steps = f"{_or_dash(s.step)}/{_or_dash(s.max_steps)}"
        val = f"{s.best_val_loss:.4f}" if s.best_val_loss is not None else "-"
        tokens = human_count(s.tokens) if s.tokens is not None else "-"
        lines.append(f"{s.name:<24}{s.kind:<22}{steps:>14}{val:>10}{tokens:>10}{_bytes(s.size_bytes):>9}  {when}")
    return "\n".join(lines)


def _or_dash(value: Optional[int]) -> str:
    return "-" if value is None else str(value)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def runs_command(options) -> None:
    """`gptforge runs [DIR]`."""
    runs = find_runs(Path(options.dir))
    if not runs:
        print(f"no runs in {options.dir} (a run is a folder with config.yaml, metrics.jsonl or checkpoints/)")
        return
    print(format_runs([summarize_run(run) for run in runs]))
