"""THE training loop. Pretraining and every fine-tuning mode run through `train_loop`.

What varies between modes is passed in: the model (whose forward returns (logits, loss)), a train batch
source with next_batch()/state_dict()/load_state_dict(), and a factory of validation batches. A `Trainer`
runs one step at a time through named parts (train_step -> log -> validate -> hooks -> save_latest) over a
`TrainState` (train/state.py); DDP, FSDP and the rest are applied from outside the model (train/parallelize.py).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol

import torch
import torch.distributed as dist

from gptforge.checkpoint import (CHECKPOINTS, is_sharded, keep_weights_copy, load_trainer_state,
                                 prepare_run_checkpoints, save_checkpoint)
from gptforge.common import Runtime, UserError, is_out_of_memory
from gptforge.config import TrainConfig
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer
from gptforge.train.loggers import RunLoggers, run_params
from gptforge.train.metrics import plot_losses
from gptforge.train.notices import first_step_notice
from gptforge.train.optim import lr_at, make_optimizer
from gptforge.train.parallelize import parallelize
from gptforge.train.sharded import load_flat_optimizer, load_sharded, save_sharded
from gptforge.train.state import TrainState, keep_global_batch, restore_rng, trainer_state_dict

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(Protocol):
    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Hooks:
    """Work on rank 0 during training, given the plain, uncompiled model: a text sample (sample_fn), and
    benchmarks or task metrics (task_fn: name/metric -> value)."""

    sample_fn: Optional[Callable[[GPT], str]] = None
    task_fn: Optional[Callable[[GPT], dict]] = None


@dataclass
class LoopResult:
    step: int
    train_loss: float
    best_val_loss: Optional[float]
    last_val_loss: Optional[float]
    tokens_per_s: float
    elapsed_s: float
    stopped_early: bool
    is_main: bool = True  # rank 0 (or the only process): the one that reports

    def summary(self) -> str:
        """Step, losses and time, for the end-of-run line. A train loss never logged (a run found complete
        already, whose metrics are gone) is left out rather than shown as nan."""
        losses = {"train loss": self.train_loss, "best val loss": self.best_val_loss}
        shown = [f"{name} {value:.4f}" for name, value in losses.items()
                 if value is not None and math.isfinite(value)]
        return ", ".join([f"step {self.step}", *shown, f"{self.elapsed_s:.1f}s"])


def grad_accum_steps(tc: TrainConfig, block_size: int, world_size: int) -> int:
    per_micro = tc.micro_batch_size * block_size * world_size
    if not tc.tokens_per_step:
        return 1
    if tc.tokens_per_step % per_micro:
        raise UserError(
            f"train.tokens_per_step={tc.tokens_per_step} is not a multiple of micro_batch_size x "
            f"block_size x processes = {per_micro}; use a multiple such as {per_micro * max(1, tc.tokens_per_step // per_micro)}"
        )
    return tc.tokens_per_step // per_micro


def resumed_accumulation(path: Path, tc: TrainConfig, block_size: int, world_size: int) -> int:
    """Micro-batches per step of a run resumed from checkpoint `path` on `world_size` processes: as many as
    keep the global batch it was saved with (see keep_global_batch)."""
    tc = keep_global_batch(dataclasses.replace(tc, tokens_per_step=None), load_trainer_state(path), block_size,
                           world_size)
    return grad_accum_steps(tc, block_size, world_size)


def batch_tokens(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Tokens a batch trains on, for throughput: positions with a target (padding and masked prompts of
    fine-tuning batches excluded; every position in pretraining), or a classifier's real input tokens."""
    return (y != -100).sum() if y.dim() == 2 else (x >= 0).sum()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], runtime: Runtime, sharded: bool = False,
             filler: Optional[Batch] = None) -> float:
    """Mean loss over the given batches of every process. Under FSDP (`sharded`) each forward gathers
    parameters from all processes, so each runs as many: one short of batches (a small fine-tuning split
    shares out unevenly) runs its first again, or `filler` if it has none, uncounted."""
    model.eval()
    batches = list(batches)
    total = torch.tensor([0.0, len(batches)], device=runtime.device)  # summed loss, batches
    forwards = len(batches)
    if sharded and runtime.distributed:  # agreed before any forward: its gathers must pair up across ranks
        most = total[1:].clone()
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        forwards = int(most)
    for i in range(forwards):
        x, y = batches[i] if i < len(batches) else batches[0] if batches else filler
        with runtime.autocast():
            _, loss = model(x, y)
        if i < len(batches):
            total[0] += loss.float()
    if runtime.distributed:
        dist.all_reduce(total)
    model.train()
    if total[1] == 0:
        raise UserError("validation set produced no batches; lower train.eval_batches or add data")
    return (total[0] / total[1]).item()


def train_loop(model: GPT, tokenizer: Tokenizer, train_batches: BatchSource,
               make_val_batches: Optional[Callable[[], Iterable[Batch]]], tc: TrainConfig, block_size: int,
               runtime: Runtime, run_dir: Path, resume_from: Optional[Path] = None,
               sample_fn: Optional[Callable[[GPT], str]] = None,
               task_fn: Optional[Callable[[GPT], dict]] = None,
               checkpoint_meta: Optional[dict] = None) -> LoopResult:
    """The one training loop (pretraining and every fine-tuning mode): trains `model` on windows of
    `block_size` tokens as `tc` says, resuming from `resume_from` when given. sample_fn and task_fn see the
    plain model (see Hooks); checkpoint_meta goes into every checkpoint's meta.json (classifier labels, LoRA)."""
    saved = None
    if resume_from is not None:
        saved = load_trainer_state(resume_from)  # its JSON: the run's global batch decides this one's
        tc = keep_global_batch(tc, saved, block_size, runtime.world_size)
    trainer = Trainer(model, tokenizer, train_batches, make_val_batches, tc, block_size, runtime, Path(run_dir),
                      Hooks(sample_fn, task_fn), checkpoint_meta)
    if resume_from is not None:
        trainer.resume(resume_from, saved)
        if trainer.state.step >= tc.max_steps:
            return trainer.already_complete()
    return trainer.fit()



@contextmanager
def interrupts_between_steps(enabled: bool):
    """Ctrl-C ends training between steps. A KeyboardInterrupt raised while torch's autograd engine runs a
    backward pass can leave it waiting forever (seen in CI: the process hung in `_engine_run_backward`), so
    the first SIGINT only sets the flag this yields (a list, true once interrupted), which the loop reads
    before each step; a second one interrupts at once. Under several processes the old behaviour stays:
    each rank is interrupted where it is, since ranks reading a flag at different steps would wait for
    each other in a collective."""
    requested: list[bool] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def on_sigint(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(True)
        print("\ninterrupted: finishing this step, then saving (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """One training run: the parts of a step, each a method, over `state` (what a checkpoint saves with the
    model, optimizer, data cursor and RNG)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, train_batches: BatchSource,
                 make_val_batches: Optional[Callable[[], Iterable[Batch]]], tc: TrainConfig, block_size: int,
                 runtime: Runtime, run_dir: Path, hooks: Hooks, checkpoint_meta: Optional[dict]):
        self.tokenizer, self.train_batches, self.make_val_batches = tokenizer, train_batches, make_val_batches
        self.tc, self.runtime, self.run_dir, self.hooks = tc, runtime, run_dir, hooks
        self.checkpoint_meta = checkpoint_meta
        self.accum = grad_accum_steps(tc, block_size, runtime.world_size)
        self.tokens_per_step = tc.micro_batch_size * block_size * runtime.world_size * self.accum
        self.state = TrainState()
        self.metrics = RunLoggers(run_dir, tc.loggers, run_params(model.config, tc), runtime.is_main)
        if runtime.is_main:
            prepare_run_checkpoints(run_dir)  # before any step is spent: a linked latest/best is refused
        self.parallel = parallelize(model, tc, runtime)
        self.model = model  # the GPT itself, uncompiled and unwrapped (sharded in place under FSDP)
        self.optimizer = make_optimizer(model, tc, runtime.device_type)  # after the model is set up
        self.scaler = torch.amp.GradScaler(runtime.device_type, enabled=runtime.dtype == torch.float16)
        self.tokens_since_log = torch.zeros((), device=runtime.device, dtype=torch.long)  # no sync per step
        self.train_loss, self.last_val, self.tokens_per_s = float("nan"), None, 0.0
        self.started, self.elapsed_before, self.last_log = time.time(), 0.0, time.time()
        self._plain: tuple[int, Optional[GPT]] = (-1, None)  # (step, the gathered model) under FSDP
        self.last_batch: Optional[Batch] = None
        # Under FSDP every process takes part in gathering the model for rank 0's hooks: all must know of them.
        self.hooks_due = {"tasks": hooks.task_fn is not None, "samples": hooks.sample_fn is not None}
        if runtime.distributed and self.parallel.sharded:
            present = torch.tensor(list(self.hooks_due.values()), dtype=torch.long, device=runtime.device)
            dist.all_reduce(present, op=dist.ReduceOp.MAX)
            self.hooks_due = dict(zip(self.hooks_due, map(bool, present.tolist())))

    # --- resuming ------------------------------------------------------------------------------------
    def resume(self, path: Path, saved: dict) -> None:
        """Continue from checkpoint `path` (whose checked trainer/state.json is `saved`): weights (unless the
        caller loaded them), optimizer, progress, data cursor, RNG. Any checkpoint resumes under any strategy
        on any number of processes; sharded ones are resliced."""
        if is_sharded(path):
            load_sharded(path, self.model, self.optimizer, self.runtime)
        elif self.parallel.sharded:
            load_flat_optimizer(path, self.model, self.optimizer)  # weights: loaded before sharding
        else:
            load_trainer_state(path, self.optimizer)
        self.state = TrainState.from_saved(saved, self.tokens_per_step)
        self.elapsed_before = self.state.elapsed_s
        self.train_batches.load_state_dict(saved["train_batches"])
        if "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])
        restore_rng(saved, self.runtime)
        if self.runtime.is_main:
            self.metrics.truncate_after(self.state.step)
        self.runtime.print(f"resuming from {path} at step {self.state.step}")

    def already_complete(self) -> LoopResult:
        """Nothing to train: say so, with the loss the run ended on (not a nan)."""
        self.runtime.print(f"the run in {self.run_dir} is already complete at step {self.state.step} "
                           f"(train.max_steps {self.tc.max_steps}); to train further, raise --train.max_steps")
        losses = [r["loss"] for r in self.metrics.read() if "loss" in r]
        self.train_loss = losses[-1] if losses else float("nan")
        return self.result(stopped_early=False, elapsed_s=self.elapsed_before)

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self) -> LoopResult:
        from tqdm.auto import tqdm

        tc, state = self.tc, self.state
        self.bar = tqdm(total=tc.max_steps, initial=state.step, disable=not (tc.progress and self.runtime.is_main),
                        unit="step", dynamic_ncols=True, desc="train")
        self.started = self.last_log = time.time()
        start_step, stopped = state.step, False
        self.parallel.module.train()
        with interrupts_between_steps(enabled=not self.runtime.distributed) as interrupt:
            try:
                while state.step < tc.max_steps and not stopped:
                    if interrupt:  # a Ctrl-C during the last step, held until it ended
                        raise KeyboardInterrupt
                    lr, loss_sum, grad_norm = self.train_step()
                    if state.step == start_step + 1 and self.runtime.device_type == "cpu" and self.runtime.is_main:
                        self.bar.write(first_step_notice(time.time() - self.started, tc.max_steps - state.step))
                    last = state.step == tc.max_steps
                    if _every(state.step, tc.log_every) or last or state.step == 1:
                        self.log(lr, loss_sum, grad_norm)
                    out_of_time = tc.time_limit_s is not None and self.elapsed() > tc.time_limit_s
                    patience_spent = False
                    if self.make_val_batches is not None and (_every(state.step, tc.eval_every) or last or out_of_time):
                        patience_spent = self.validate()
                    stopped = patience_spent or out_of_time
                    self.run_hooks(finishing=last or stopped)
                    if _every(state.step, tc.checkpoint_every) or last or stopped:
                        self.save_latest(final=last or stopped)
                    if stopped:
                        reason = "early stopping" if patience_spent else f"time limit {tc.time_limit_s}s"
                        self.runtime.print(f"stopping at step {state.step}: {reason}")
            except KeyboardInterrupt:  # Ctrl-C: keep the progress, then end as an interrupt (exit 130 on the CLI)
                if state.step == start_step:  # no step taken: nothing new to keep (and no checkpoint of an untrained model)
                    raise KeyboardInterrupt(f"at step {state.step}, before a step was taken: nothing saved") from None
                # Each process is interrupted wherever it was: no collective may run now, so rank 0 saves alone,
                # which a sharded checkpoint cannot be.
                if self.parallel.sharded and self.runtime.distributed:
                    raise KeyboardInterrupt(f"at step {state.step}; not saved (every process writes its part of a "
                                            "sharded checkpoint, together): run the same command again to resume "
                                            "from the last checkpoint") from None
                self.save_latest(collective=False)
                raise KeyboardInterrupt(f"at step {state.step}; saved {self.run_dir / CHECKPOINTS / 'latest'}. "
                                        "Run the same command again to resume") from None
            except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; a plain RuntimeError on CPU and MPS
                if not is_out_of_memory(e):
                    raise
                raise UserError(f"out of memory at micro_batch_size={tc.micro_batch_size}; use a smaller "
                                "--train.micro_batch_size (and --train.tokens_per_step to keep the batch)") from None
            finally:
                self.bar.close()
                self.metrics.close()
        if self.runtime.distributed:
            dist.barrier()
        return self.result(stopped_early=stopped)

    def train_step(self) -> tuple[float, torch.Tensor, Optional[torch.Tensor]]:
        """One optimizer step over `accum` micro-batches: (learning rate, summed loss, gradient norm)."""
        self._plain = (-1, None)  # the weights change: a copy gathered for the last step is stale
        lr = lr_at(self.state.step, self.tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=self.runtime.device)
        for micro in range(self.accum):
            x, y = self.last_batch = self.train_batches.next_batch()
            # Gradients are all-reduced only on the last micro-step of an accumulation.
            with self.parallel.no_sync() if micro < self.accum - 1 else nullcontext():
                loss_sum += self.forward_backward(x, y)
            self.tokens_since_log += batch_tokens(x, y)
        grad_norm = self.clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.bar.update(1)
        return lr, loss_sum, grad_norm

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.runtime.autocast():
            _, loss = self.parallel.module(x, y)
        loss = loss / self.accum
        self.scaler.scale(loss).backward()
        return loss.detach()

    def clip_gradients(self) -> Optional[torch.Tensor]:
        if self.tc.grad_clip <= 0:
            return None
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor, the same everywhere

    # --- what happens between steps ------------------------------------------------------------------
    def log(self, lr: float, loss_sum: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> None:
        """A metrics line: the step's loss (averaged over processes), throughput since the last line."""
        runtime, step = self.runtime, self.state.step
        if runtime.distributed:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            dist.all_reduce(self.tokens_since_log)
        self.train_loss = loss_sum.item()
        if not math.isfinite(self.train_loss):
            raise UserError(f"loss became {self.train_loss} at step {step}; lower train.lr "
                            "or use --train.dtype float32, then resume or start a new run")
        now = time.time()
        counted = int(self.tokens_since_log.item())
        self.state.tokens += counted
        self.tokens_per_s = counted / max(now - self.last_log, 1e-9)
        self.last_log = now
        self.tokens_since_log.zero_()
        record = {"step": step, "loss": round(self.train_loss, 6), "lr": lr, "tok_per_s": round(self.tokens_per_s),
                  "tokens": self.state.tokens, "elapsed_s": round(self.elapsed(), 2)}
        if grad_norm is not None:
            record["grad_norm"] = round(float(grad_norm), 4)
        if runtime.is_main:
            self.metrics.write(record)
        self.bar.set_postfix(loss=f"{self.train_loss:.4f}", tok_s=f"{self.tokens_per_s:,.0f}", lr=f"{lr:.2e}")

    def validate(self) -> bool:
        """Validation loss; a new best is saved as `best`. Returns whether early-stopping patience is spent."""
        state, tc = self.state, self.tc
        self.last_val = evaluate(self.parallel.module, self.make_val_batches(), self.runtime, self.parallel.sharded,
                                 filler=self.last_batch)
        improved = state.best_val_loss is None or self.last_val < state.best_val_loss
        state.evals_since_best = 0 if improved else state.evals_since_best + 1
        if improved:
            state.best_val_loss = self.last_val
            self.save_best()
        if self.runtime.is_main:
            self.metrics.write({"step": state.step, "val_loss": round(self.last_val, 5),
                                "elapsed_s": round(self.elapsed(), 2),
                                "time": round(time.time(), 3)})  # wall clock, after `best` is saved
            if tc.plot:
                plot_losses(self.metrics.read(), self.run_dir / "loss.png")
            self.bar.write(f"step {state.step}: train loss {self.train_loss:.4f}, val loss {self.last_val:.4f}"
                           + (" (best)" if improved else ""))
        return bool(tc.early_stop_patience) and state.evals_since_best >= tc.early_stop_patience

    def run_hooks(self, finishing: bool) -> None:
        """Benchmarks (every eval_tasks_every, else eval_every, steps and at the end) and samples, on rank 0,
        through the plain model (uncompiled: any shape, no recompiles; under FSDP, gathered)."""
        step, tc, hooks = self.state.step, self.tc, self.hooks
        tasks = self.hooks_due["tasks"] and (_every(step, tc.eval_tasks_every or tc.eval_every) or finishing)
        samples = self.hooks_due["samples"] and _every(step, tc.sample_every)
        plain = self.plain_model() if tasks or samples else None
        if plain is None:
            return
        if tasks:
            scores = hooks.task_fn(plain)
            plain.train()
            self.metrics.write({"step": step, **scores})
            if tc.plot:
                plot_losses(self.metrics.read(), self.run_dir / "loss.png")
            self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if samples:
            text = hooks.sample_fn(plain)
            plain.train()
            self.metrics.write({"step": step, "sample": text})
            self.bar.write(f"--- sample at step {step} ---\n{text}\n---")

    def plain_model(self) -> Optional[GPT]:
        """The whole model on rank 0 (see Parallel.plain_model), gathered at most once per step."""
        if self._plain[0] != self.state.step:
            self._plain = (-1, None)  # the previous copy goes before the next is gathered
            self._plain = (self.state.step, self.parallel.plain_model())
        return self._plain[1]

    # --- checkpoints ---------------------------------------------------------------------------------
    def save_latest(self, collective: bool = True, final: bool = False) -> None:
        """checkpoints/latest: weights, optimizer and trainer state (resumable); with keep_checkpoints, a
        copy per step. Every process calls it (`collective`: all at the same step; without, rank 0 saves its
        own random state only). Under FSDP every process writes its shards; the `final` one of a run also
        gets the consolidated weights."""
        if not (collective or self.runtime.is_main):
            return
        self.state.elapsed_s = self.elapsed()
        unlogged = int(self.tokens_since_log.item()) * self.runtime.world_size  # other ranks' assumed equal
        trainer_state = trainer_state_dict(self.state, self.runtime, self.train_batches, self.scaler,
                                           self.tokens_per_step, gather_rng=collective)
        trainer_state["tokens"] += unlogged  # so a resumed run's total matches
        latest = self.run_dir / CHECKPOINTS / "latest"
        if self.parallel.sharded:
            save_sharded(latest, self.model, self.optimizer, self.tokenizer, self.runtime, step=self.state.step,
                         val_loss=self.last_val, trainer_state=trainer_state, extra_meta=self.checkpoint_meta,
                         plain=self.plain_model() if final else None)
        elif self.runtime.is_main:
            save_checkpoint(latest, self.model, self.tokenizer, step=self.state.step, val_loss=self.last_val,
                            trainer_state=trainer_state, optimizer=self.optimizer, extra_meta=self.checkpoint_meta)
        if self.tc.keep_checkpoints and self.runtime.is_main:
            keep_weights_copy(latest, self.run_dir / CHECKPOINTS / f"step_{self.state.step:07d}")

    def save_best(self) -> None:
        """checkpoints/best: the weights in one file (under FSDP gathered first), no optimizer."""
        plain = self.plain_model()
        if plain is not None:
            save_checkpoint(self.run_dir / CHECKPOINTS / "best", plain, self.tokenizer, step=self.state.step,
                            val_loss=self.last_val, extra_meta=self.checkpoint_meta)

    # --- time and the result -------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Training seconds so far, earlier runs of a resumed one included."""
        return self.elapsed_before + time.time() - self.started

    def result(self, stopped_early: bool, elapsed_s: Optional[float] = None) -> LoopResult:
        return LoopResult(step=self.state.step, train_loss=self.train_loss, best_val_loss=self.state.best_val_loss,
                          last_val_loss=self.last_val, tokens_per_s=self.tokens_per_s,
                          elapsed_s=self.elapsed() if elapsed_s is None else elapsed_s, stopped_early=stopped_early,
                          is_main=self.runtime.is_main)


def _every(step: int, interval: int) -> bool:
    """Whether `step` is one of every `interval` steps (an interval of 0 means never)."""
    return bool(interval) and step % interval == 0
