"""Issue 6, target 2: wall time from `gptforge train` launch to the checkpoint with validation loss <= 1.47
on Tiny Shakespeare, character level (last 10% as validation, as nanoGPT splits it), on one GPU.

The measurement is bench/bench_shakespeare_char.py's, imported rather than copied: a fresh run directory, so
imports, data preparation, evaluations and checkpoint writes are inside the time; "reached" is the wall
clock written to metrics.jsonl after the `best` checkpoint that first reached the target was saved; that
checkpoint is then scored on the whole validation split, to show the estimate was not a lucky draw.

    python bench/gpu/bench_shakespeare_gpu.py --data .gpu_carry/data/tinyshakespeare.txt
    python bench/gpu/bench_shakespeare_gpu.py --data ... --variant "b256: --train.micro_batch_size 256 --train.lr 3e-3"
    python bench/gpu/bench_shakespeare_gpu.py --data ... --nanogpt     # also nanoGPT's recipe, in gptforge
    python bench/gpu/bench_shakespeare_gpu.py --smoke --data corpus.txt  # CPU, tiny model, 3 steps: it runs

Each --variant is "NAME: overrides" on top of --config (bench/configs/shakespeare_char_gpu.yaml), so one
command can compare a few recipes; the config alone runs as "config" unless --no-config-run.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from common import BENCH_DIR, REPO, command_line, pick_device, row_prefix  # noqa: E402
from bench_shakespeare_char import run  # noqa: E402

# nanoGPT's config/train_shakespeare_char.py, as gptforge options (its 5000 iterations capped by time).
NANOGPT_GPU_RECIPE = ["--model.n_layer", "6", "--model.n_head", "6", "--model.n_embd", "384",
                      "--model.block_size", "256", "--model.dropout", "0.2", "--model.bias", "false",
                      "--train.micro_batch_size", "64", "--train.max_steps", "5000", "--train.lr", "1e-3",
                      "--train.lr_decay_steps", "5000", "--train.min_lr_ratio", "0.1", "--train.warmup_steps", "100",
                      "--train.beta2", "0.99", "--train.weight_decay", "0.1", "--train.eval_every", "250",
                      "--train.eval_batches", "20", "--train.checkpoint_every", "0", "--train.plot", "false",
                      "--train.time_limit_s", "90"]
SMOKE = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
         "--model.dropout", "0.0", "--train.micro_batch_size", "4", "--train.max_steps", "3",
         "--train.eval_every", "3", "--train.eval_batches", "2", "--train.warmup_steps", "1",
         "--train.dtype", "float32", "--train.time_limit_s", "60"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--target", type=float, default=1.47)
    ap.add_argument("--config", type=Path, default=BENCH_DIR / "configs/shakespeare_char_gpu.yaml")
    ap.add_argument("--variant", action="append", default=[], metavar="'NAME: --train.x 1 ...'")
    ap.add_argument("--no-config-run", action="store_true", help="run only the variants")
    ap.add_argument("--nanogpt", action="store_true", help="also nanoGPT's recipe (6L/384, batch 64, lr 1e-3)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, 3 steps: checks the script runs")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: copy ../shared/data/tinyshakespeare.txt there "
                         "(bench/gpu/prepare_carry.sh does)")
    device = pick_device(args.smoke)
    base = ["--config", str(args.config), "--train.device", device.type]
    last = SMOKE if args.smoke else []  # after everything, so a smoke run stays tiny whatever the variant
    recipes = [] if args.no_config_run else [("config", base + last)]
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        recipes.append((name.strip(), base + shlex.split(overrides) + last))
    if args.nanogpt:
        recipes.append(("nanogpt-recipe", ["--train.device", device.type, *NANOGPT_GPU_RECIPE, *last]))
    target = 100.0 if args.smoke else args.target

    rows = []
    for name, extra in recipes:
        r = run(name, args.data, extra, target)
        reached = f"{r['reached_s']:.1f} s (step {r['reached_step']})" if r["reached_s"] else "not reached"
        print(f"{name}: reached {reached}; best val {r['best_val']:.4f} (whole split {r['full_val']:.4f}); "
              f"whole run {r['total_s']:.1f} s", flush=True)
        rows.append((r, reached, extra))

    print(f"\n| date | device | torch | recipe | reached val <= {target} | best val (estimate / whole split) "
          "| whole run | options after the config |")
    print("|---|---|---|---|---|---|---|---|")
    for r, reached, extra in rows:
        shown = " ".join(extra[2:] if extra[:1] == ["--config"] else extra)
        print(f"{row_prefix(device)}| {r['name']} | {reached} | {r['best_val']:.4f} / {r['full_val']:.4f} "
              f"| {r['total_s']:.1f} s | `{shown}` |")
    print(f"\ncommand: {command_line()}")


if __name__ == "__main__":
    main()
