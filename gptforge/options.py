"""The options of each `gptforge` command, as typed dataclasses: gptforge/cli.py derives the parser from
them, their field docstrings are `--help`, and `validate()` checks every value before any work starts.

How a dataclass becomes a command's options (jsonargparse's `add_class_arguments`):
- a field without a default is a positional argument (`checkpoint`); a keyword-only one without a
  default is a required option (`--out`);
- a field holding a config dataclass is a group: `sample: SampleConfig` gives `--sample.*`;
- inheriting RuntimeOptions gives `--device` and `--dtype`, the same in every command that runs a model
  (InferenceOptions adds `--quantize` to those that only run one);
- a field's metadata may ask for what a signature cannot say (`--from`, an option that repeats).
The sections (model, data, train, finetune, sample) are gptforge/config.py's dataclasses. This module is
light (no torch), so the parser is built at once.
"""

from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Optional

from jsonargparse import ActionYesNo

from gptforge.checks import check_ranges
from gptforge.common import UserError
from gptforge.config import DataConfig, FinetuneConfig, SampleConfig, TrainConfig

if TYPE_CHECKING:
    from gptforge.common import Runtime

def argparse_only(**kwargs) -> dict:
    """Field metadata for what a type cannot express: {"flag": "--from"} names the option; other keys go to
    argparse's add_argument (action="append": an option given once per value; ActionYesNo: a switch that
    takes no value)."""
    return {"argparse": kwargs}


@dataclass(kw_only=True)
class RuntimeOptions:
    """Where the model runs."""

    device: str = "auto"
    """cpu, cuda, cuda:N, mps, or auto (CUDA, then MPS, then CPU)."""
    dtype: str = "auto"
    """Autocast dtype: auto (bfloat16 on capable GPUs, else float32), float32, bfloat16, float16."""

    def runtime(self) -> "Runtime":
        from gptforge.common import inference_runtime

        return inference_runtime(self.device, self.dtype)

    def validate(self):
        return self


@dataclass(kw_only=True)
class InferenceOptions(RuntimeOptions):
    """Where the model runs and which weights it computes with: the options of every command that only
    runs a model (generate, chat, classify, eval, serve)."""

    quantize: str = "auto"
    """The weights a CPU model computes with: auto (f32 on a CPU in float32, else none), f32 (the
    checkpoint's float32 weights through our kernels: the same results up to float32 rounding, ~2x faster
    one-token steps), int8 (a quarter of the memory; fastest), bf16 (half), or none (torch's own layers,
    the reference)."""

    def runtime(self) -> "Runtime":
        from gptforge.common import inference_runtime

        return inference_runtime(self.device, self.dtype, self.quantize)


@dataclass
class PrepareOptions:
    """Tokenize a corpus into token shards plus a manifest and tokenizer."""

    data: DataConfig = field(default_factory=DataConfig)
    overwrite: bool = False
    """Replace an existing prepared folder."""

    def validate(self) -> "PrepareOptions":
        self.data.validate()
        return self


@dataclass
class GenerateOptions(InferenceOptions):
    """Generate text from a checkpoint or run directory."""

    checkpoint: str
    """Checkpoint directory, or a run directory (uses best, else latest)."""
    prompt: Optional[str] = None
    """Text to continue. Default: start from the end-of-text token."""
    prompt_file: Optional[str] = None
    """Read the prompt from this file."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    stream: str = "auto"
    """Print tokens as they are generated: true, false, or auto (when the output is a terminal)."""
    truncate: Optional[str] = None
    """'left' keeps the last tokens of a prompt longer than the context window."""

    def validate(self) -> "GenerateOptions":
        if self.truncate not in (None, "left"):
            raise UserError(f"--truncate takes 'left', got {self.truncate!r}")
        if self.stream not in ("auto", "true", "false"):
            raise UserError(f"--stream takes auto, true or false, got {self.stream!r}")
        self.sample.validate()
        return self

    def streams(self, out) -> bool:
        """Whether to stream to `out`: as asked, or (auto) when it is a terminal someone watches."""
        return self.stream == "true" or (self.stream == "auto" and out.isatty())


@dataclass
class QuickstartOptions(RuntimeOptions):
    """Download the built-in Shakespeare corpus, train a small character-level model on it with a fixed recipe
    (about a minute on a laptop CPU), print samples and say how to serve it."""

    run_dir: str = "runs/quickstart"
    """Where the run is written."""
    steps: Optional[int] = None
    """Train this many steps instead of the recipe's 3000 (fewer: a quick smoke test; quality drops)."""

    def validate(self) -> "QuickstartOptions":
        check_ranges(self, "--", {"steps": "[1, inf)"})
        return self


@dataclass
class FinetuneOptions:
    """Fine-tune a checkpoint, in any mode with LoRA. Running it again on the same run directory resumes."""

    mode: str
    """The fine-tuning mode (the modes are listed above)."""
    _: KW_ONLY
    base: str = field(metadata=argparse_only(flag="--from", type=str, required=True))
    """Base checkpoint or run directory (e.g. one made by train or import-gpt2)."""
    data: Optional[str] = None
    """Training data (same as --finetune.data)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # unset max_steps: --finetune.epochs decides the length; given: it wins (see FinetuneConfig.epochs)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=None))
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> "FinetuneOptions":
        for section in (self.finetune, self.train, self.sample):
            section.validate()
        return self


@dataclass
class MergeLoraOptions:
    """Fold a LoRA checkpoint's adapters into full weights (a plain checkpoint)."""

    checkpoint: str
    """LoRA checkpoint or run directory (uses best, else latest)."""
    _: KW_ONLY
    out: str
    """Checkpoint directory to write."""

    def validate(self) -> "MergeLoraOptions":
        return self


@dataclass
class ConsolidateOptions:
    """Write a sharded (FSDP) checkpoint's weights as one file, in place (docs/scale.md)."""

    checkpoint: str
    """Sharded checkpoint, or a run directory (uses its latest)."""

    def validate(self) -> "ConsolidateOptions":
        return self


@dataclass
class ClassifyOptions(InferenceOptions):
    """Classify texts with a checkpoint from `gptforge finetune classify`: the label and each class's
    probability. Without --text or --file, classifies each line read from standard input until end of input."""

    checkpoint: str
    """Classifier checkpoint or run directory (uses best, else latest)."""
    text: Optional[list[str]] = field(default=None, metadata=argparse_only(type=str, action="append"))
    """A text to classify; repeat for several."""
    file: Optional[str] = None
    """Classify each non-empty line of this file."""
    out: Optional[str] = None
    """Write {text, label, probabilities} per text to this JSONL file instead of printing."""
    keep: str = "start"
    """start or end: which part of a text longer than the context window is read."""
    batch_size: int = 32
    """Texts per forward pass."""

    def validate(self) -> "ClassifyOptions":
        check_ranges(self, "--", {"batch_size": "[1, inf)"})
        return self


@dataclass
class ChatOptions(InferenceOptions):
    """Chat with a checkpoint from `gptforge finetune chat` in the terminal. Replies stream as they are written;
    the oldest turns are forgotten when the context window is full. /reset clears the conversation, /exit or
    Ctrl-D quits. With piped input, each line is a message and only replies are printed."""

    checkpoint: str
    """Chat checkpoint or run directory (uses best, else latest)."""
    system: Optional[str] = None
    """System message that starts the conversation."""
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> "ChatOptions":
        self.sample.validate()
        return self


@dataclass(kw_only=True)
class EndpointOptions:
    """An LLM behind an OpenAI-compatible endpoint (gptforge.client.ChatClient)."""

    endpoint: str
    """API base of an OpenAI-compatible server, e.g. http://localhost:11434/v1 (Ollama)."""
    model: str
    """Model name the server knows."""
    api_key: Optional[str] = None
    """Sent as a Bearer token. Default: the GPTFORGE_API_KEY environment variable."""
    timeout: float = 60.0
    """Seconds to wait on the server per request."""
    retries: int = 3
    """Retries of a request that timed out or failed with a connection error, 429 or 5xx."""

    def key(self) -> Optional[str]:
        return self.api_key or os.environ.get("GPTFORGE_API_KEY") or None

    def validate(self):
        # a socket takes no timeout beyond what time_t holds: a day is far beyond any sane wait
        check_ranges(self, "--", {"timeout": "(0, 86400]", "retries": "[0, inf)"})
        return self


@dataclass
class JudgeOptions(EndpointOptions):
    """Score responses (the JSONL that `finetune instruct` writes: instruction, input, output, response) 0-100
    with an LLM judge behind an OpenAI-compatible endpoint; prints the mean and the distribution."""

    responses: str
    """JSONL file with instruction, output and response per line."""
    out: Optional[str] = None
    """Write each item with its score to this JSONL file."""
    concurrency: int = 1
    """Requests in flight at once."""
    json: Optional[str] = None
    """Also write the summary to this JSON file."""

    def validate(self) -> "JudgeOptions":
        super().validate()
        check_ranges(self, "--", {"concurrency": "[1, inf)"})
        return self


@dataclass(kw_only=True)
class SynthOptions(EndpointOptions):
    """Generate a fine-tuning corpus with an LLM behind an OpenAI-compatible endpoint: one document per reply,
    delimited, deduplicated. Running it again continues up to --n (the file is the state)."""

    prompt_file: str
    """The request for one document; {tag} is replaced by a tag from --tags."""
    n: int = 1000
    """Documents the output file should hold."""
    out: str
    """Text file the documents are appended to."""
    delimiters: str = "<DOC>,</DOC>"
    """OPEN,CLOSE around each document (give the same to `gptforge finetune text --finetune.delimiters`)."""
    tags: Optional[str] = None
    """Comma-separated tags, balanced across documents and written as <DOC tag="x">."""
    temperature: float = 1.0
    """Sampling temperature of the generating model."""
    max_tokens: Optional[int] = None
    """Longest reply, in the model's tokens."""
    concurrency: int = 4
    """Requests in flight at once."""
    max_misses: int = 50
    """Stop after this many requests in a row without a new document."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> "SynthOptions":
        super().validate()
        check_ranges(self, "--", {"n": "[1, inf)", "temperature": "[0, inf)", "max_tokens": "[1, inf)",
                                  "concurrency": "[1, inf)", "max_misses": "[1, inf)"})
        return self


@dataclass
class ImportOptions:
    """Import GPT-2 weights (Hugging Face model id or folder, or OpenAI's original TensorFlow checkpoint
    folder) as a gptforge checkpoint."""

    source: str
    """gpt2, gpt2-medium, gpt2-large, gpt2-xl, openai-community/..., a Hugging Face model folder, or an OpenAI
    checkpoint folder."""
    _: KW_ONLY
    out: str
    """Checkpoint directory to write."""
    tokenizer: Optional[str] = None
    """gpt2, byte, or a gptforge tokenizer/checkpoint folder. Default: the tokenizer the source carries, else
    GPT-2's when the model has 50257 tokens."""
    revision: Optional[str] = None
    """Branch, tag or commit of a Hugging Face model id (default: main)."""

    def validate(self) -> "ImportOptions":
        return self


@dataclass
class ExportOptions:
    """Export a checkpoint as a Hugging Face transformers model folder."""

    checkpoint: str
    """Checkpoint directory, or a run directory (uses best, else latest)."""
    _: KW_ONLY
    out: str
    """Folder to write (config.json, model.safetensors, tokenizer)."""

    def validate(self) -> "ExportOptions":
        return self


@dataclass
class ExportGGUFOptions:
    """Export a checkpoint as one GGUF file for llama.cpp (llama-server, Ollama, LM Studio): architecture gpt2,
    with the tokenizer and chat template."""

    checkpoint: str
    """Checkpoint directory, or a run directory (uses best, else latest)."""
    _: KW_ONLY
    out: str
    """GGUF file to write."""
    type: str = "f32"
    """Weight type: f32 (exact), f16 (half the size) or q8_0 (int8 blocks, about a quarter)."""
    force: bool = field(default=False, metadata=argparse_only(action=ActionYesNo))
    """Replace an existing --out file."""

    def validate(self) -> "ExportGGUFOptions":
        return self


@dataclass
class ExportONNXOptions:
    """Export a checkpoint as an ONNX folder for onnxruntime: one decoder with a key/value cache, tokenizer.json
    and genai_config.json."""

    checkpoint: str
    """Checkpoint directory, or a run directory (uses best, else latest)."""
    _: KW_ONLY
    out: str
    """Folder to write (model.onnx, tokenizer.json, ...)."""
    int8: bool = field(default=False, metadata=argparse_only(action=ActionYesNo))
    """Store weights as int8 (onnxruntime's dynamic quantization): about a quarter of the size."""
    force: bool = field(default=False, metadata=argparse_only(action=ActionYesNo))
    """Replace an earlier export at --out."""

    def validate(self) -> "ExportONNXOptions":
        return self


@dataclass
class EvalOptions(InferenceOptions):
    """Evaluate a checkpoint: loss/perplexity on text or prepared shards, or a multiple-choice benchmark."""

    checkpoint: str
    """Checkpoint directory, or a run directory (uses best, else latest)."""
    task: str = "hellaswag"
    """loss, perplexity, hellaswag, piqa; several comma-separated (e.g. loss,hellaswag)."""
    data: Optional[str] = None
    """loss/perplexity: a UTF-8 text file or a prepared data folder. Benchmarks: a local file in the original
    schema (.jsonl, .arrow or a datasets folder); default: the official validation file, downloaded once into
    the cache. With several tasks: task=PATH pairs, comma-separated (loss=val.txt,hellaswag=hs.jsonl)."""
    split: str = "val"
    """Split of a prepared data folder: val or train."""
    stride: Optional[int] = None
    """loss/perplexity: new tokens scored per window. Default: the context length (non-overlapping windows);
    smaller gives each token more context, at more cost."""
    limit: Optional[int] = None
    """Evaluate only the first N examples (benchmarks) or tokens (loss), for quick runs."""
    batch_size: int = 16
    """Rows per forward pass: choices (benchmarks) or windows (loss)."""
    prompt_format: str = "harness"
    """harness (lm-evaluation-harness prompts; published numbers use these) or plain (raw text, as
    build-nanogpt/llm.c)."""
    predictions: Optional[str] = None
    """Write per-example predictions of a benchmark to this JSONL file."""
    json: Optional[str] = None
    """Also write the results to this JSON file."""

    def validate(self) -> "EvalOptions":
        check_ranges(self, "--", {"stride": "[1, inf)", "limit": "[1, inf)", "batch_size": "[1, inf)"})
        return self


@dataclass
class RunsOptions:
    """List the training runs in a folder: kind, step, best validation loss, tokens, size, last update."""

    dir: str = field(default="runs", metadata=argparse_only(flag="dir", nargs="?", type=str, default="runs"))
    """The folder holding run directories (or one run directory)."""

    def validate(self) -> "RunsOptions":
        return self


@dataclass
class CompletionOptions:
    """Print a shell completion script. bash: `source <(gptforge completion bash)` (or save it under
    ~/.local/share/bash-completion/completions/gptforge); zsh: `source <(gptforge completion zsh)` in ~/.zshrc."""

    shell: str
    """bash or zsh."""

    def validate(self) -> "CompletionOptions":
        if self.shell not in ("bash", "zsh"):
            raise UserError(f"completion scripts exist for bash and zsh, got {self.shell!r}")
        return self

