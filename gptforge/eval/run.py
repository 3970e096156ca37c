"""Running tasks: on a model in hand (the training loop) or on a checkpoint (the CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch.nn as nn

from gptforge.common import Runtime, UserError, atomic_write_text, inference_runtime
from gptforge.eval.choice import ChoiceExample, choice_metrics, prediction_records, score_choices
from gptforge.eval.lm import evaluate_lm
from gptforge.eval.runtime import DTypeLike
from gptforge.eval.tasks import TASKS
from gptforge.options import EvalOptions
from gptforge.tokenizer import Tokenizer

LM_TASKS = ("loss", "perplexity")  # the same measurement under two names
DEFAULT_BATCH_SIZE = 16


def task_names() -> list[str]:
    return [*LM_TASKS, *TASKS]


def parse_tasks(spec: Union[str, Sequence[str]]) -> list[str]:
    """'hellaswag,piqa' or a list -> checked task names, duplicates removed, order kept."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    if not names:
        raise UserError(f"no task given; choose from {', '.join(task_names())}")
    unknown = [n for n in names if n not in task_names()]
    if unknown:
        raise UserError(f"unknown task '{unknown[0]}'; choose from {', '.join(task_names())}")
    return names


def load_choice_examples(task: str, data: Union[str, Path, None] = None, limit: Optional[int] = None,
                         prompt_format: str = "harness") -> list[ChoiceExample]:
    """A multiple-choice task's examples, ready for score_choices: `data` is a local file (default: the
    official validation set, downloaded once); `limit` = the first N."""
    [task] = parse_tasks([task])
    if task not in TASKS:
        raise UserError(f"{task} is not a multiple-choice task; choose from {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be positive, got {limit}")
    adapter = TASKS[task]
    return adapter.examples(adapter.load(Path(data) if data is not None else None)[:limit], prompt_format)


def run_task(model: nn.Module, tokenizer: Tokenizer, task: str, *, data: Union[str, Path, None] = None,
             split: str = "val", stride: Optional[int] = None, limit: Optional[int] = None,
             batch_size: int = DEFAULT_BATCH_SIZE, device=None, dtype: DTypeLike = None,
             predictions: Union[str, Path, None] = None, prompt_format: str = "harness",
             progress: bool = False) -> dict:
    """Evaluate `model` (plain, compiled or DDP-wrapped; put back in its mode afterwards) on one task.

    loss / perplexity: `data` is a text file or prepared folder (its `split`); `stride` as in
        evaluate_lm; `limit` = tokens. Returns loss, perplexity, bits_per_byte, tokens, bytes, stride.
    hellaswag, piqa, ...: `data` is a local file (default: the official validation set, downloaded
        once); `limit` = first N examples; `predictions` writes one JSON line per example.
        Returns acc, acc_norm, acc_per_token (each with _stderr) and n.
    batch_size: windows (loss) or choices (multiple choice) per forward pass. device: default the
    model's. dtype: autocast dtype (torch.dtype or a name such as 'bfloat16'; None = float32).
    progress: a tqdm bar on stderr (when it is a terminal). The result is flat, with "task" naming the
    task, so a training loop can log it as it is."""
    [task] = parse_tasks([task])
    if limit is not None and limit < 1:
        raise UserError(f"limit must be positive, got {limit}")
    if task in LM_TASKS:
        if data is None:
            raise UserError(f"{task} needs data: --data a text file or a prepared data folder")
        result = evaluate_lm(model, tokenizer, data, stride=stride, split=split, limit=limit,
                             batch_size=batch_size, device=device, dtype=dtype, progress=progress)
        return {**result, "task": task}
    examples = load_choice_examples(task, data, limit, prompt_format)
    scores = score_choices(model, tokenizer, examples, batch_size=batch_size, device=device, dtype=dtype,
                           progress=progress)
    if predictions is not None:
        records = prediction_records(scores, examples)
        atomic_write_text(Path(predictions), "".join(json.dumps(r) + "\n" for r in records))
    return {"task": task, **choice_metrics(scores, [ex.label for ex in examples])}


def data_per_task(data: Union[str, Path, None], names: Sequence[str]) -> dict:
    """--data for each task: one PATH for all, or 'task=PATH,task=PATH' (tasks not named get None)."""
    if data is None:
        return {name: None for name in names}
    pieces = str(data).split(",")
    pairs = [p.split("=", 1) for p in pieces if "=" in p and p.split("=", 1)[0].strip() in task_names()]
    if not pairs:
        return {name: data for name in names}
    if len(pairs) != len(pieces):
        raise UserError(f"--data {data}: give one path for all tasks, or task=PATH pairs separated by commas")
    mapping = {name.strip(): path for name, path in pairs}
    stray = [name for name in mapping if name not in names]
    if stray:
        raise UserError(f"--data names task '{stray[0]}', which is not in --task {','.join(names)}")
    return {name: mapping.get(name) for name in names}


def evaluate_checkpoint(checkpoint: Union[str, Path], tasks: Union[str, Sequence[str]], *,
                        data: Union[str, Path, None] = None, runtime: Optional[Runtime] = None,
                        predictions: Union[str, Path, None] = None, **options) -> dict:
    """Load a checkpoint (or a run directory's best/latest) and run `tasks` on it.

    data: one path for every task, or 'loss=val.txt,hellaswag=hs.jsonl' (see data_per_task).
    runtime: device and autocast dtype (default: `inference_runtime()`, the best this machine has).
    predictions: a file for one multiple-choice task; with several, each gets PATH's name with the
    task inserted (preds.jsonl -> preds.hellaswag.jsonl). Other options go to run_task.
    Returns {"checkpoint", "step", "tokenizer", "device", "dtype", "results": {task: metrics}}."""
    from gptforge.checkpoint import load_for_inference, resolve_checkpoint

    names = parse_tasks(tasks)
    data_for = data_per_task(data, names)
    runtime = runtime or inference_runtime()
    path = resolve_checkpoint(Path(checkpoint))
    model, tokenizer, meta = load_for_inference(path, runtime)
    choice_tasks = [n for n in names if n in TASKS]
    results = {}
    for name in names:
        same = next((done for done in results if done in LM_TASKS and name in LM_TASKS
                     and data_for[done] == data_for[name]), None)
        if same is not None:  # loss and perplexity are one measurement: run it once
            results[name] = {**results[same], "task": name}
            continue
        pred_path = None
        if predictions is not None and name in TASKS:
            pred_path = Path(predictions)
            if len(choice_tasks) > 1:
                pred_path = pred_path.with_name(f"{pred_path.stem}.{name}{pred_path.suffix}")
        results[name] = run_task(model, tokenizer, name, data=data_for[name], device=runtime.device,
                                 dtype=runtime.dtype, predictions=pred_path, **options)
    return {"checkpoint": str(path), "step": meta.get("step"), "tokenizer": tokenizer.describe(),
            "device": str(runtime.device), "dtype": str(runtime.dtype).removeprefix("torch."), "results": results}


def eval_command(options: EvalOptions) -> None:
    """`gptforge eval`: the results table, and the report as JSON with --json."""
    report = evaluate_checkpoint(
        options.checkpoint, options.task, runtime=options.runtime(), predictions=options.predictions,
        data=options.data, split=options.split, stride=options.stride, limit=options.limit,
        batch_size=options.batch_size, prompt_format=options.prompt_format, progress=True)
    print(format_results(report))
    if options.json:
        atomic_write_text(Path(options.json), json.dumps(jsonable(report), indent=2) + "\n")


def format_results(report: dict) -> str:
    """A one-screen table of an evaluate_checkpoint report."""
    lines = [f"checkpoint  {report['checkpoint']} (step {report['step']}, {report['tokenizer']}, "
             f"{report['device']}, {report['dtype']})", "",
             f"{'task':<12}{'metric':<16}{'value':>12}{'stderr':>10}", "-" * 50]
    for task, metrics in report["results"].items():
        shown = task
        for key, value in metrics.items():
            if key == "task" or key.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{key}_stderr")
            cells = f"{_fmt(value):>12}" + (f"{_fmt(stderr):>10}" if stderr is not None else "")
            lines.append(f"{shown:<12}{key:<16}{cells}")
            shown = ""
    return "\n".join(lines)


def jsonable(report: dict) -> dict:
    """The report with NaN (a standard error of one example) as null, so the JSON is standard."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return None if isinstance(v, float) and v != v else v

    return clean(report)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
