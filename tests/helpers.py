"""Small builders shared by tests: a deterministic text corpus and CLI runners."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the king and queen walk to the castle where a fool sings of love and war while the "
         "knight rides north under grey skies with his sword and shield to find the lost crown").split()


def write_corpus(path: Path, n_lines: int = 400, seed: int = 0) -> Path:
    """A small corpus with real structure (a model can learn it quickly), deterministic per seed."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        start = rng.randrange(len(WORDS))
        n = rng.randint(5, 12)
        lines.append(" ".join(WORDS[(start + j) % len(WORDS)] for j in range(n)).capitalize() + ".")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
            module: str = "gptforge", launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m gptforge ARGS` (or under a launcher such as torchrun) and capture its output."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = (launcher or [sys.executable]) + ["-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def tiny_train_args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--model.preset", "tiny", "--data.dir", str(data_dir), "--train.run_dir", str(run_dir),
            "--train.device", "cpu", "--train.progress", "false", "--train.micro_batch_size", "8",
            "--train.warmup_steps", "5", "--train.lr", "3e-3", "--train.eval_batches", "4", *extra]
