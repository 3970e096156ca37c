"""Typed configuration: the dataclasses below ARE the config.

The CLI (jsonargparse) and YAML files only override their fields; field docstrings become `--help`
text. The fully resolved config is written into every run directory as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from gptforge.checks import check_ranges
from gptforge.common import UserError

SEED_MAX = 2**64 - 1  # torch.manual_seed takes any unsigned 64-bit seed


@dataclass
class ModelConfig:
    """GPT-2 architecture hyper-parameters."""

    preset: Optional[str] = None
    """Start from a named preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, baby, small-cpu, tiny; PRESETS below);
    fields set explicitly override it."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Number of attention heads per block."""
    n_embd: int = 768
    """Embedding (residual stream) width; must be divisible by n_head."""
    block_size: int = 1024
    """Context window in tokens (size of the learned positional embedding)."""
    vocab_size: int = 50257
    """Vocabulary size; taken from the tokenizer when training on prepared data."""
    vocab_multiple: int = 64
    """Pad the embedding/logit matrix to a multiple of this for speed; padded logits are never sampled."""
    dropout: float = 0.0
    """Dropout probability (0 for pretraining, ~0.1 for small data)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2: True)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head (GPT-2: True)."""

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> "ModelConfig":
        # positivity first: the divisibility test below divides by n_head
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple"):
            value = getattr(self, name)
            if value <= 0:
                raise UserError(f"model.{name} must be positive, got {value}")
            if value > MODEL_LIMITS[name]:
                raise UserError(f"model.{name}={value} is beyond the largest supported ({MODEL_LIMITS[name]:,}); "
                                "check the value")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                "pick an n_embd that is a multiple of n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.parameter_count > MAX_PARAMETERS:
            raise UserError(f"this model would have {self.parameter_count:,} parameters, beyond the largest "
                            f"supported ({MAX_PARAMETERS:,}); check n_layer, n_embd, block_size and vocab_size")
        return self

    @property
    def parameter_count(self) -> int:
        """Parameters the model has (tied head counted once); from the sizes alone, nothing is built."""
        C, V, biases = self.n_embd, self.padded_vocab_size, int(self.bias)
        per_block = 12 * C * C + 2 * C + 11 * C * biases  # 4 matrices (3C, C, 4C, 4C rows), 2 LayerNorms
        head = 0 if self.tie_embeddings else V * C
        return self.n_layer * per_block + (V + self.block_size) * C + C * (1 + biases) + head


# Largest sizes a model config may ask for, in one place. Far above any GPT-2 (xl: 48 layers, 1600 wide,
# context 1024, 1.6B parameters), far below what would hang or exhaust memory while the model is built;
# a checkpoint is further held to the tensors its weights file actually holds.
MODEL_LIMITS = {"n_layer": 1024, "n_head": 1024, "n_embd": 65536, "block_size": 1 << 20,
                "vocab_size": 1 << 24, "vocab_multiple": 1 << 16}
MAX_PARAMETERS = 200_000_000_000


# GPT-2 sizes are OpenAI's; `baby` is nanoGPT's Shakespeare-char model; `tiny` is for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
    "baby": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False),
    "small-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, bias=False),
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=True),
}


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Apply `cfg.preset` underneath the fields the user changed from their defaults."""
    if cfg.preset is None:
        return cfg.validate()
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown model preset '{cfg.preset}'; choose one of: {', '.join(PRESETS)}")
    defaults, values = dataclasses.asdict(ModelConfig()), dataclasses.asdict(cfg)
    for key, value in PRESETS[cfg.preset].items():
        if values[key] == defaults[key]:
            values[key] = value
    return ModelConfig(**values).validate()


@dataclass
class DataConfig:
    """Where training text comes from and how it is tokenized into shards."""

    source: str = "shakespeare"
    """What to prepare: a .txt file, a folder of .txt files, a .jsonl/.parquet file, 'hf:NAME' for a
    Hugging Face dataset (or a local dataset folder saved with save_to_disk), or 'shakespeare'."""
    dir: Optional[str] = None
    """Prepared shard directory (output of `prepare`, input of `train`)."""
    tokenizer: str = "gpt2"
    """Tokenizer: gpt2 (GPT-2 BPE), char (characters of the corpus), byte (256 bytes), bpe (trained on
    the corpus), or a path to a saved tokenizer directory."""
    bpe_vocab_size: int = 8192
    """Vocabulary size when training a bpe tokenizer."""
    text_field: str = "text"
    """Field holding the text in JSONL/Parquet/Hugging Face sources."""
    hf_split: str = "train"
    """Split to read from a Hugging Face dataset."""
    hf_config: Optional[str] = None
    """Configuration name of a Hugging Face dataset, if it has several."""
    val_fraction: float = 0.1
    """Fraction held out for validation (the tail of a single file; every k-th document otherwise)."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file."""
    num_proc: int = 0
    """Tokenization processes (0 = all CPU cores)."""
    max_documents: Optional[int] = None
    """Stop after this many documents (handy for a quick look at a huge dataset)."""
    verify: str = "fast"
    """Check shards against manifest.json when training opens them (sha256, ids inside the vocabulary): full
    (every start), fast (only shards changed in size or modification time since they last passed) or off."""

    def validate(self) -> "DataConfig":
        check_ranges(self, "data.", {"bpe_vocab_size": "[1, inf)", "val_fraction": "[0, 1)",
                                    "shard_tokens": "[1, inf)", "num_proc": "[0, inf)", "max_documents": "[1, inf)"})
        return self


@dataclass
class TrainConfig:
    """The training loop: optimisation, schedule, evaluation, checkpoints."""

    run_dir: str = "runs/default"
    """Run directory; running `train` again on an existing one resumes from its latest checkpoint."""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps, or auto (CUDA, then MPS, then CPU)."""
    dtype: str = "auto"
    """float32, bfloat16, float16 (autocast + GradScaler), or auto (bf16 on capable GPUs, else fp32)."""
    strategy: str = "auto"
    """How processes share the work: ddp (each holds the whole model), fsdp (each holds 1/N of the weights,
    gradients and optimizer state; sharded checkpoints that resume on any number of processes), single (one
    process), or auto (ddp under torchrun with several processes, else single). See docs/scale.md."""
    allow_batch_change: bool = False
    """Let a resumed run train with another global batch (tokens per step) than it was saved with."""
    compile: bool = False
    """Compile the model with torch.compile."""
    activation_checkpointing: bool = False
    """Recompute each block's activations during backward instead of keeping them: much less memory per
    sequence (larger micro-batches or models fit) for up to a third more compute per step."""
    seed: int = 1337
    """Random seed for initialisation, data order and dropout."""
    micro_batch_size: Union[int, str] = 12
    """Sequences per forward pass per process, or auto (train only): the largest that fits in memory, keeping
    --train.tokens_per_step by gradient accumulation (docs/scale.md)."""
    tokens_per_step: Optional[int] = None
    """Target tokens per optimizer step; gradient accumulation is derived from it (None = one micro-batch
    per process)."""
    max_steps: int = 2000
    """Total optimizer steps."""
    time_limit_s: Optional[float] = None
    """Stop (after a final evaluation and checkpoint) once training has run this many seconds."""
    lr: float = 1e-3
    """Peak learning rate (of AdamW; Muon's is muon_lr, following the same schedule)."""
    optimizer: str = "adamw"
    """adamw, or muon (orthogonalised momentum for hidden matrices, AdamW for the rest)."""
    muon_lr: float = 0.02
    """Peak learning rate of Muon's hidden-matrix updates."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    lr_decay_steps: Optional[int] = None
    """Steps over which the cosine decays (None = max_steps)."""
    weight_decay: float = 0.1
    """AdamW weight decay (applied to weight matrices and embeddings, not to biases or LayerNorm)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    sampling: str = "random"
    """Batch sampling: random windows (nanoGPT) or sequential passes (build-nanogpt)."""
    eval_every: int = 250
    """Validation every N steps (0 = never, except at the end)."""
    eval_batches: int = 20
    """Micro-batches per validation estimate."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    sample_every: int = 0
    """Generate a sample every N steps (0 = never)."""
    sample_prompt: str = "\n"
    """Prompt for periodic samples."""
    sample_tokens: int = 64
    """Tokens per periodic sample."""
    eval_tasks: list[str] = field(default_factory=list)
    """Benchmarks run during training and logged with the losses, e.g. [hellaswag]. Each is NAME or
    NAME=PATH (local data file; by default the task's public file is downloaded and cached)."""
    eval_tasks_every: int = 0
    """Run eval_tasks every N steps and at the end (0 = at every validation, see eval_every)."""
    eval_tasks_limit: int = 200
    """Examples per task per run (0 = all of them)."""
    checkpoint_every: int = 500
    """Write the `latest` checkpoint every N steps (and always at the end)."""
    keep_checkpoints: bool = False
    """Also keep a copy of every periodic checkpoint as checkpoints/step_NNNNNNN."""
    early_stop_patience: int = 0
    """Stop when validation loss has not improved for this many evaluations (0 = off)."""
    init_from: Optional[str] = None
    """Start from this checkpoint's weights instead of random initialisation."""
    plot: bool = True
    """Redraw loss.png in the run directory at every evaluation."""
    progress: bool = True
    """Show a progress bar."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where metrics, hyperparameters and samples go: jsonl (metrics.jsonl + loss.png, always on), tensorboard
    (events in <run_dir>/tensorboard; pip install 'gptforge[tensorboard]'), wandb (pip install 'gptforge[wandb]';
    WANDB_MODE=offline keeps it on this machine)."""

    def validate(self) -> "TrainConfig":
        if isinstance(self.micro_batch_size, str) and self.micro_batch_size != "auto":
            raise UserError(f"train.micro_batch_size must be a positive integer or auto, got {self.micro_batch_size!r}")
        check_ranges(self, "train.", {
            **({} if self.micro_batch_size == "auto" else {"micro_batch_size": "[1, inf)"}),
            "seed": f"[0, {SEED_MAX}]", "tokens_per_step": "[1, inf)",
            "max_steps": "[1, inf)", "time_limit_s": "(0, inf)", "lr": "(0, inf)", "muon_lr": "(0, inf)",
            "muon_momentum": "[0, 1)", "min_lr_ratio": "[0, 1]", "warmup_steps": "[0, inf)",
            "lr_decay_steps": "[1, inf)", "weight_decay": "[0, inf)", "beta1": "[0, 1)", "beta2": "[0, 1)",
            "grad_clip": "[0, inf)", "eval_every": "[0, inf)", "eval_batches": "[1, inf)", "log_every": "[1, inf)",
            "sample_every": "[0, inf)", "sample_tokens": "[1, inf)", "eval_tasks_every": "[0, inf)",
            "eval_tasks_limit": "[0, inf)", "checkpoint_every": "[0, inf)", "early_stop_patience": "[0, inf)"})
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise UserError(f"train.loggers: unknown logger {unknown[0]!r}; choose from {', '.join(LOGGERS)}")
        return self


LOGGERS = ("jsonl", "tensorboard", "wandb")  # gptforge/train/loggers.py writes each

# LoRA target name -> module paths inside a Block (matched as the last two parts of a module's name)
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.c_attn", "attn.c_proj"),
    "qkv": ("attn.c_attn",),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
}


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA): which Linear layers get them and how big they are."""

    rank: int = 8
    """Rank r of each adapter (trainable parameters per layer: r * (in + out)). In `gptforge finetune`, 0
    (its default there) means no adapters: every weight trains."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank, so changing rank keeps its size."""
    dropout: float = 0.0
    """Dropout on the adapter's input (the base path is unaffected)."""
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    """Layers to adapt in every block: attn (c_attn + attn.c_proj), qkv (c_attn only), mlp (c_fc +
    mlp.c_proj). All of attn and mlp is the default: adapting every linear layer closes most of the gap
    to full fine-tuning (QLoRA, Dettmers et al. 2023)."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoRAConfig":
        if isinstance(self.targets, str):  # "attn,mlp" as typed on a command line
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not isinstance(self.rank, int):
            raise UserError(f"lora rank must be a positive integer, got {self.rank!r}")
        check_ranges(self, "lora.", {"rank": "[1, inf)", "alpha": "(0, inf)", "dropout": "[0, 1)"})
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            what = f"unknown lora target(s) {unknown}" if unknown else "no lora targets given"
            raise UserError(f"{what}; choose from {', '.join(LORA_TARGETS)}")
        return self


@dataclass
class FinetuneConfig:
    """What `gptforge finetune MODE` adds to the training options (--train.*), which keep their meaning."""

    data: str = ""
    """Training data: text (.txt file/folder or .jsonl {text, tag}), classify (.tsv/.csv/.jsonl text+label),
    instruct (Alpaca .json/.jsonl), chat (.jsonl conversations or an OpenAssistant tree export)."""
    epochs: float = 3.0
    """Passes over the training split; sets the number of steps, unless --train.max_steps is given: an explicit
    step count wins (0 = use --train.max_steps; the Python API counts epochs unless this is 0)."""
    evals_per_epoch: int = 1
    """Validation (and a per-epoch checkpoint) this many times per epoch."""
    val_fraction: Optional[float] = None
    """Share of examples for validation (default: text 0.1, classify 0.1, instruct 0.05, chat 0.05)."""
    test_fraction: Optional[float] = None
    """Share held out for testing (default: classify 0.2, instruct 0.1, chat 0.05, text 0)."""
    split_seed: int = 0
    """Seed of the train/val/test split (separate from --train.seed so the test set never moves)."""
    documents: str = "paragraph"
    """text: 'paragraph' (a blank line ends a document) or 'file' (each file is one document)."""
    delimiters: Optional[str] = None
    """text: 'OPEN,CLOSE' (e.g. '<LOC>,</LOC>'): each span is a document; <LOC tag="x"> tags it."""
    text_field: str = "text"
    """classify: column/field holding the text (a number = column index in a headerless file)."""
    label_field: str = "label"
    """classify: column/field holding the label."""
    balance: str = "none"
    """classify: none, downsample (each epoch, the majority classes down to the smallest) or oversample."""
    train_last_blocks: Optional[int] = None
    """classify: train only the last N blocks, the final norm and the head (default: everything)."""
    truncate: str = "start"
    """classify: keep the 'start' or the 'end' of texts longer than the context."""
    oasst_paths: str = "all"
    """chat, OpenAssistant trees: 'all' root-to-leaf paths or only the 'top'-ranked one."""
    response_tokens: int = 256
    """instruct: tokens per generated test-set response (test_responses.jsonl)."""
    lr_sweep: list[float] = field(default_factory=list)
    """Learning rates to try first (e.g. [1e-4,3e-4,1e-3]): a short trial each, then training with the best."""
    sweep_steps: int = 50
    """Steps per learning-rate trial."""
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=0))
    """LoRA adapters (--finetune.lora.rank R > 0): only they (and a classifier head) train."""

    def validate(self) -> "FinetuneConfig":
        check_ranges(self, "finetune.", {
            "epochs": "[0, inf)", "evals_per_epoch": "[1, inf)", "val_fraction": "[0, 1)", "test_fraction": "[0, 1)",
            "split_seed": f"[0, {SEED_MAX}]", "train_last_blocks": "[0, inf)", "response_tokens": "[1, inf)",
            "lr_sweep": "(0, inf)", "sweep_steps": "[1, inf)"})
        check_ranges(self.lora, "finetune.lora.", {"rank": "[0, inf)", "alpha": "(0, inf)", "dropout": "[0, 1)"})
        if self.lora.rank:
            try:
                self.lora.validate()  # the targets
            except UserError as e:
                raise UserError(f"finetune.lora.targets: {e} (e.g. --finetune.lora.targets '[attn,mlp]')") from None
        return self


@dataclass
class SampleConfig:
    """How to sample text from a model.

    The defaults (temperature 0.8, top-k 200) are nanoGPT's sample.py's, kept for `generate`, `chat` and the
    samples training writes: a little less diversity for text that reads well from small, briefly trained
    models. The engine (SamplingParams) and the HTTP API default to the model's own distribution
    (temperature 1, no top-k), as OpenAI's API does, so API clients get what they expect; this is the one
    place the difference is decided (--sample.temperature 1 --sample.top_k null gives the API's)."""

    max_new_tokens: int = 200
    """Tokens to generate per sample."""
    temperature: float = 0.8
    """Softmax temperature (0 = greedy)."""
    top_k: Optional[int] = 200
    """Keep only the k most likely tokens (None = off)."""
    top_p: Optional[float] = None
    """Nucleus sampling: keep the smallest set with cumulative probability >= p (None = off)."""
    repetition_penalty: float = 1.0
    """Divide logits of tokens already present by this (>1 discourages repeats; 1 = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop when any of these strings is generated."""
    seed: Optional[int] = None
    """Random seed for reproducible samples."""
    num_samples: int = 1
    """Samples per prompt (generated as one batch)."""

    def validate(self) -> "SampleConfig":
        check_ranges(self, "sample.", {
            "max_new_tokens": "[1, inf)", "temperature": "[0, inf)", "top_k": "[0, inf)", "top_p": "(0, 1]",
            "repetition_penalty": "(0, inf)", "seed": f"[0, {SEED_MAX}]", "num_samples": "[1, inf)"})
        return self


@dataclass
class RunConfig:
    """Everything that describes one training run; saved as config.yaml in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> "RunConfig":
        """Every section's ranges, before any work (the model's preset and fields included)."""
        resolve_model_config(self.model)
        for section in (self.data, self.train, self.sample):
            section.validate()
        return self
