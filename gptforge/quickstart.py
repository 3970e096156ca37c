"""`gptforge quickstart`: the built-in end-to-end job, sized to a time budget on whatever device is here."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from gptforge.common import setup_runtime
from gptforge.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from gptforge.model import GPT

# A character-level model: learns spelling, verse layout and speaker names within minutes on a laptop CPU.
QUICKSTART_MODEL = ModelConfig(n_layer=4, n_head=4, n_embd=192, block_size=128, dropout=0.0, bias=False)
QUICKSTART_BATCH = 16


def seconds_per_step(model_cfg: ModelConfig, batch: int, runtime, steps: int = 3) -> float:
    """Time a few forward/backward/update steps on random tokens, so the schedule fits the budget."""
    model = GPT(model_cfg).to(runtime.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.block_size), device=runtime.device)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with runtime.autocast():
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if runtime.device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times[1:])  # the first step pays one-off allocation costs


def quickstart(run_dir: Path = Path("runs/quickstart"), minutes: float = 3.0, device: str = "auto") -> None:
    from gptforge.checkpoint import load_model
    from gptforge.data.prepare import load_manifest
    from gptforge.textgen import generate_text
    from gptforge.train.pretrain import ensure_prepared, run_training

    runtime = setup_runtime(device, "auto")
    data = DataConfig(source="shakespeare", tokenizer="char", dir=str(run_dir / "data"))
    cfg = RunConfig(model=QUICKSTART_MODEL, data=data,
                    train=TrainConfig(run_dir=str(run_dir), device=device))
    data_dir = ensure_prepared(cfg, runtime)
    vocab = load_manifest(data_dir)["tokenizer"]["vocab_size"]
    model_cfg = dataclasses.replace(QUICKSTART_MODEL, vocab_size=vocab)
    step_s = seconds_per_step(model_cfg, QUICKSTART_BATCH, runtime)
    budget = minutes * 60
    # ~10% of the budget goes to evaluation and checkpoints
    max_steps = max(50, int(0.9 * budget / step_s))
    print(f"quickstart: {step_s * 1000:.0f} ms/step on {runtime.device}: training {max_steps} steps "
          f"(~{minutes:g} min) into {run_dir}", flush=True)
    cfg.train = TrainConfig(
        run_dir=str(run_dir), device=device, micro_batch_size=QUICKSTART_BATCH, max_steps=max_steps,
        lr=3e-3, warmup_steps=min(100, max_steps // 10), min_lr_ratio=0.1, weight_decay=0.1,
        eval_every=max(50, max_steps // 10), eval_batches=20, checkpoint_every=max(50, max_steps // 10),
        time_limit_s=budget * 1.5, seed=1337)
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
