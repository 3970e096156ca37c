"""What differs between fine-tuning modes: how data is read and batched, which tokens and head a model
gets, what a periodic sample looks like, what is measured and reported. Everything else (loading,
LoRA, the loop, checkpoints, resume, sweeps) is shared, in finetune.py.

MODES, at the end, is the one list of modes: `gptforge finetune`'s choices and help come from it. So that
the CLI can read it at start-up, this module imports torch, the batch builders and the model only inside
the methods that use them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from gptforge.common import Runtime, UserError, atomic_write_text
from gptforge.config import FinetuneConfig, SampleConfig
from gptforge.data.examples import (parse_delimiters, read_conversations, read_instructions, read_labeled,
                                    read_text_corpus, split_examples)

if TYPE_CHECKING:
    from gptforge.data.batches import Encoded, EpochBatches
    from gptforge.model import GPT
    from gptforge.tokenizer import Tokenizer

SPLITS = ("train", "val", "test")


class Mode:
    name: str
    summary: str  # a few words for `gptforge finetune --help`
    val_fraction: float
    test_fraction: float = 0.0

    def __init__(self, ft: FinetuneConfig):
        self.ft = ft

    # --- data ---------------------------------------------------------------------------------------
    def read(self) -> list:
        """All examples (documents, labelled texts, instructions, conversations) in file order."""
        raise NotImplementedError

    def labels_of(self, examples: list) -> Optional[list]:
        return None  # classify stratifies its split by label

    def split(self) -> dict[str, list]:
        examples = self.read()
        ft = self.ft
        val = self.val_fraction if ft.val_fraction is None else ft.val_fraction
        test = self.test_fraction if ft.test_fraction is None else ft.test_fraction
        return split_examples(examples, val, test, seed=ft.split_seed, labels=self.labels_of(examples))

    def add_tokens(self, tokenizer: Tokenizer, splits: dict[str, list]) -> None:
        """Special tokens the mode needs (chat roles, document tags); the model's vocabulary follows."""

    def batches(self, examples: list, tokenizer: Tokenizer, block_size: int, batch_size: int, seed: int,
                runtime: Runtime, training: bool) -> EpochBatches:
        raise NotImplementedError

    # --- model --------------------------------------------------------------------------------------
    def build_model(self, base: GPT) -> GPT:
        return base

    def checkpoint_meta(self) -> dict:
        return {}

    def trainable_head(self) -> list[str]:
        """Parameter-name prefixes that train even when the body is frozen (LoRA, train_last_blocks)."""
        return []

    # --- during and after training ------------------------------------------------------------------
    def sample_prompt(self, tokenizer: Tokenizer, splits: dict[str, list]) -> Optional[list[int]]:
        return None

    def metrics(self, model: GPT, sources: dict[str, EpochBatches], runtime: Runtime) -> dict:
        return {}

    def finish(self, model: GPT, tokenizer: Tokenizer, splits: dict[str, list],
               sources: dict[str, EpochBatches], run_dir: Path, sample: SampleConfig, runtime: Runtime) -> dict:
        return {}


class TextMode(Mode):
    """Domain text: documents packed into block-sized windows with end-of-text separators."""

    name, summary, val_fraction = "text", "domain text", 0.1

    def read(self) -> list:
        spec = self.ft.delimiters
        delimiters = parse_delimiters(spec, "--finetune.delimiters") if spec else None
        return read_text_corpus(self.ft.data, documents=self.ft.documents, delimiters=delimiters).documents

    def add_tokens(self, tokenizer, splits):
        tags = sorted({doc.tag for docs in splits.values() for doc in docs if doc.tag is not None})
        if tags:
            tokenizer.add_tag_tokens(tags)

    def batches(self, examples, tokenizer, block_size, batch_size, seed, runtime, training):
        from gptforge.data.batches import PackedTextBatches, pack_documents

        return PackedTextBatches(pack_documents(examples, tokenizer), block_size, batch_size,
                                   pad_id=tokenizer.eot_id, seed=seed, rank=runtime.rank,
                                   world_size=runtime.world_size, device=runtime.device)

    def sample_prompt(self, tokenizer, splits):
        first = splits["val"][0] if splits["val"] else splits["train"][0]
        return [tokenizer.eot_id] + tokenizer.encode_tagged("", first.tag)


class ClassifyMode(Mode):
    """A classification head over the last real token; accuracy per split, a confusion matrix."""

    name, summary, val_fraction, test_fraction = "classify", "a classification head", 0.1, 0.2

    def __init__(self, ft: FinetuneConfig, labels: Optional[list[str]] = None):
        super().__init__(ft)
        self.labels = labels

    def read(self) -> list:
        data = read_labeled(self.ft.data, text_field=self.ft.text_field, label_field=self.ft.label_field)
        if len(data.class_names) < 2:
            raise UserError(f"{self.ft.data} has a single class ({data.class_names[0]!r}); a classifier needs two or more")
        if self.labels is not None and list(data.class_names) != self.labels:
            raise UserError(f"{self.ft.data} has classes {list(data.class_names)}, but this run was trained on "
                            f"{self.labels}; use a new --train.run_dir")
        self.labels = list(data.class_names)
        return data.examples

    def labels_of(self, examples):
        return [ex.label for ex in examples]

    def batches(self, examples, tokenizer, block_size, batch_size, seed, runtime, training):
        from gptforge.data.batches import ClassifyBatches, encode_labeled

        encoded = encode_labeled(examples, tokenizer, self.labels, block_size, keep=self.ft.truncate)
        return ClassifyBatches(encoded.sequences, len(self.labels), batch_size,
                                 balance=self.ft.balance if training else "none", seed=seed, rank=runtime.rank,
                                 world_size=runtime.world_size, device=runtime.device)

    def build_model(self, base: GPT) -> GPT:
        import torch

        from gptforge.model import GPTClassifier

        if isinstance(base, GPTClassifier) and base.classifier.out_features == len(self.labels):
            base.init_classifier()  # a new task: the body is reused, the head starts afresh
            return base
        with torch.device("meta"):
            model = GPTClassifier(base.config, len(self.labels))
        model = model.to_empty(device=next(base.parameters()).device)
        body = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
        model.load_state_dict(body, strict=False)  # everything but the new head
        if base.config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        model.init_classifier()  # seeded by the caller
        return model

    def checkpoint_meta(self):
        return {"classifier": {"labels": self.labels}}

    def trainable_head(self):
        return ["classifier."]

    def metrics(self, model, sources, runtime):
        out = {}
        for split in ("train", "val"):
            if sources.get(split) is not None:
                # a bounded slice of train: enough for the curve, cheap enough to run every epoch
                stats = classify_stats(model, sources[split], len(self.labels), runtime,
                                       max_batches=20 if split == "train" else None)
                out[f"{split}/acc"] = round(stats["acc"], 5)
        return out

    def finish(self, model, tokenizer, splits, sources, run_dir, sample, runtime):
        report = {"labels": self.labels}
        for split in SPLITS:
            if sources.get(split) is not None:
                report[split] = classify_stats(model, sources[split], len(self.labels), runtime)
        atomic_write_text(run_dir / "classify_report.json", json.dumps(report, indent=2) + "\n")
        return report


def classify_stats(model: GPT, source: EpochBatches, n_classes: int, runtime: Runtime,
                   max_batches: Optional[int] = None) -> dict:
    """Accuracy, mean loss and the confusion matrix (rows: true class, columns: predicted) on a split."""
    import torch

    was_training = model.training
    model.eval()
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for x, y in source.iter_epoch(max_batches=max_batches):
            with runtime.autocast():
                logits, loss = model(x, y)
            pred = logits.argmax(dim=-1).cpu()
            confusion.index_put_((y.cpu(), pred), torch.ones_like(pred), accumulate=True)
            loss_sum += loss.item() * len(y)
            n += len(y)
    model.train(was_training)
    return {"acc": confusion.diag().sum().item() / max(n, 1), "loss": loss_sum / max(n, 1), "n": n,
            "confusion": confusion.tolist()}


class SFTMode(Mode):
    """Supervised fine-tuning on (prompt, response) sequences whose loss mask the tokenizer owns."""

    def encode(self, examples: list, tokenizer: Tokenizer, block_size: int) -> Encoded:
        raise NotImplementedError

    def batches(self, examples, tokenizer, block_size, batch_size, seed, runtime, training):
        encoded = self.encode(examples, tokenizer, block_size)
        if training and (encoded.truncated or encoded.dropped):
            runtime.print(f"{self.name}: {encoded.truncated} examples cut to the {block_size}-token context, "
                          f"{encoded.dropped} left out (nothing to learn after the cut)")
        if not encoded.sequences:
            if training:
                raise UserError(f"every {self.name} training example is too long for the model's "
                                f"{block_size}-token context; use a model with a longer context or shorter data")
            return None  # a held-out split with nothing that fits is skipped
        from gptforge.data.batches import SFTBatches

        return SFTBatches(encoded.sequences, batch_size, pad_id=tokenizer.eot_id, seed=seed,
                            rank=runtime.rank, world_size=runtime.world_size, device=runtime.device)


class InstructMode(SFTMode):
    """Alpaca-style instructions; after training, responses to the test split go to test_responses.jsonl."""

    name, summary, val_fraction, test_fraction = "instruct", "Alpaca-style SFT", 0.05, 0.1

    def read(self):
        return read_instructions(self.ft.data)

    def encode(self, examples, tokenizer, block_size):
        from gptforge.data.batches import encode_instructions

        return encode_instructions(examples, tokenizer, block_size)

    def sample_prompt(self, tokenizer, splits):
        first = (splits["val"] or splits["train"])[0]
        return tokenizer.encode_instruction(first, with_response=False)[0]

    def finish(self, model, tokenizer, splits, sources, run_dir, sample, runtime):
        from gptforge.textgen import generate_text

        tests = splits["test"]
        if not tests:
            return {}
        prompts = [tokenizer.encode_instruction(ex, with_response=False)[0] for ex in tests]
        replies = generate_text(model, tokenizer, prompts, _greedy(sample, self.ft.response_tokens),
                                    runtime.device, stop_ids=[tokenizer.eot_id], truncate="left")
        rows = [{**ex, "response": reply.strip()} for ex, reply in zip(tests, replies)]
        path = run_dir / "test_responses.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return {"test_responses": str(path), "n": len(rows)}


class ChatMode(SFTMode):
    """Multi-turn chat: role tokens added to the tokenizer, loss on assistant turns only."""

    name, summary, val_fraction, test_fraction = "chat", "multi-turn SFT", 0.05, 0.05

    def read(self):
        return read_conversations(self.ft.data, oasst_paths=self.ft.oasst_paths)

    def add_tokens(self, tokenizer, splits):
        tokenizer.add_chat_tokens()

    def encode(self, examples, tokenizer, block_size):
        from gptforge.data.batches import encode_conversations

        return encode_conversations(examples, tokenizer, block_size)

    def sample_prompt(self, tokenizer, splits):
        first = (splits["val"] or splits["train"])[0]
        opening = [m for m in first if m["role"] != "assistant"][:1]
        return tokenizer.encode_chat(opening, add_generation_prompt=True)[0]


def _greedy(sample: SampleConfig, max_new_tokens: int) -> SampleConfig:
    import dataclasses

    return dataclasses.replace(sample, max_new_tokens=max_new_tokens, temperature=0.0, num_samples=1, stop=[])


MODES: dict[str, type[Mode]] = {mode.name: mode for mode in (TextMode, ClassifyMode, InstructMode, ChatMode)}
