"""Pretraining driver: config -> data -> model -> the training loop. Fine-tuning drivers reuse its pieces."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from gptforge.checkpoint import load_trainer_state, read_model_config, resolve_checkpoint, run_checkpoint
from gptforge.common import Runtime, UserError, seed_everything, setup_runtime, teardown_runtime
from gptforge.config import ModelConfig, RunConfig, resolve_model_config
from gptforge.data.loader import TokenLoader
from gptforge.data.prepare import prepare, verify_shards
from gptforge.model import GPT, count_parameters
from gptforge.tokenizer import Tokenizer, load_tokenizer
from gptforge.train.history import record_run_config
from gptforge.train.loop import LoopResult, train_loop
from gptforge.train.memory import choose_micro_batch
from gptforge.train.notices import cpu_model_notice
from gptforge.train.parallelize import resolve_strategy
from gptforge.train.sharded import load_for_training

VAL_SEED = 12345  # fixed, so every evaluation sees the same validation windows


def data_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.data.dir) if cfg.data.dir else Path(cfg.train.run_dir) / "data"


def ensure_prepared(cfg: RunConfig, runtime: Runtime) -> Path:
    """Use the prepared shard folder, preparing it from cfg.data.source first if it does not exist."""
    data_dir = data_dir_for(cfg)
    if not (data_dir / "manifest.json").exists() and runtime.is_main:
        runtime.print(f"preparing {cfg.data.source} with the {cfg.data.tokenizer} tokenizer into {data_dir}")
        prepare(cfg.data, data_dir, progress=cfg.train.progress)
    if runtime.distributed:
        import torch.distributed as dist

        dist.barrier()  # other ranks wait for rank 0's preparation
    return data_dir


def resolve_run_model(cfg: RunConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model config for this run: a preset and explicit fields, sized to the tokenizer's vocabulary."""
    if cfg.train.init_from:
        # the checkpoint fixes architecture and vocabulary; dropout is a training choice, not a weight
        model_cfg = read_model_config(resolve_checkpoint(Path(cfg.train.init_from)))
        model_cfg = dataclasses.replace(model_cfg, dropout=cfg.model.dropout)
        vocab_is_fixed = True
    else:
        model_cfg = resolve_model_config(cfg.model)
        vocab_is_fixed = model_cfg.vocab_size != ModelConfig().vocab_size  # the default means "the tokenizer's"
    if vocab_is_fixed and model_cfg.vocab_size != tokenizer.vocab_size:
        raise UserError(f"vocabulary mismatch: the model has {model_cfg.vocab_size} tokens but the data's "
                        f"{tokenizer.kind} tokenizer has {tokenizer.vocab_size}; prepare the data with the "
                        "model's tokenizer (or drop --model.vocab_size)")
    return dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size).validate()


def check_resume_compatible(saved: ModelConfig, current: ModelConfig, run_dir: Path) -> None:
    diffs = [f"{f.name} {getattr(saved, f.name)} -> {getattr(current, f.name)}"
             for f in dataclasses.fields(ModelConfig)
             if f.name != "preset" and getattr(saved, f.name) != getattr(current, f.name)]
    if diffs:
        raise UserError(f"{run_dir} holds a run with a different model ({'; '.join(diffs)}); "
                        "use a new --train.run_dir, or the original model options to resume")


def make_sample_fn(cfg: RunConfig, tokenizer: Tokenizer, runtime: Runtime):
    from gptforge.textgen import generate_text

    sample_cfg = dataclasses.replace(cfg.sample, max_new_tokens=cfg.train.sample_tokens, num_samples=1,
                                     seed=cfg.train.seed)  # seeded: must not disturb the training RNG

    def sample(model: GPT) -> str:
        return generate_text(model, tokenizer, [cfg.train.sample_prompt], sample_cfg, runtime.device)[0]

    return sample


def make_task_fn(cfg: RunConfig, tokenizer: Tokenizer, runtime: Runtime):
    """Benchmarks during training (train.eval_tasks, as build-nanogpt runs HellaSwag): the examples are
    loaded (downloaded if need be) once, before training starts, so a missing file fails at launch."""
    from gptforge.eval import choice_metrics, parse_tasks, score_choices
    from gptforge.eval.run import load_choice_examples

    tc = cfg.train
    suites = {}
    for spec in tc.eval_tasks:
        name, _, path = spec.partition("=")
        try:
            [name] = parse_tasks([name])
            suites[name] = load_choice_examples(name, path or None, tc.eval_tasks_limit or None)
        except UserError as e:  # loss and perplexity are refused too: validation loss is always measured
            raise UserError(f"train.eval_tasks: {e}") from None

    def run(model: GPT) -> dict:
        scores = {}
        for name, examples in suites.items():
            result = choice_metrics(score_choices(model, tokenizer, examples, device=runtime.device,
                                                  dtype=runtime.dtype), [ex.label for ex in examples])
            scores.update({f"{name}/acc": round(result["acc"], 5), f"{name}/acc_norm": round(result["acc_norm"], 5)})
        return scores

    return run


def run_training(cfg: RunConfig, runtime: Optional[Runtime] = None) -> LoopResult:
    """`gptforge train`: prepare data if needed, build or resume the model, run the loop."""
    cfg.validate()
    own_runtime = runtime is None
    runtime = runtime or setup_runtime(cfg.train.device, cfg.train.dtype)
    try:
        run_dir = Path(cfg.train.run_dir)
        data_dir = ensure_prepared(cfg, runtime)
        manifest = verify_shards(data_dir, cfg.data.verify)
        tokenizer = load_tokenizer(data_dir / "tokenizer", root=data_dir)
        model_cfg = resolve_run_model(cfg, tokenizer)
        cfg = dataclasses.replace(cfg, model=model_cfg, data=dataclasses.replace(cfg.data, dir=str(data_dir)))
        resume_from = run_checkpoint(run_dir, "latest")
        if resume_from is not None:
            check_resume_compatible(read_model_config(resume_from), model_cfg, run_dir)

        seed_everything(cfg.train.seed + runtime.rank)
        if resume_from is not None or cfg.train.init_from:
            source = resume_from if resume_from is not None else Path(cfg.train.init_from)
            model, _, _ = load_for_training(source, runtime.device)  # a sharded `latest` is read by the loop
            model = _with_dropout(model, model_cfg.dropout)
        else:
            model = GPT(model_cfg).to(runtime.device)
        if cfg.train.micro_batch_size == "auto":  # decided here, so config.yaml keeps the choice
            strategy = resolve_strategy(cfg.train.strategy, runtime)
            cfg = dataclasses.replace(cfg, train=choose_micro_batch(model, cfg.train, runtime, strategy))
        if runtime.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            record_run_config(run_dir, dataclasses.asdict(cfg), _step_of(resume_from), runtime.print)
            runtime.print(f"model: {count_parameters(model):,} parameters, {model_cfg.n_layer} layers, "
                          f"{model_cfg.n_head} heads, {model_cfg.n_embd} dims, context {model_cfg.block_size}; "
                          f"tokenizer {tokenizer.describe()}; data {manifest['splits']['train']['tokens']:,} "
                          f"train tokens; device {runtime.device}, {str(runtime.dtype).replace('torch.', '')}")
            notice = cpu_model_notice(count_parameters(model), runtime.device_type)
            if notice:
                runtime.print(notice)

        tc = cfg.train
        loader_args = dict(batch_size=tc.micro_batch_size, block_size=model_cfg.block_size, rank=runtime.rank,
                           world_size=runtime.world_size, sampling=tc.sampling, device=runtime.device)
        train_batches = TokenLoader(data_dir, "train", seed=tc.seed, **loader_args)
        has_val = manifest["splits"].get("val", {}).get("tokens", 0) > model_cfg.block_size

        def val_batches():
            loader = TokenLoader(data_dir, "val", seed=VAL_SEED, **{**loader_args, "sampling": "random"})
            return (loader.next_batch() for _ in range(tc.eval_batches))

        if not has_val:
            runtime.print("no validation split large enough for one window: training without validation")
        return train_loop(model, tokenizer, train_batches, val_batches if has_val else None, tc,
                          model_cfg.block_size, runtime, run_dir, resume_from=resume_from,
                          sample_fn=make_sample_fn(cfg, tokenizer, runtime) if tc.sample_every else None,
                          task_fn=make_task_fn(cfg, tokenizer, runtime) if tc.eval_tasks and runtime.is_main else None)
    finally:
        if own_runtime:
            teardown_runtime(runtime)


def _with_dropout(model: GPT, p: float) -> GPT:
    import torch.nn as nn

    model.config = dataclasses.replace(model.config, dropout=p)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    for block in model.transformer.h:
        block.attn.dropout = p
    return model


def _step_of(checkpoint: Optional[Path]) -> Optional[int]:
    return None if checkpoint is None else load_trainer_state(checkpoint)["step"]

