"""`gptforge quickstart`: the built-in end-to-end job. A fixed recipe (bench/configs/shakespeare_char_cpu.yaml's
tuned CPU settings) trains a fixed number of steps, so every machine ends at the same quality; how fast the
machine is decides only what the progress bar predicts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from gptforge.common import setup_runtime
from gptforge.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from gptforge.options import QuickstartOptions

# A character-level model. At this size per-token compute is near a CPU's peak already, so what buys
# quality per second is more optimizer steps: 2 layers, micro-batch 8, a high learning rate (docs/benchmarks.md).
QUICKSTART_MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False)
QUICKSTART_STEPS = 3000  # 2000 measured val 1.913 after issue 12's data order; 3000: 1.844


def quickstart_train_config(run_dir: Path, device: str, dtype: str, steps: int) -> TrainConfig:
    """The recipe: val loss <= 1.90 on the built-in corpus after the default 3000 steps, on any machine."""
    return TrainConfig(
        run_dir=str(run_dir), device=device, dtype=dtype, micro_batch_size=8, max_steps=steps,
        lr=4e-3, warmup_steps=min(50, steps // 10), min_lr_ratio=0.1, beta2=0.95, weight_decay=0.1,
        eval_every=max(1, min(200, steps // 10)), eval_batches=20, checkpoint_every=500, seed=1337)


def quickstart_command(options: QuickstartOptions) -> None:
    """`gptforge quickstart`."""
    quickstart(Path(options.run_dir), options.device, options.steps, options.dtype)


def latest_step(run_dir: Path) -> Optional[int]:
    """The step of the run in `run_dir` (its latest checkpoint), or None when there is none."""
    from gptforge.checkpoint import load_trainer_state, run_checkpoint

    latest = run_checkpoint(run_dir, "latest")
    return None if latest is None else load_trainer_state(latest)["step"]


def quickstart(run_dir: Path = Path("runs/quickstart"), device: str = "auto", steps: Optional[int] = None,
               dtype: str = "auto") -> None:
    """Prepare, train and sample; then say how to serve the model. A finished run is not trained again."""
    from gptforge.checkpoint import load_model
    from gptforge.data.prepare import load_manifest
    from gptforge.textgen import generate_text
    from gptforge.train.pretrain import ensure_prepared, run_training

    steps = steps or QUICKSTART_STEPS
    runtime = setup_runtime(device, dtype)
    data = DataConfig(source="shakespeare", tokenizer="char", dir=str(run_dir / "data"))
    cfg = RunConfig(model=QUICKSTART_MODEL, data=data, train=quickstart_train_config(run_dir, device, dtype, steps))
    done = latest_step(run_dir)
    if done is not None and done >= steps:
        print(f"quickstart: {run_dir} already holds a finished run (step {done} of {steps}); nothing to train.\n"
              f"  sample or serve it (below), train it further with --steps N above {done}, "
              f"or start again with a new --run_dir (or after removing {run_dir}).")
    else:
        ensure_prepared(cfg, runtime)
        vocab = load_manifest(Path(data.dir))["tokenizer"]["vocab_size"]
        cfg.model = dataclasses.replace(QUICKSTART_MODEL, vocab_size=vocab)
        print(f"quickstart: training {steps} steps on {runtime.device} into {run_dir} (the progress bar "
              "estimates the time left)", flush=True)
        result = run_training(cfg, runtime)
        print(f"\ntrained: {result.summary()}")

    model, tokenizer, meta = load_model(run_dir, runtime.device)
    sample = SampleConfig(max_new_tokens=400, temperature=0.8, top_k=None, seed=1, num_samples=2)
    print(f"best checkpoint: step {meta['step']}, validation loss {meta['val_loss']:.4f}")
    for text in generate_text(model, tokenizer, ["ROMEO:\n"], sample, runtime.device):
        print("\n" + "=" * 60 + "\nROMEO:\n" + text)
    print("=" * 60)
    print(f"\nrun directory: {run_dir}  (config.yaml, metrics.jsonl, loss.png, checkpoints/)")
    print(f"more samples:  gptforge generate {run_dir} --prompt 'JULIET:' --sample.max_new_tokens 500")
    print(f"serve it:      gptforge serve {run_dir}   then open http://127.0.0.1:8000/ for the web app "
          "(an OpenAI-compatible API on the same port)")
