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


def kill_after_checkpoint(args: list[str], run_dir: Path, min_step: int, timeout: float = 120) -> int:
    """Run `python -m gptforge ARGS`, SIGKILL it once run_dir's `latest` checkpoint reaches min_step, and
    return the step of the checkpoint left behind (a kill between the swap's renames repaired first, as a
    rerun does)."""
    import json
    import signal

    from gptforge.checkpoint import run_checkpoint

    signal_after_checkpoint(args, run_dir, min_step, signal.SIGKILL, timeout)
    run_checkpoint(Path(run_dir), "latest")
    return json.loads((Path(run_dir) / "checkpoints" / "latest" / "meta.json").read_text())["step"]


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, min_step: int, timeout: float) -> None:
    """Return once run_dir's `latest` checkpoint holds step >= min_step, or proc has ended, or timeout passed."""
    import json
    import time

    meta = Path(run_dir) / "checkpoints" / "latest" / "meta.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(meta.read_text())["step"] >= min_step:
                return
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.005)


def prepared_byte_corpus(root: Path, n_lines: int) -> Path:
    """A synthetic corpus (write_corpus) prepared with the byte tokenizer into root/shards."""
    from gptforge.config import DataConfig
    from gptforge.data.prepare import prepare

    cfg = DataConfig(source=str(write_corpus(root / "corpus.txt", n_lines=n_lines)), tokenizer="byte", num_proc=1)
    prepare(cfg, root / "shards", progress=False)
    return root / "shards"


def signal_after_checkpoint(args: list[str], run_dir: Path, min_step: int, sig: int,
                            timeout: float = 120) -> tuple[int, str]:
    """Run `python -m gptforge ARGS`, send it `sig` once run_dir's `latest` checkpoint reaches min_step, and
    return its exit status and standard error once it has ended."""
    import signal
    import tempfile

    # PYTHONFAULTHANDLER: a run that hangs is sent SIGABRT below and prints every thread's stack first
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: nobody reads while the run goes on
        proc = subprocess.Popen([sys.executable, "-m", "gptforge", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        wait_for_checkpoint(proc, run_dir, min_step, timeout)
        assert proc.poll() is None, "the run finished before the signal could be sent"
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            err.seek(0)
            raise AssertionError(f"the run did not end within {timeout} s of signal {sig}; its stacks:\n"
                                 f"{err.read()[-6000:]}") from None
        err.seek(0)
        return code, err.read()


def divergences_at_near_ties(model, prompts: list[list[int]], reference: list[list[int]],
                             other: list[list[int]]) -> tuple[list[float], float]:
    """Why greedy continuations of a lower-precision copy may differ from float32's: for each prompt whose
    continuation does, float32's logit margin between its own token and the other's at the first difference;
    and a "near tie" threshold, the 10% quantile of float32's top-two margins over all its greedy steps. On
    briefly trained models such ties are common, so exact agreement says more about the model than the format."""
    import torch

    vocab = model.config.vocab_size
    with torch.inference_mode():  # float32's logits at each of its greedy steps
        steps = [model(torch.tensor([p + t]))[0][0, len(p) - 1:-1, :vocab] for p, t in zip(prompts, reference)]
    top2 = torch.cat([s.topk(2, dim=-1).values for s in steps])  # (steps, 2)
    near_tie = torch.quantile(top2[:, 0] - top2[:, 1], 0.10).item()
    margins = []
    for logits, ours, theirs in zip(steps, reference, other):
        if ours != theirs:
            i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            if i < min(len(ours), len(theirs)):
                margins.append((logits[i, ours[i]] - logits[i, theirs[i]]).item())
            else:  # one stopped early (an end-of-text token): not a tie, count it as decided
                margins.append(float("inf"))
    return margins, near_tie


def cli_error(capsys, *argv: str) -> str:
    """Run `gptforge ARGV` in this process; assert it exits 2 with one line on stderr (no traceback); return it."""
    import pytest

    from gptforge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err
