"""Metrics: one JSON object per line in metrics.jsonl, and loss.png redrawn from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from gptforge.common import atomic_write_text


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        return records

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a killed run wrote after its last checkpoint, so curves stay clean."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(records: list[dict[str, Any]], path: Path, title: Optional[str] = None) -> None:
    """Train and validation loss against step, to a PNG titled with the run's name (default: the folder
    it is written into, the run directory); benchmark or task scores ("task/metric" keys, written by
    train.eval_tasks and classify) in a second panel beside it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    fig = loss_figure(records, Path(path).resolve().parent.name if title is None else title)
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def loss_figure(records: list[dict[str, Any]], title: str = ""):
    """The figure plot_losses saves (a matplotlib Figure; the caller closes it)."""
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    task_keys = sorted({k for r in records for k in r if "/" in k})
    fig, axes = plt.subplots(1, 2 if task_keys else 1, figsize=(12 if task_keys else 7, 4), dpi=100,
                             squeeze=False)
    if title:
        fig.suptitle(title)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per target)")  # per token for language modelling, per example for classify
    ax.grid(alpha=0.3)
    ax.legend()
    if task_keys:
        _plot_scores(axes[0][1], records, task_keys)
    fig.tight_layout()
    return fig


def _plot_scores(ax, records: list[dict[str, Any]], keys: list[str]) -> None:
    """Scores against step. Evaluations are few (a classifier's often once per epoch, one in all for a
    one-epoch run), so each is a visible marker with its value written beside it, on a 0-1 axis."""
    values = []
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        values += [v for _, v in points]
        ax.plot(*zip(*points), label=key, marker="o", markersize=6)
        step, last = points[-1]
        ax.annotate(f"{last:.3f}", (step, last), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if values and all(0 <= v <= 1 for v in values):
        ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_sweep(rows: list[dict], path: Path) -> None:
    """A learning-rate sweep's losses after each trial against the rate (log scale), to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([r["lr"] for r in rows], [r["val_loss"] for r in rows], marker="o", label="validation")
    ax.plot([r["lr"] for r in rows], [r["train_loss"] for r in rows], marker="o", label="train", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss after the trial")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
