"""Classification with a checkpoint from `gptforge finetune classify`: texts -> a label and each class's
probability (`gptforge classify`)."""

from __future__ import annotations

from typing import Union

import torch

from gptforge.common import Runtime, as_runtime
from gptforge.data.batches import encode_labeled
from gptforge.data.examples import LabeledText
from gptforge.model import GPTClassifier
from gptforge.tokenizer import Tokenizer


def classify_texts(model: GPTClassifier, tokenizer: Tokenizer, texts: list[str], labels: list[str],
                   runtime: Union[Runtime, torch.device, str, None] = None, keep: str = "start") -> list[dict]:
    """Texts -> [{label, probabilities {name: p}}] with a trained classifier. runtime: where it runs
    (`gptforge.common.inference_runtime`; a bare device: no autocast; None: the model's device)."""
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
