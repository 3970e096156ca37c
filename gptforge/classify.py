"""Classification with a checkpoint from `gptforge finetune classify`: texts -> a label and each class's
probability. `classify_texts` is the Python API; `classify_command` is `gptforge classify` (texts from
--text, a file or standard input; results printed or written as JSONL)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Union

import torch

from gptforge.checkpoint import load_for_inference, read_meta, resolve_checkpoint
from gptforge.common import Runtime, UserError, as_runtime, atomic_write_text, read_user_text
from gptforge.data.batches import encode_labeled
from gptforge.data.examples import LabeledText
from gptforge.model import GPTClassifier
from gptforge.options import ClassifyOptions
from gptforge.terminal import input_lines
from gptforge.tokenizer import Tokenizer


def classify_texts(model: GPTClassifier, tokenizer: Tokenizer, texts: list[str], labels: list[str],
                   runtime: Union[Runtime, torch.device, str, None] = None, keep: str = "start") -> list[dict]:
    """Texts -> [{label, probabilities {name: p}}] with a trained classifier, in one forward pass. runtime:
    where it runs (`gptforge.common.inference_runtime`; a bare device: no autocast; None: the model's device)."""
    runtime = as_runtime(runtime) or Runtime(device=next(model.parameters()).device, dtype=torch.float32)
    encoded = encode_labeled([LabeledText(t, labels[0]) for t in texts], tokenizer, labels,
                             model.config.block_size, keep=keep)
    width = max(len(ids) for ids, _ in encoded.sequences)
    x = torch.full((len(texts), width), -1, dtype=torch.long)
    for row, (ids, _) in enumerate(encoded.sequences):
        x[row, :len(ids)] = torch.tensor(ids)
    model.eval()
    with torch.no_grad(), runtime.autocast():
        probs = torch.softmax(model(x.to(runtime.device))[0].float(), dim=-1).cpu()
    return [{"label": labels[int(p.argmax())], "probabilities": dict(zip(labels, map(float, p)))} for p in probs]


def classifier_labels(path: Path) -> list[str]:
    """The class names of a checkpoint, read from its meta.json before any weights load."""
    labels = (read_meta(path).get("classifier") or {}).get("labels")
    if not labels:
        raise UserError(f"{path} is not a classifier: it was not fine-tuned with `gptforge finetune classify`")
    return labels


def classify_command(options: ClassifyOptions) -> None:
    """`gptforge classify`: --text and --file lines in batches (printed, or to --out as JSONL); without
    either, each line of standard input answered at once (a pipe, or a person at the terminal)."""
    path = resolve_checkpoint(Path(options.checkpoint))
    labels = classifier_labels(path)
    runtime = options.runtime()
    model, tokenizer, _ = load_for_inference(path, runtime)

    def classify(texts: list[str]) -> list[dict]:
        size = options.batch_size
        return [result for i in range(0, len(texts), size)
                for result in classify_texts(model, tokenizer, texts[i:i + size], labels, runtime, options.keep)]

    if options.text is None and options.file is None:
        for line in input_lines(sys.stdin, "> " if sys.stdin.isatty() else None):
            if line.strip():
                print(_shown(classify([line.strip()])[0]), flush=True)
        return
    texts = list(options.text or [])
    if options.file:
        texts += [line.strip() for line in read_user_text(options.file).splitlines() if line.strip()]
    if not texts:
        raise UserError("nothing to classify: --text is empty and --file has no non-empty lines")
    results = classify(texts)
    if options.out:
        atomic_write_text(Path(options.out), "".join(json.dumps({"text": t, **r}, ensure_ascii=False) + "\n"
                                                     for t, r in zip(texts, results)))
        print(f"classified {len(texts)} texts -> {options.out}")
        return
    for text, result in zip(texts, results):
        print(f"{_shown(result)}\t{text}")


def _shown(result: dict) -> str:
    probs = ", ".join(f"{name} {p:.4f}" for name, p in result["probabilities"].items())
    return f"{result['label']}\t({probs})"
