"""Checkpoint write and read times: sharded (FSDP, torch.distributed.checkpoint, every rank its part) vs the
one-process format (model.safetensors + trainer/optimizer.safetensors), for the same model and AdamW state;
and the bytes each rank writes against the whole state.

    torchrun --standalone --nproc_per_node 2 bench/bench_checkpoint_sharded.py --preset gpt2 --out /tmp/ckbench

Rank 0 prints a markdown table. CPU (gloo) here; on GPUs the same script runs with nccl (untested).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gptforge.checkpoint import load_model, save_checkpoint  # noqa: E402
from gptforge.common import setup_runtime, teardown_runtime  # noqa: E402
from gptforge.config import ModelConfig, TrainConfig, resolve_model_config  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.tokenizer import ByteTokenizer  # noqa: E402
from gptforge.trainer_state import restore_optimizer  # noqa: E402
from gptforge.train.optim import make_optimizer  # noqa: E402
from gptforge.train.parallelize import parallelize  # noqa: E402
from gptforge.train.sharded import consolidate, load_sharded, save_sharded  # noqa: E402


def one_step(module, model, optimizer, device) -> None:
    """Fill gradients and the AdamW moments, as a checkpoint after a real step holds them."""
    x = torch.randint(0, model.config.vocab_size, (1, 32), device=device)
    _, loss = module(x, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--out", default="/tmp/gptforge-ckbench")
    args = parser.parse_args()
    runtime = setup_runtime("cpu", "float32")
    cfg = resolve_model_config(ModelConfig(preset=args.preset, vocab_size=ByteTokenizer().vocab_size))
    tc = TrainConfig(strategy="fsdp")
    out = Path(args.out)
    if runtime.is_main:
        shutil.rmtree(out, ignore_errors=True)
    dist.barrier()
    tokenizer = ByteTokenizer()

    torch.manual_seed(0)
    model = GPT(cfg)
    parallel = parallelize(model, tc, runtime)
    optimizer = make_optimizer(model, tc, "cpu")
    one_step(parallel.module, model, optimizer, runtime.device)
    dist.barrier()
    state = {"step": 1}
    write = timed(lambda: save_sharded(out / "sharded", model, optimizer, tokenizer, runtime, step=1, val_loss=None,
                                       trainer_state=state))
    fresh = GPT(cfg)
    fresh_parallel = parallelize(fresh, tc, runtime)
    fresh_optimizer = make_optimizer(fresh, tc, "cpu")
    dist.barrier()
    read = timed(lambda: load_sharded(out / "sharded", fresh, fresh_optimizer, runtime))
    del fresh_parallel
    shard_bytes = sorted(f.stat().st_size for f in (out / "sharded" / "shards").iterdir())
    gather = timed(lambda: parallel.plain_model())
    teardown_runtime(runtime)
    if not runtime.is_main:
        return

    torch.manual_seed(0)
    plain = GPT(cfg)
    plain_optimizer = make_optimizer(plain, TrainConfig(), "cpu")
    one_step(plain, plain, plain_optimizer, "cpu")
    flat_write = timed(lambda: save_checkpoint(out / "flat", plain, tokenizer, step=1, trainer_state={},
                                               optimizer=plain_optimizer))
    again = make_optimizer(plain, TrainConfig(), "cpu")
    trainer = out / "flat" / "trainer"  # the optimizer part of load_trainer_state (this state.json is a stub)
    flat_read = timed(lambda: (load_model(out / "flat"), restore_optimizer(
        again, load_file(str(trainer / "optimizer.safetensors")),
        json.loads((trainer / "optimizer.json").read_text()), trainer)))
    whole = sum((out / "flat" / name).stat().st_size for name in ("model.safetensors", "trainer/optimizer.safetensors"))
    consolidating = timed(lambda: consolidate(out / "sharded"))

    print(f"| {args.preset} ({cfg.parameter_count / 1e6:.0f}M parameters + AdamW), {runtime.world_size} ranks, CPU |"
          " seconds |")
    print("|---|---|")
    print(f"| sharded write (every rank its part, torch.distributed.checkpoint) | {write:.2f} |")
    print(f"| sharded read (resliced into {runtime.world_size} ranks) | {read:.2f} |")
    print(f"| one-process write (model.safetensors + optimizer.safetensors) | {flat_write:.2f} |")
    print(f"| one-process read (weights + optimizer) | {flat_read:.2f} |")
    print(f"| gather the whole model on rank 0 (for `best`) | {gather:.2f} |")
    print(f"| `gptforge consolidate` (one process reads every shard, writes the weights) | {consolidating:.2f} |")
    print(f"\nbytes per rank: {', '.join(f'{b:,}' for b in shard_bytes)}; whole state {whole:,} "
          f"({max(shard_bytes) / (whole / runtime.world_size):.4f} x 1/{runtime.world_size} of it)")


if __name__ == "__main__":
    main()
