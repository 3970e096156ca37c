"""Where a run's metrics go. One interface (hyperparameters once, then scalars and text samples by step);
metrics.jsonl (+ loss.png, drawn by the loop) is always written, TensorBoard and Weights & Biases on
request (--train.loggers). The loop hands every record to `RunLoggers.write`, exactly what it writes to
metrics.jsonl, so every logger sees the same numbers. The optional packages are imported only when chosen."""

from __future__ import annotations

import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, Optional, Protocol

from gptforge.common import UserError, atomic_write_text
from gptforge.files import read_bytes
from gptforge.train.history import flatten
from gptforge.train.metrics import MetricsLog


class Logger(Protocol):
    def hyperparameters(self, params: dict[str, Any]) -> None: ...
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def text(self, step: int, name: str, text: str) -> None: ...
    def close(self) -> None: ...


def scalar_params(params: dict[str, Any]) -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists and None as text (what both UIs accept)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(params).items()}


def run_params(model_config: Any, tc: Any) -> dict[str, Any]:
    """The hyperparameters the loggers record: the model's shape and the training settings."""
    import dataclasses

    return {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(tc)}


class TensorBoardLogger:
    """Event files in <run_dir>/tensorboard (`tensorboard --logdir runs` shows every run)."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--train.loggers tensorboard needs the tensorboard package: "
                            "pip install 'gptforge[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def hyperparameters(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # the HParams dashboard's records, in this run's own event file (add_hparams would open a sub-run)
        for summary in hparams(scalar_params(params), {}):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def text(self, step: int, name: str, text: str) -> None:
        self.writer.add_text(name, "    " + text.replace("\n", "\n    "), step)  # indented: shown verbatim

    def close(self) -> None:
        self.writer.close()


WANDB_ID = "wandb_run_id"  # a resumed run keeps logging into the same W&B run


class WandbLogger:
    """A W&B run named after the run directory, its files under <run_dir>/wandb. WANDB_MODE=offline keeps
    everything on this machine (`wandb sync` uploads it later); WANDB_PROJECT names the project."""

    def __init__(self, run_dir: Path):
        try:
            import wandb
        except ImportError:
            raise UserError("--train.loggers wandb needs the wandb package: pip install 'gptforge[wandb]'") from None
        self.wandb = wandb
        self.run_dir = Path(run_dir)
        self.run = None

    def hyperparameters(self, params: dict[str, Any]) -> None:
        run_id = _read_run_id(self.run_dir) or secrets.token_hex(6)
        atomic_write_text(self.run_dir / WANDB_ID, run_id + "\n")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "gptforge"), name=self.run_dir.name,
                                   id=run_id, resume="allow", dir=str(self.run_dir), config=params)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, name: str, text: str) -> None:
        self.run.log({name: self.wandb.Html(f"<pre>{_escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _read_run_id(run_dir: Path) -> Optional[str]:
    path = run_dir / WANDB_ID
    if not path.exists():
        return None
    run_id = read_bytes(path, root=run_dir, max_bytes=256).decode("utf-8", "replace").strip()
    if not re.fullmatch(r"[a-z0-9]{1,64}", run_id):
        raise UserError(f"{path} does not hold a W&B run id; remove it to start a new W&B run")
    return run_id


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


OPTIONAL = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


class RunLoggers:
    """metrics.jsonl plus the chosen loggers, behind MetricsLog's interface (write, read, truncate_after),
    so the loop writes each record once. Numbers go to the loggers as scalars, strings (samples) as text."""

    def __init__(self, run_dir: Path, names: list[str], params: dict[str, Any], is_main: bool = True):
        self.jsonl = MetricsLog(Path(run_dir) / "metrics.jsonl")
        self.others: list[Logger] = []
        if is_main:
            for name in dict.fromkeys(names):  # in order, once each
                if name in OPTIONAL:
                    self.others.append(OPTIONAL[name](run_dir))
            for logger in self.others:
                logger.hyperparameters(params)

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        step = record["step"]
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                  and not isinstance(v, bool) and math.isfinite(v)}
        texts = {k: v for k, v in record.items() if isinstance(v, str)}
        for logger in self.others:
            if values:
                logger.scalars(step, values)
            for name, text in texts.items():
                logger.text(step, name, text)

    def read(self) -> list[dict[str, Any]]:
        return self.jsonl.read()

    def truncate_after(self, step: int) -> None:
        self.jsonl.truncate_after(step)

    def close(self) -> None:
        for logger in self.others:
            logger.close()
