"""`gptforge quickstart`: the built-in end-to-end job, sized to a time budget on whatever device is here."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from gptforge.common import setup_runtime
from gptforge.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from gptforge.model import GPT
from gptforge.options import QuickstartOptions

# A character-level model: learns spelling, verse layout and speaker names within minutes on a laptop CPU.
QUICKSTART_MODEL = ModelConfig(n_layer=4, n_head=4, n_embd=192, block_size=128, dropout=0.0, bias=False)
QUICKSTART_BATCH = 16


def seconds_per_step(model_cfg: ModelConfig, batch: int, runtime, steps: int = 3,
                     clock: Callable[[], float] = time.perf_counter) -> float:
    """Time a few forward/backward/update steps on random tokens, so the schedule fits the budget."""
    model = GPT(model_cfg).to(runtime.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.block_size), device=runtime.device)
    times = []
    for _ in range(steps + 1):
        t = clock()
        with runtime.autocast():
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if runtime.device_type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t)
    return min(times[1:])  # the first step pays one-off allocation costs


def steps_for_budget(step_s: float, minutes: float) -> int:
    """Steps that fit `minutes` at `step_s` seconds each: ~10% of the budget goes to evaluation and
    checkpoints, and never fewer than 50 steps."""
    return max(50, int(0.9 * minutes * 60 / step_s))


def quickstart_command(options: QuickstartOptions) -> None:
    """`gptforge quickstart`."""
    quickstart(Path(options.run_dir), options.minutes, options.device, options.steps, options.dtype)


def quickstart(run_dir: Path = Path("runs/quickstart"), minutes: float = 3.0, device: str = "auto",
               steps: Optional[int] = None, dtype: str = "auto") -> None:
    """Prepare, train and sample. The run is sized to `minutes` on this device, unless `steps` fixes it."""
    from gptforge.checkpoint import load_model
    from gptforge.data.prepare import load_manifest
    from gptforge.textgen import generate_text
    from gptforge.train.pretrain import ensure_prepared, run_training

    runtime = setup_runtime(device, dtype)
    data = DataConfig(source="shakespeare", tokenizer="char", dir=str(run_dir / "data"))
    cfg = RunConfig(model=QUICKSTART_MODEL, data=data,
                    train=TrainConfig(run_dir=str(run_dir), device=device, dtype=dtype))
    data_dir = ensure_prepared(cfg, runtime)
    vocab = load_manifest(data_dir)["tokenizer"]["vocab_size"]
    model_cfg = dataclasses.replace(QUICKSTART_MODEL, vocab_size=vocab)
    if steps is None:
        step_s = seconds_per_step(model_cfg, QUICKSTART_BATCH, runtime)
        max_steps, time_limit_s = steps_for_budget(step_s, minutes), minutes * 60 * 1.5
        print(f"quickstart: {step_s * 1000:.0f} ms/step on {runtime.device}: training {max_steps} steps "
              f"(~{minutes:g} min) into {run_dir}", flush=True)
    else:
        max_steps, time_limit_s = steps, None
        print(f"quickstart: training {max_steps} steps on {runtime.device} into {run_dir}", flush=True)
    cfg.train = TrainConfig(
        run_dir=str(run_dir), device=device, dtype=dtype, micro_batch_size=QUICKSTART_BATCH, max_steps=max_steps,
        lr=3e-3, warmup_steps=min(100, max_steps // 10), min_lr_ratio=0.1, weight_decay=0.1,
        eval_every=max(50, max_steps // 10), eval_batches=20, checkpoint_every=max(50, max_steps // 10),
        time_limit_s=time_limit_s, seed=1337)
    result = run_training(cfg, runtime)

    model, tokenizer, meta = load_model(run_dir, runtime.device)
    sample = SampleConfig(max_new_tokens=400, temperature=0.8, top_k=None, seed=1, num_samples=2)
    print(f"\nbest checkpoint: step {meta['step']}, validation loss {meta['val_loss']:.4f} "
          f"(train loss {result.train_loss:.4f})")
    for text in generate_text(model, tokenizer, ["ROMEO:\n"], sample, runtime.device):
        print("\n" + "=" * 60 + "\nROMEO:\n" + text)
    print("=" * 60)
    print(f"\nrun directory: {run_dir}  (config.yaml, metrics.jsonl, loss.png, checkpoints/)")
    print(f"more samples:  gptforge generate {run_dir} --prompt 'JULIET:' --sample.max_new_tokens 500")
