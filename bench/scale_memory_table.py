"""The predicted memory table of docs/scale.md, from gptforge.train.memory.predict_memory (nothing is run).

    python bench/scale_memory_table.py            # markdown, block 1024, bf16 autocast, AdamW
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gptforge.config import ModelConfig, resolve_model_config  # noqa: E402
from gptforge.train.memory import GPU_MARGIN, largest_fitting, predict_memory  # noqa: E402

PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CARDS_GB = (16, 24, 40, 80)
GB = 1e9


MOST = 256  # micro-batches searched; a cell at it reads "256+"


def largest_micro_batch(cfg: ModelConfig, card_gb: int, checkpointing: bool, shards: int) -> int:
    budget = (1 - GPU_MARGIN) * card_gb * GB
    return largest_fitting(list(range(1, MOST + 1)), lambda n: predict_memory(
        cfg, n, torch.bfloat16, "adamw", checkpointing, shards).total <= budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fsdp", type=int, default=8, help="processes sharing the model under FSDP")
    args = parser.parse_args()
    print("| model | parameters | weights fp32 (+bf16 copy) | gradients | AdamW | activations per sequence "
          "(plain / checkpointed) |")
    print("|---|---|---|---|---|---|")
    for name in PRESETS:
        cfg = resolve_model_config(ModelConfig(preset=name))
        one, zero = predict_memory(cfg, 1, torch.bfloat16), predict_memory(cfg, 0, torch.bfloat16)
        ckpt = predict_memory(cfg, 1, torch.bfloat16, activation_checkpointing=True)
        per_sequence = (one.activations - zero.activations) / GB, (ckpt.activations - zero.activations) / GB
        print(f"| {name} | {cfg.parameter_count / 1e6:.0f}M | {one.parameters / GB:.1f} GB "
              f"| {one.gradients / GB:.1f} GB | {one.optimizer / GB:.1f} GB "
              f"| {per_sequence[0]:.2f} / {per_sequence[1]:.2f} GB |")
    print()
    header = " | ".join(f"{gb} GB" for gb in CARDS_GB)
    print(f"| model | setting | {header} |")
    print("|---|---|" + "---|" * len(CARDS_GB))
    for name in PRESETS:
        cfg = resolve_model_config(ModelConfig(preset=name))
        for label, checkpointing, shards in (("one GPU / DDP", False, 1), ("one GPU / DDP + AC", True, 1),
                                             (f"FSDP x{args.fsdp}", False, args.fsdp),
                                             (f"FSDP x{args.fsdp} + AC", True, args.fsdp)):
            cells = [largest_micro_batch(cfg, gb, checkpointing, shards) for gb in CARDS_GB]
            shown = " | ".join(f"{n}+" if n == MOST else str(n) if n else "does not fit" for n in cells)
            print(f"| {name} | {label} | {shown} |")


if __name__ == "__main__":
    main()
