"""Evaluation: loss / perplexity / bits per byte on text, and multiple-choice benchmarks.

    run_task(model, tokenizer, "hellaswag" | "piqa" | "loss" | "perplexity", ...) -> flat metrics dict
    evaluate_lm(model, tokenizer, text_file_or_prepared_folder, stride=...) -> loss, perplexity, bpb
    score_choices(model, tokenizer, [ChoiceExample, ...]) -> per-choice log-probabilities
    evaluate_checkpoint(path, tasks) -> what `gptforge eval` prints
    TASKS: multiple-choice adapters by name

Models may be plain, torch.compile'd or DDP-wrapped: evaluation runs the unwrapped module in eval mode
without gradients and restores its mode afterwards, so the training loop can call these mid-run.
"""

from gptforge.eval.choice import (ChoiceExample, ChoiceScore, choice_metrics, mean_and_stderr, score_choices,
                                  score_choices_one_by_one)
from gptforge.eval.lm import evaluate_lm, window_plan
from gptforge.eval.run import LM_TASKS, evaluate_checkpoint, format_results, parse_tasks, run_task, task_names
from gptforge.eval.runtime import unwrap_model
from gptforge.eval.tasks import PROMPT_FORMATS, REFERENCE_RESULTS, TASKS, ChoiceTask, harness_preprocess

__all__ = [
    "ChoiceExample", "ChoiceScore", "ChoiceTask", "LM_TASKS", "PROMPT_FORMATS", "REFERENCE_RESULTS", "TASKS",
    "choice_metrics", "evaluate_checkpoint", "evaluate_lm", "format_results", "harness_preprocess",
    "mean_and_stderr", "parse_tasks", "run_task", "score_choices", "score_choices_one_by_one", "task_names",
    "unwrap_model", "window_plan",
]
