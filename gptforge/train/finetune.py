"""Fine-tuning driver: `gptforge finetune MODE --from CHECKPOINT --finetune.data PATH`.

Every mode runs through the same steps and the one training loop (train/loop.py), so checkpoints,
metrics, plots, resume, DDP, LoRA and learning-rate sweeps work the same in all of them:
    base checkpoint -> mode reads and splits the data -> tokens added (chat roles, tags), vocabulary grown
    -> mode's head (classify) -> LoRA or partial freezing -> train_loop -> the mode's report.
What differs per mode is in modes.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

from gptforge.checkpoint import FINETUNE_META, base_fingerprint, load_model, resolve_checkpoint, run_checkpoint
from gptforge.common import Runtime, UserError, atomic_write_text, seed_everything, setup_runtime, teardown_runtime
from gptforge.config import FinetuneConfig, SampleConfig, TrainConfig
from gptforge.files import read_json
from gptforge.lora import LoRAConfig, apply_lora, count_trainable, has_lora
from gptforge.model import GPT
from gptforge.options import FinetuneOptions
from gptforge.textgen import generate_text
from gptforge.train.history import record_run_config
from gptforge.train.loop import LoopResult, resumed_accumulation, train_loop
from gptforge.train.metrics import plot_losses, plot_sweep
from gptforge.train.modes import MODES, Mode
from gptforge.train.sharded import load_for_training

@dataclasses.dataclass
class FinetuneResult:
    loop: LoopResult
    run_dir: Path
    report: dict
    trainable: int
    total: int
    sweep: Optional[list[dict]] = None


def run_finetune(mode: str, base: str, ft: FinetuneConfig, tc: TrainConfig,
                 sample: Optional[SampleConfig] = None, runtime: Optional[Runtime] = None) -> FinetuneResult:
    """Fine-tune `base` (a checkpoint or run directory) in `mode`; rerunning the same call resumes."""
    if mode not in MODES:
        raise UserError(f"unknown fine-tuning mode '{mode}'; use {', '.join(MODES)}")
    if not ft.data:
        raise UserError("fine-tuning needs data: --finetune.data PATH")
    sample = sample or SampleConfig()
    for options in (ft, tc, sample):
        options.validate()
    if tc.micro_batch_size == "auto":  # sized by trial steps of pretraining's fixed-length windows
        raise UserError("--train.micro_batch_size auto is for `gptforge train`; give fine-tuning a number")
    own_runtime = runtime is None
    runtime = runtime or setup_runtime(tc.device, tc.dtype)
    try:
        sweep = None
        if ft.lr_sweep and run_checkpoint(Path(tc.run_dir), "latest") is None:
            sweep = lr_sweep(mode, base, ft, tc, sample, runtime)
            tc = dataclasses.replace(tc, lr=_swept_lr(sweep))
            edge = " (the edge of the range tried: a rate beyond it may be better)" \
                if tc.lr in (min(ft.lr_sweep), max(ft.lr_sweep)) and len(ft.lr_sweep) > 2 else ""
            runtime.print(f"lr sweep: continuing with lr {tc.lr:g}{edge}")
        elif ft.lr_sweep:  # resuming: train on at the rate the sweep chose, not at --train.lr
            tc = dataclasses.replace(tc, lr=_swept_lr(_read_sweep(Path(tc.run_dir))))
        result = _finetune_once(mode, base, ft, tc, sample, runtime)
        result.sweep = sweep
        return result
    finally:
        if own_runtime:
            teardown_runtime(runtime)


def _finetune_once(mode_name: str, base: str, ft: FinetuneConfig, tc: TrainConfig, sample: SampleConfig,
                   runtime: Runtime, trial: bool = False) -> FinetuneResult:
    """One fine-tuning run. A trial (of an lr sweep) only trains and validates: no kept per-epoch copies, no
    samples, no final report."""
    run_dir = Path(tc.run_dir)
    base_path = resolve_checkpoint(Path(base)).resolve()
    resume_from = run_checkpoint(run_dir, "latest")
    seed_everything(tc.seed + runtime.rank)

    # The model and tokenizer: the base's, or the run's own when resuming (tokens, head, adapters included).
    model, tokenizer, meta = load_for_training(resume_from or base_path, runtime.device)
    labels = (meta.get("classifier") or {}).get("labels") if resume_from else None
    mode: Mode = MODES[mode_name](ft, labels) if mode_name == "classify" else MODES[mode_name](ft)
    if resume_from is not None:
        _check_resume(meta, mode_name, base_path, run_dir)

    if resume_from is None and has_lora(model):
        raise UserError(f"{base_path} has LoRA adapters; fold them in with `gptforge merge-lora {base_path} --out DIR` "
                        "and fine-tune from DIR")
    splits = mode.split()
    if resume_from is None:
        mode.add_tokens(tokenizer, splits)
        if tokenizer.vocab_size > model.config.vocab_size:
            model.grow_vocab(tokenizer.vocab_size)
        model = mode.build_model(model)
    block = model.config.block_size
    sources = {name: mode.batches(examples, tokenizer, block, tc.micro_batch_size, tc.seed, runtime,
                                  training=name == "train") if examples else None
               for name, examples in splits.items()}
    if sources["train"] is None:
        raise UserError(f"{ft.data}: no training examples left after the split; lower the val/test fractions")
    lora = _set_trainable(model, mode, ft)
    trainable, total = count_trainable(model)

    steps_per_epoch = sources["train"].steps_per_epoch
    if resume_from is not None:  # resumed on another number of processes, the run keeps its global batch
        steps_per_epoch = math.ceil(steps_per_epoch / resumed_accumulation(resume_from, tc, block, runtime.world_size))
    eval_every = max(1, steps_per_epoch // max(1, ft.evals_per_epoch))
    max_steps = math.ceil(ft.epochs * steps_per_epoch) if ft.epochs > 0 else tc.max_steps
    # samples at every evaluation unless --train.sample_every says otherwise
    tc = dataclasses.replace(tc, max_steps=max_steps, eval_every=eval_every, checkpoint_every=eval_every,
                             keep_checkpoints=not trial, tokens_per_step=None, eval_tasks=[],
                             sample_every=0 if trial else (tc.sample_every or eval_every))
    checkpoint_meta = {FINETUNE_META: {"mode": mode_name, "base": str(base_path), "data": str(ft.data)},
                       **mode.checkpoint_meta()}
    if lora is not None:
        checkpoint_meta.update(lora=dataclasses.asdict(lora), base=str(base_path),
                               base_fingerprint=base_fingerprint(base_path))
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _save_run_config(run_dir, mode_name, base_path, ft, tc, sample, meta["step"] if resume_from else None,
                         runtime)
        runtime.print(f"finetune {mode_name}: {trainable:,} of {total:,} parameters train"
                      f"{' (LoRA rank %d)' % lora.rank if lora else ''}; "
                      + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f" examples; "
                      f"{steps_per_epoch} steps per epoch, {max_steps} steps")

    # Metrics and reports run on the main process over whole splits (training sources hold a rank's share).
    whole = dataclasses.replace(runtime, rank=0, world_size=1)
    eval_sources = sources if runtime.world_size == 1 else {
        name: mode.batches(examples, tokenizer, block, tc.micro_batch_size, tc.seed, whole, training=False)
        if examples else None for name, examples in splits.items()}
    val = sources["val"]
    prompt = mode.sample_prompt(tokenizer, splits)
    result = train_loop(
        model, tokenizer, sources["train"], (lambda: val.iter_epoch()) if val is not None else None, tc, block,
        runtime, run_dir, resume_from=resume_from,
        sample_fn=_sampler(tokenizer, prompt, sample, tc, runtime) if prompt is not None and tc.sample_every else None,
        task_fn=(lambda m: mode.metrics(m, eval_sources, runtime)) if runtime.is_main and _has_metrics(mode) else None,
        checkpoint_meta=checkpoint_meta)

    report = {}
    if runtime.is_main and not trial:
        best = run_checkpoint(run_dir, "best") or run_checkpoint(run_dir, "latest")
        final, _, _ = load_model(best, runtime.device)  # the best epoch by validation loss
        report = mode.finish(final, tokenizer, splits, eval_sources, run_dir, sample, runtime)
        if tc.plot:
            from gptforge.train.metrics import MetricsLog

            plot_losses(MetricsLog(run_dir / "metrics.jsonl").read(), run_dir / "loss.png")
    return FinetuneResult(loop=result, run_dir=run_dir, report=report, trainable=trainable, total=total)


def _has_metrics(mode: Mode) -> bool:
    return type(mode).metrics is not Mode.metrics


def _set_trainable(model: GPT, mode: Mode, ft: FinetuneConfig) -> Optional[LoRAConfig]:
    """LoRA (adapters + head train), or only the last N blocks + final norm + head, or everything."""
    lora = None
    if ft.lora.rank:
        lora = dataclasses.replace(ft.lora, targets=list(ft.lora.targets)).validate()
        if not has_lora(model):
            apply_lora(model, lora)
        head = tuple(mode.trainable_head())
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name or name.startswith(head))
    elif ft.train_last_blocks is not None:
        n_layer = model.config.n_layer
        if not 0 <= ft.train_last_blocks <= n_layer:
            raise UserError(f"--finetune.train_last_blocks must be between 0 and {n_layer}, got {ft.train_last_blocks}")
        keep = tuple(f"transformer.h.{i}." for i in range(n_layer - ft.train_last_blocks, n_layer))
        keep += ("transformer.ln_f.", *mode.trainable_head())
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(keep))
    if has_lora(model) and not ft.lora.rank:
        raise UserError("this run trains LoRA adapters; keep --finetune.lora.rank to resume it")
    return lora


def _check_resume(meta: dict, mode: str, base: Path, run_dir: Path) -> None:
    saved = meta.get(FINETUNE_META) or {}
    if saved.get("mode") != mode or Path(saved.get("base", "")) != base:
        raise UserError(f"{run_dir} holds a {saved.get('mode', 'pretraining')} run from {saved.get('base')}; "
                        f"use a new --train.run_dir for {mode} from {base}")


def _sampler(tokenizer, prompt: list[int], sample: SampleConfig, tc: TrainConfig, runtime: Runtime):
    stops = tokenizer.chat_stop_ids if tokenizer.has_chat_template else [tokenizer.eot_id]
    params = dataclasses.replace(sample, max_new_tokens=tc.sample_tokens, num_samples=1, seed=tc.seed)

    def sample_fn(model: GPT) -> str:
        return generate_text(model, tokenizer, [prompt], params, runtime.device, stop_ids=stops,
                             truncate="left")[0]

    return sample_fn


def _save_run_config(run_dir: Path, mode: str, base: Path, ft: FinetuneConfig, tc: TrainConfig,
                     sample: SampleConfig, resume_step: Optional[int], runtime: Runtime) -> None:
    resolved = {"mode": mode, "from": str(base), "finetune": dataclasses.asdict(ft),
                "train": dataclasses.asdict(tc), "sample": dataclasses.asdict(sample)}
    record_run_config(run_dir, resolved, resume_step, runtime.print)  # a resume's changes are kept apart


# --- learning-rate sweep ----------------------------------------------------------------------------
def lr_sweep(mode: str, base: str, ft: FinetuneConfig, tc: TrainConfig, sample: SampleConfig,
             runtime: Runtime) -> list[dict]:
    """A short trial per learning rate (same data, seed and steps), each in run_dir/sweep/lr_X; prints a
    table, draws sweep.png and returns [{lr, val_loss, train_loss}]."""
    root = Path(tc.run_dir) / "sweep"
    rows = []
    for lr in ft.lr_sweep:
        trial_tc = dataclasses.replace(tc, lr=lr, run_dir=str(root / f"lr_{lr:g}"), progress=False, plot=False,
                                       sample_every=0, warmup_steps=min(tc.warmup_steps, ft.sweep_steps // 10))
        trial_ft = dataclasses.replace(ft, epochs=0, lr_sweep=[], evals_per_epoch=1)
        trial_tc = dataclasses.replace(trial_tc, max_steps=ft.sweep_steps)
        res = _finetune_once(mode, base, trial_ft, trial_tc, sample, runtime, trial=True)
        val = res.loop.last_val_loss if res.loop.last_val_loss is not None else float("nan")
        rows.append({"lr": lr, "val_loss": val, "train_loss": res.loop.train_loss})
        runtime.print(f"  lr {lr:<10g} val loss {val:.4f}  train loss {res.loop.train_loss:.4f}")
    if runtime.is_main:
        atomic_write_text(root / "sweep.json", json.dumps(rows, indent=2) + "\n")
        plot_sweep(rows, root / "sweep.png")
        runtime.print("\n".join(["", f"{'lr':>10}  {'val loss':>9}  {'train loss':>10}"]
                                + [f"{r['lr']:>10g}  {r['val_loss']:>9.4f}  {r['train_loss']:>10.4f}" for r in rows]))
    return rows


def _swept_lr(rows: list[dict]) -> float:
    return min(rows, key=lambda r: r["val_loss"])["lr"]


def _read_sweep(run_dir: Path) -> list[dict]:
    """The sweep table a run wrote before training (sweep/sweep.json), checked: it decides the resumed rate."""
    path = run_dir / "sweep" / "sweep.json"
    try:
        rows = read_json(path, run_dir)
    except FileNotFoundError:
        rows = None
    ok = isinstance(rows, list) and rows and all(
        isinstance(r, dict) and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                    for k in ("lr", "val_loss")) and r["lr"] > 0 for r in rows)
    if not ok:
        raise UserError(f"{path} is missing or corrupt, so the learning rate the sweep chose is unknown; "
                        "fine-tune into a new --train.run_dir, or resume without --finetune.lr_sweep and with "
                        "--train.lr set to the rate the run used")
    return rows


# --- the command ----------------------------------------------------------------------------------------
def finetune_command(options: FinetuneOptions) -> None:
    """`gptforge finetune`: --data is short for --finetune.data; an explicit --train.max_steps wins over
    --finetune.epochs. Prints what was trained and the mode's report."""
    ft = dataclasses.replace(options.finetune, data=options.data or options.finetune.data)
    tc = options.train
    if tc.max_steps is None:
        tc = dataclasses.replace(tc, max_steps=TrainConfig.max_steps)
    else:
        ft.epochs = 0
    result = run_finetune(options.mode, options.base, ft, tc, options.sample)
    print(f"done: {result.loop.summary()}; {result.trainable:,} of {result.total:,} parameters trained; "
          f"run directory {result.run_dir}")
    for split in ("train", "val", "test"):
        if isinstance(result.report.get(split), dict):
            stats = result.report[split]
            print(f"{split:>5}: accuracy {stats['acc']:.4f}, loss {stats['loss']:.4f} ({stats['n']} examples)")
    if "confusion" in (result.report.get("test") or {}):
        labels = result.report["labels"]
        print("test confusion matrix (rows: true, columns: predicted): " + ", ".join(labels))
        for name, row in zip(labels, result.report["test"]["confusion"]):
            print(f"  {name:>12} " + " ".join(f"{n:>6}" for n in row))
    if "test_responses" in result.report:
        print(f"test-set responses: {result.report['test_responses']}")
