"""THE training loop. Pretraining and every fine-tuning mode run through `train_loop`.

What varies between modes is passed in: the model (whose forward returns (logits, loss)), a train batch
source with next_batch()/state_dict()/load_state_dict(), and a factory of validation batches.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol

import torch
import torch.distributed as dist

from gptforge.checkpoint import (CHECKPOINTS, keep_weights_copy, load_trainer_state, prepare_run_checkpoints,
                                 save_checkpoint)
from gptforge.common import Runtime, UserError, is_out_of_memory
from gptforge.config import RunConfig
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer
from gptforge.train.loggers import RunLoggers, run_params
from gptforge.train.metrics import plot_losses
from gptforge.train.notices import first_step_notice
from gptforge.train.optim import lr_at, make_optimizer

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopResult:
    step: int
    train_loss: float
    best_val_loss: Optional[float]
    last_val_loss: Optional[float]
    tokens_per_s: float
    elapsed_s: float
    stopped_early: bool

    def summary(self) -> str:
        """Step, losses and time, for the end-of-run line. A train loss never logged (a run found complete
        already, whose metrics are gone) is left out rather than shown as nan."""
        losses = {"train loss": self.train_loss, "best val loss": self.best_val_loss}
        shown = [f"{name} {value:.4f}" for name, value in losses.items()
                 if value is not None and math.isfinite(value)]
        return ", ".join([f"step {self.step}", *shown, f"{self.elapsed_s:.1f}s"])


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    per_micro = cfg.train.micro_batch_size * cfg.model.block_size * world_size
    if not cfg.train.tokens_per_step:
        return 1
    if cfg.train.tokens_per_step % per_micro:
        raise UserError(
            f"train.tokens_per_step={cfg.train.tokens_per_step} is not a multiple of micro_batch_size x "
            f"block_size x processes = {per_micro}; use a multiple such as {per_micro * max(1, cfg.train.tokens_per_step // per_micro)}"
        )
    return cfg.train.tokens_per_step // per_micro


def batch_tokens(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Tokens a batch trains on, for throughput: positions with a target (padding and masked prompts of
    fine-tuning batches excluded; every position in pretraining), or a classifier's real input tokens."""
    return (y != -100).sum() if y.dim() == 2 else (x >= 0).sum()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": _jsonable(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], runtime: Runtime) -> float:
    """Mean loss over the given batches (averaged across processes)."""
    model.eval()
    total, count = torch.zeros((), device=runtime.device), 0
    for x, y in batches:
        with runtime.autocast():
            _, loss = model(x, y)
        total += loss.float()
        count += 1
    model.train()
    if count == 0:
        raise UserError("validation set produced no batches; lower train.eval_batches or add data")
    total /= count
    if runtime.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total.item()


def train_loop(model: GPT, tokenizer: Tokenizer, train_batches: BatchSource,
               make_val_batches: Optional[Callable[[], Iterable[Batch]]], cfg: RunConfig, runtime: Runtime,
               run_dir: Path, resume_from: Optional[Path] = None,
               sample_fn: Optional[Callable[[GPT], str]] = None,
               task_fn: Optional[Callable[[GPT], dict]] = None,
               checkpoint_meta: Optional[dict] = None) -> LoopResult:
    """The one training loop (pretraining and every fine-tuning mode). sample_fn writes a periodic text
    sample, task_fn runs benchmarks or task metrics (name/metric -> value); both get the plain,
    uncompiled model. checkpoint_meta goes into every checkpoint's meta.json (classifier labels, LoRA)."""
    tc = cfg.train
    run_dir = Path(run_dir)
    raw_model = model  # what is saved: never the DDP wrapper or the compiled module
    optimizer = make_optimizer(raw_model, tc, runtime.device_type)
    scaler = torch.amp.GradScaler(runtime.device_type, enabled=runtime.dtype == torch.float16)
    accum = grad_accum_steps(cfg, runtime.world_size)
    tokens_per_step = tc.micro_batch_size * cfg.model.block_size * runtime.world_size * accum

    step, best_val, evals_since_best, elapsed_before, tokens_total = 0, None, 0, 0.0, 0
    metrics = RunLoggers(run_dir, tc.loggers, run_params(raw_model.config, tc), runtime.is_main)
    if runtime.is_main:
        prepare_run_checkpoints(run_dir)  # before any step is spent: a linked latest/best is refused
    if resume_from is not None:
        state = load_trainer_state(resume_from, optimizer)
        step, best_val = state["step"], state["best_val_loss"]
        evals_since_best, elapsed_before = state["evals_since_best"], state["elapsed_s"]
        tokens_total = state.get("tokens", step * tokens_per_step)
        train_batches.load_state_dict(state["train_batches"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if runtime.world_size == state.get("world_size", 1):
            set_rng_state(state["rng"])
        if runtime.is_main:
            metrics.truncate_after(step)
        runtime.print(f"resuming from {resume_from} at step {step}")
        if step >= tc.max_steps:  # nothing to train: say so, with the loss the run ended on (not a nan)
            runtime.print(f"the run in {run_dir} is already complete at step {step} (train.max_steps "
                          f"{tc.max_steps}); to train further, raise --train.max_steps")
            losses = [r["loss"] for r in metrics.read() if "loss" in r]
            return LoopResult(step=step, train_loss=losses[-1] if losses else float("nan"), best_val_loss=best_val,
                              last_val_loss=None, tokens_per_s=0.0, elapsed_s=elapsed_before, stopped_early=False)

    if tc.activation_checkpointing:  # here, so every mode (pretraining, each fine-tuning) gets it
        raw_model.set_activation_checkpointing(True)
    if tc.compile:
        model = torch.compile(model)
    if runtime.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [runtime.local_rank] if runtime.device_type == "cuda" else None
        model = DDP(model, device_ids=ids)

    def trainer_state() -> dict:
        return {"step": step, "best_val_loss": best_val, "evals_since_best": evals_since_best,
                "elapsed_s": elapsed_before + (time.time() - t_start), "world_size": runtime.world_size,
                "train_batches": train_batches.state_dict(), "rng": rng_state(),
                "scaler": scaler.state_dict(), "tokens_per_step": tokens_per_step,
                # tokens not yet logged count too (other ranks' assumed equal), so a resumed run's total matches
                "tokens": tokens_total + int(tokens_since_log.item()) * runtime.world_size}

    def save_latest() -> None:
        if runtime.is_main:
            latest = run_dir / CHECKPOINTS / "latest"
            save_checkpoint(latest, raw_model, tokenizer, step=step, val_loss=last_val,
                            trainer_state=trainer_state(), optimizer=optimizer, extra_meta=checkpoint_meta)
            if tc.keep_checkpoints:
                keep_weights_copy(latest, run_dir / CHECKPOINTS / f"step_{step:07d}")

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.max_steps, initial=step, disable=not (tc.progress and runtime.is_main),
               unit="step", dynamic_ncols=True, desc="train")
    t_start, start_step = time.time(), step
    t_log, tokens_since_log = time.time(), torch.zeros((), device=runtime.device, dtype=torch.long)
    last_val, loss_value, tok_s, stopped_early = None, float("nan"), 0.0, False
    model.train()
    try:
        while step < tc.max_steps:
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum = torch.zeros((), device=runtime.device)
            for micro in range(accum):
                x, y = train_batches.next_batch()
                # Gradients are all-reduced only on the last micro-step of an accumulation.
                sync = nullcontext()
                if runtime.distributed and micro < accum - 1:
                    sync = model.no_sync()
                with sync:
                    with runtime.autocast():
                        _, loss = model(x, y)
                    loss = loss / accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
                tokens_since_log += batch_tokens(x, y)  # stays on the device: no sync per step
            if tc.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip)
            else:
                grad_norm = None
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step == start_step + 1 and runtime.device_type == "cpu" and runtime.is_main:
                bar.write(first_step_notice(time.time() - t_start, tc.max_steps - step))

            last_step = step == tc.max_steps
            if step % tc.log_every == 0 or last_step or step == 1:
                if runtime.distributed:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                loss_value = loss_sum.item()
                if not math.isfinite(loss_value):
                    raise UserError(f"loss became {loss_value} at step {step}; lower train.lr "
                                    "or use --train.dtype float32, then resume or start a new run")
                now = time.time()
                if runtime.distributed:
                    dist.all_reduce(tokens_since_log)
                counted = int(tokens_since_log.item())
                tokens_total += counted
                tok_s = counted / max(now - t_log, 1e-9)
                t_log = now
                tokens_since_log.zero_()
                record = {"step": step, "loss": round(loss_value, 5), "lr": lr, "tok_per_s": round(tok_s),
                          "tokens": tokens_total,
                          "elapsed_s": round(elapsed_before + now - t_start, 2)}
                if grad_norm is not None:
                    record["grad_norm"] = round(float(grad_norm), 4)
                if runtime.is_main:
                    metrics.write(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")

            out_of_time = tc.time_limit_s is not None and elapsed_before + time.time() - t_start > tc.time_limit_s
            if make_val_batches is not None and ((tc.eval_every and step % tc.eval_every == 0)
                                                 or last_step or out_of_time):
                last_val = evaluate(model, make_val_batches(), runtime)
                improved = best_val is None or last_val < best_val
                evals_since_best = 0 if improved else evals_since_best + 1
                if improved:
                    best_val = last_val
                    if runtime.is_main:
                        save_checkpoint(run_dir / CHECKPOINTS / "best", raw_model, tokenizer, step=step,
                                        val_loss=last_val, extra_meta=checkpoint_meta)
                if runtime.is_main:
                    metrics.write({"step": step, "val_loss": round(last_val, 5),
                                   "elapsed_s": round(elapsed_before + time.time() - t_start, 2),
                                   "time": round(time.time(), 3)})  # wall clock, after `best` is saved
                    if tc.plot:
                        plot_losses(metrics.read(), run_dir / "loss.png")
                    bar.write(f"step {step}: train loss {loss_value:.4f}, val loss {last_val:.4f}"
                              + (" (best)" if improved else ""))
                if tc.early_stop_patience and evals_since_best >= tc.early_stop_patience:
                    stopped_early = True
            task_every = tc.eval_tasks_every or tc.eval_every
            if task_fn is not None and runtime.is_main and (
                    (task_every and step % task_every == 0) or last_step or stopped_early or out_of_time):
                scores = task_fn(raw_model)  # through the uncompiled module: any shape, no recompiles
                raw_model.train()
                metrics.write({"step": step, **scores})
                if tc.plot:
                    plot_losses(metrics.read(), run_dir / "loss.png")
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            if sample_fn is not None and runtime.is_main and tc.sample_every and step % tc.sample_every == 0:
                text = sample_fn(raw_model)
                raw_model.train()
                metrics.write({"step": step, "sample": text})
                bar.write(f"--- sample at step {step} ---\n{text}\n---")
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or last_step or stopped_early or out_of_time:
                save_latest()
            if stopped_early or out_of_time:
                reason = "early stopping" if stopped_early else f"time limit {tc.time_limit_s}s"
                runtime.print(f"stopping at step {step}: {reason}")
                stopped_early = True
                break
    except KeyboardInterrupt:  # Ctrl-C: keep the progress, then end as an interrupt (exit 130 on the CLI)
        if step == start_step:  # no step taken: nothing new to keep (and no checkpoint of an untrained model)
            raise KeyboardInterrupt(f"at step {step}, before a step was taken: nothing saved") from None
        save_latest()
        raise KeyboardInterrupt(f"at step {step}; saved {run_dir / CHECKPOINTS / 'latest'}. "
                                "Run the same command again to resume") from None
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; a plain RuntimeError on CPU and MPS
        if not is_out_of_memory(e):
            raise
        raise UserError(f"out of memory at micro_batch_size={tc.micro_batch_size}; use a smaller "
                        "--train.micro_batch_size (and --train.tokens_per_step to keep the batch)") from None
    finally:
        bar.close()
        metrics.close()
    if runtime.distributed:
        dist.barrier()
    elapsed = elapsed_before + time.time() - t_start
    return LoopResult(step=step, train_loss=loss_value, best_val_loss=best_val, last_val_loss=last_val,
                      tokens_per_s=tok_s, elapsed_s=elapsed, stopped_early=stopped_early)
