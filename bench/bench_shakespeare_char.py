"""Time to quality: wall time from `gptforge train` launch until a checkpoint with validation loss <= target
on Tiny Shakespeare, character level (last 10% as validation, as nanoGPT splits it).

The timed command prepares the data itself (a fresh run directory), so data preparation, imports and
evaluations are all inside the measured time. Two recipes run back to back:
  - tuned: bench/configs/shakespeare_char_cpu.yaml (ours)
  - nanogpt-recipe: nanoGPT's documented CPU recipe (4 layers, 4 heads, 128 dims, block 64, batch 12,
    lr 1e-3, 2000 iterations) run in gptforge, as the reference point

    python bench/bench_shakespeare_char.py --data ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NANOGPT_RECIPE = ["--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "128", "--model.block_size", "64",
                  "--model.dropout", "0.0", "--model.bias", "false", "--train.micro_batch_size", "12",
                  "--train.max_steps", "2000", "--train.lr", "1e-3", "--train.lr_decay_steps", "2000",
                  "--train.min_lr_ratio", "0.1", "--train.warmup_steps", "100", "--train.eval_every", "250",
                  "--train.eval_batches", "20", "--train.weight_decay", "0.1", "--train.beta2", "0.99",
                  "--train.checkpoint_every", "0"]


def run(name: str, data: Path, extra: list[str], target: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"gptforge-{name}-"))
    shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "gptforge", "train", "--data.source", str(data), "--data.tokenizer", "char",
           "--data.num_proc", "1", "--train.run_dir", str(run_dir), "--train.progress", "false",
           "--train.device", "cpu", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    total = time.time() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in vals if "val_loss" in r]
    hit = next((r for r in vals if r["val_loss"] <= target), None)
    full_val = full_split_loss(run_dir / "checkpoints" / "best", run_dir / "data")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"name": name, "best_val": min(r["val_loss"] for r in vals), "total_s": total, "full_val": full_val,
            "reached_s": (hit["time"] - t0) if hit else None, "reached_step": hit["step"] if hit else None}


def full_split_loss(checkpoint: Path, data_dir: Path) -> float:
    """Loss of a checkpoint over the WHOLE validation split (consecutive windows), to confirm that the
    training-time estimate (a sample of random windows) is not a lucky draw."""
    import torch

    from gptforge.checkpoint import load_model
    from gptforge.data.loader import TokenLoader

    model, _, _ = load_model(checkpoint)
    model.eval()
    T = model.config.block_size
    loader = TokenLoader(data_dir, "val", batch_size=64, block_size=T, sampling="sequential")
    n_windows = loader.usable // T
    total, count = 0.0, 0
    with torch.no_grad():
        while count < n_windows:
            x, y = loader.next_batch()
            take = min(64, n_windows - count)
            _, loss = model(x[:take], y[:take])
            total += loss.item() * take
            count += take
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--target", type=float, default=1.89)
    ap.add_argument("--config", type=Path, default=HERE / "configs/shakespeare_char_cpu.yaml")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    rows = [run("tuned", args.data, ["--config", str(args.config)], args.target)]
    if not args.skip_reference:
        rows.append(run("nanogpt-recipe", args.data, NANOGPT_RECIPE, args.target))
    print(f"# {time.strftime('%Y-%m-%d')} target val loss <= {args.target}")
    for r in rows:
        reached = f"{r['reached_s']:.1f}s (step {r['reached_step']})" if r["reached_s"] else "not reached"
        print(f"{r['name']:>15}: reached {reached}; best val {r['best_val']:.4f} (whole val split: "
              f"{r['full_val']:.4f}); whole run {r['total_s']:.1f}s")


if __name__ == "__main__":
    main()
