"""Self-describing checkpoint directories, written atomically and loaded without pickle.

A checkpoint directory holds:
    model.safetensors      weights of the unwrapped, uncompiled model (tied weights stored once)
    model_config.json      ModelConfig
    tokenizer/             the tokenizer (tokenizer.json)
    meta.json              format version, step, validation loss, what else is inside
    trainer/               only in resumable checkpoints: optimizer tensors (safetensors) + JSON state
                           (step, data-loader position, RNG states, ...)
A sharded checkpoint (written under FSDP, gptforge/train/sharded.py) holds shards/ (each process's part of
the weights and optimizer state, safetensors) instead of model.safetensors and trainer/optimizer.safetensors,
and gains model.safetensors when it is consolidated (`gptforge consolidate`; the last one of a run is).
Fine-tuned checkpoints say what they hold in meta.json: "classifier": {"labels": [...]} adds a
classification head (GPTClassifier); "lora": {config} + "base": PATH marks an adapter-only checkpoint, whose
model.safetensors holds only the trained tensors (adapters, a head) and whose frozen weights are read from
the base checkpoint (grown to this vocabulary, deterministically, if tokens were added);
`merge_lora_checkpoint` folds the adapters in and writes a plain checkpoint.
A run directory holds config.yaml, metrics.jsonl, loss.png and checkpoints/{latest,best,step_N}/.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge import __version__
from gptforge.checks import checked, from_dict
from gptforge.common import Runtime, UserError, check_replaceable, recover_interrupted_swap, write_dir_atomically
from gptforge.config import ModelConfig
from gptforge.files import read_json, regular_file, safetensors_header
from gptforge.lora import LoRAConfig, apply_lora, has_lora, merge_lora
from gptforge.model import GPT, GPTClassifier
from gptforge.options import MergeLoraOptions
from gptforge.quantize import quantize_model
from gptforge.tokenizer import Tokenizer, load_tokenizer
from gptforge.trainer_state import (check_trainer_state, flatten_optimizer_state, restore_optimizer,  # noqa: F401
                                    unflatten_optimizer_state)

FORMAT_VERSION = 1
WEIGHTS, MODEL_CONFIG, META, TOKENIZER_DIR, TRAINER_DIR = (
    "model.safetensors", "model_config.json", "meta.json", "tokenizer", "trainer")
CHECKPOINTS = "checkpoints"
SHARDS = "shards"  # a sharded checkpoint's tensors (see gptforge/train/sharded.py)
FINETUNE_META = "finetune"  # meta.json key of a fine-tuned checkpoint: {mode, base, data}


# --- weights --------------------------------------------------------------------------------------
def model_state_for_saving(model: GPT, adapters_only: bool = False) -> dict[str, torch.Tensor]:
    if adapters_only:  # the base checkpoint has everything frozen; keep what training changed
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as transformer.wte.weight
    return state


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    """safetensors' save_file, whose I/O errors (a full disk above all) become the OSError they are."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code:
            raise OSError(int(code.group(1)), str(e), str(path)) from None
        raise


def save_checkpoint(path: Path, model: GPT, tokenizer: Tokenizer, step: int = 0,
                    val_loss: Optional[float] = None, trainer_state: Optional[dict] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, extra_meta: Optional[dict] = None) -> None:
    """Write a checkpoint directory atomically. With trainer_state/optimizer it can resume training."""

    adapters_only = bool((extra_meta or {}).get("lora"))
    if adapters_only != has_lora(model):
        raise ValueError("a model with LoRA adapters is saved with extra_meta lora + base, and only then")
    weights = model_state_for_saving(model, adapters_only)
    optimizer_tensors, layout = flatten_optimizer_state(optimizer.state_dict()) if optimizer else ({}, None)
    size = sum(t.nbytes for t in (*weights.values(), *optimizer_tensors.values()))

    def fill(d: Path) -> None:
        save_tensors(weights, d / WEIGHTS)
        describe_checkpoint(d, model.config, tokenizer, step=step, val_loss=val_loss,
                            resumable=trainer_state is not None, extra_meta=extra_meta)
        if trainer_state is not None:
            (d / TRAINER_DIR).mkdir()
            (d / TRAINER_DIR / "state.json").write_text(json.dumps(trainer_state, indent=2))
            if optimizer is not None:
                save_tensors(optimizer_tensors, d / TRAINER_DIR / "optimizer.safetensors")
                (d / TRAINER_DIR / "optimizer.json").write_text(json.dumps(layout))

    write_dir_atomically(Path(path), fill, size_hint=size)


def describe_checkpoint(d: Path, config: ModelConfig, tokenizer: Tokenizer, step: int, val_loss: Optional[float],
                        resumable: bool, extra_meta: Optional[dict] = None) -> None:
    """What makes folder `d` a checkpoint besides its tensors: model_config.json, tokenizer/, meta.json."""
    (d / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    tokenizer.save(d / TOKENIZER_DIR)
    meta = {"format": FORMAT_VERSION, "gptforge": __version__, "step": step, "val_loss": val_loss,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumable": resumable,
            "tokenizer": tokenizer.describe(), **(extra_meta or {})}
    (d / META).write_text(json.dumps(meta, indent=2))


# --- reading: every file is checked before anything is built from it ------------------------------
def read_checkpoint_json(path: Path, name: str) -> Any:
    """A JSON file of checkpoint `path`, read by gptforge.files.read_json (bounded, confined to the
    checkpoint folder, UTF-8)."""
    try:
        return read_json(Path(path) / name, root=path)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no {name}; it is incomplete or not a checkpoint") from None


def read_model_config(path: Path) -> ModelConfig:
    values = read_checkpoint_json(path, MODEL_CONFIG)
    try:
        return from_dict(ModelConfig, values, where=MODEL_CONFIG).validate()
    except UserError as e:
        raise UserError(f"checkpoint {path}: {e}") from None


@dataclass
class ClassifierMeta:
    labels: list[str]


@dataclass
class FinetuneMeta:
    mode: str
    base: str
    data: str


# Types of the meta.json keys gptforge writes. Keys it does not know are kept but not used.
META_FIELDS: dict[str, Any] = {
    "format": int, "gptforge": str, "step": int, "val_loss": Optional[float], "created": str,
    "resumable": bool, "tokenizer": str, "classifier": ClassifierMeta, "lora": LoRAConfig, "base": str,
    "base_fingerprint": str, "finetune": FinetuneMeta, "imported_from": str, "source_layout": str,
    "revision": Optional[str], "merged_from": str, "sharded": int}


def read_meta(path: Path) -> dict:
    meta = read_checkpoint_json(path, META)
    where = f"{Path(path) / META}"
    if not isinstance(meta, dict):
        raise UserError(f"{where} must be a mapping, got {type(meta).__name__}; the checkpoint is corrupt")
    for key, annotation in META_FIELDS.items():
        if key in meta:
            checked(meta[key], annotation, f"{where}: {key}")
    if meta.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer gptforge (format {meta['format']}); upgrade gptforge")
    labels = meta["classifier"]["labels"] if "classifier" in meta else None
    if labels is not None and (not labels or len(set(labels)) != len(labels)):
        raise UserError(f"{where}: classifier.labels must be distinct class names, got {labels[:5]}")
    if meta.get("lora"):
        checked(meta.get("base"), str, f"{where}: base (the base checkpoint of LoRA adapters)")
        _lora_config(meta, where)
    return meta


def _lora_config(meta: dict, where: str) -> LoRAConfig:
    try:
        return from_dict(LoRAConfig, meta["lora"], "lora").validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """Load weights, tokenizer and meta from a checkpoint or run directory, checking they agree: every JSON
    file typed, the weights file's header against the tensors the config implies, all before the model is
    built or any tensor read."""
    path = resolve_checkpoint(path)
    config, meta, tokenizer = _describe(path)
    if is_sharded(path) and not (path / WEIGHTS).exists():
        raise UserError(f"{path} is a sharded checkpoint (FSDP: each process wrote its part); write its weights "
                        f"as one file with `gptforge consolidate {path}`, then use it")
    labels = (meta.get("classifier") or {}).get("labels")
    lora = _lora_config(meta, str(path / META)) if meta.get("lora") else None
    check_weights(path, expected_shapes(config, labels, lora), adapters_only=lora is not None)
    state = _read_weights(path)
    model = _structure(config, labels, lora)
    if lora is not None:
        trained = set(state)  # adapters and any head: trainable again, as when they were saved
        state = {**_base_state(path, meta, config), **state}
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise UserError(f"{path / WEIGHTS} does not match {MODEL_CONFIG}: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{path / WEIGHTS} does not match {MODEL_CONFIG}: {str(e).splitlines()[-1].strip()}") from None
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.to(device), tokenizer, meta


def load_for_inference(path: Path, runtime: "Runtime") -> tuple[GPT, Tokenizer, dict]:
    """load_model onto the runtime's device, its weights packed once as the runtime asks (`--quantize`:
    gptforge.quantize): where every inference command (generate, chat, classify, eval, serve) loads."""
    model, tokenizer, meta = load_model(path, runtime.device)
    if runtime.weights is not None:
        quantize_model(model, None if runtime.weights == "f32" else runtime.weights)
    return model, tokenizer, meta


def model_without_weights(path: Path) -> tuple[GPT, Tokenizer, dict]:
    """The model a checkpoint describes (a classifier head, LoRA adapters: trainable as fine-tuning left them),
    its tensors allocated on the CPU but not read; with the tokenizer and meta. For a sharded checkpoint, whose
    tensors gptforge/train/sharded.py then reads into it."""
    path = Path(path)
    config, meta, tokenizer = _describe(path)
    labels = (meta.get("classifier") or {}).get("labels")
    lora = _lora_config(meta, str(path / META)) if meta.get("lora") else None
    model = _structure(config, labels, lora)
    if lora is not None:  # what fine-tuning trains with LoRA: the adapters and a classifier head
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name or name.startswith("classifier."))
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model, tokenizer, meta


def _describe(path: Path) -> tuple[ModelConfig, dict, Tokenizer]:
    """A checkpoint's config, meta and tokenizer, each checked, and checked to agree."""
    config = read_model_config(path)
    meta = read_meta(path)
    tokenizer = load_tokenizer(path / TOKENIZER_DIR, root=path)
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(
            f"vocabulary mismatch in {path}: the model has {config.vocab_size} tokens but its tokenizer has "
            f"{tokenizer.vocab_size}; the checkpoint's tokenizer/ folder does not belong to these weights"
        )
    return config, meta, tokenizer


def _structure(config: ModelConfig, labels: Optional[list[str]], lora: Optional[LoRAConfig]) -> GPT:
    """The model's modules on the meta device (no memory): a classifier head, adapters."""
    with torch.device("meta"):
        model = GPTClassifier(config, len(labels)) if labels else GPT(config)
    if lora is not None:
        apply_lora(model, lora)
    return model


def expected_shapes(config: ModelConfig, labels: Optional[list[str]] = None,
                    lora: Optional[LoRAConfig] = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of this config stores, without building the model: a
    one-block model is built on the meta device (no memory) and its block's names repeated per layer."""
    with torch.device("meta"):
        one = dataclasses.replace(config, n_layer=1)
        model = GPTClassifier(one, len(labels)) if labels else GPT(one)
        if lora is not None:
            apply_lora(model, lora)
    shapes = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("transformer.h.0."):
            for i in range(config.n_layer):
                shapes[f"transformer.h.{i}.{name.removeprefix('transformer.h.0.')}"] = tuple(tensor.shape)
        else:
            shapes[name] = tuple(tensor.shape)
    if config.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def check_weights(path: Path, expected: dict[str, tuple[int, ...]], adapters_only: bool = False) -> None:
    """The weights file's header against `expected`: the same names (a subset for adapters), the same
    shapes, one floating-point dtype. Reads the header only."""
    where = Path(path) / WEIGHTS
    try:
        header = safetensors_header(where, root=path)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no {WEIGHTS}; it is incomplete") from None
    missing = [] if adapters_only else sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where} does not match {MODEL_CONFIG}: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}; the weights and the config do not belong together")
    for name, (_, shape) in header.items():
        if shape != expected[name]:
            raise UserError(f"{where} does not match {MODEL_CONFIG}: tensor {name} has shape {shape}, the "
                            f"config implies {expected[name]}; the weights and the config do not belong together")
    dtypes = sorted({dtype for dtype, _ in header.values()})
    if len(dtypes) > 1 or not set(dtypes) <= FLOAT_DTYPES:
        raise UserError(f"{where} holds tensors of dtype {', '.join(dtypes)}; a checkpoint's weights share one "
                        "floating-point dtype (F32, BF16, F16 or F64)")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(regular_file(path / WEIGHTS, root=path)), device="cpu")
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no {WEIGHTS}; it is incomplete") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / WEIGHTS} is corrupt ({e}); use another checkpoint") from None


def _base_state(path: Path, meta: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The frozen weights of an adapter checkpoint: its base model's, grown to this vocabulary."""
    base = Path(meta["base"])
    if not is_checkpoint(base):
        raise UserError(f"{path} holds LoRA adapters for the base model {base}, which is missing; restore "
                        "it, or use a checkpoint merged with `gptforge merge-lora`")
    if read_meta(base).get("lora"):  # also what keeps a base naming itself from recursing forever
        raise UserError(f"{path} names {base} as its base model, but that holds LoRA adapters itself; the base "
                        "of adapters is a full checkpoint")
    if meta.get("base_fingerprint") not in (None, base_fingerprint(base)):
        raise UserError(f"{path} holds LoRA adapters for the base model {base}, whose weights have changed since "
                        "(e.g. a run's checkpoints/best moved on); fine-tune from a fixed copy of the base, or "
                        "merge adapters with `gptforge merge-lora` while the base is unchanged")
    base_config = read_model_config(base)
    same = ("vocab_size", "dropout", "preset")  # what fine-tuning may change
    if dataclasses.replace(base_config, **{k: getattr(config, k) for k in same}) != config or \
            base_config.vocab_size > config.vocab_size:
        raise UserError(f"{path} holds LoRA adapters for a model unlike its base {base} ({MODEL_CONFIG} "
                        "differs beyond added tokens); the adapters do not belong to that base")
    base_model, _, _ = load_model(base, "cpu")
    if base_model.config.vocab_size != config.vocab_size:
        base_model.grow_vocab(config.vocab_size)  # as fine-tuning did: same rows, same init
    state = base_model.state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_trainer_state(path: Path, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Trainer JSON state, checked; also restores the optimizer in place when given."""
    d = Path(path) / TRAINER_DIR
    try:
        state = check_trainer_state(read_json(d / "state.json", root=path), d / "state.json")
        if optimizer is not None:
            tensors = load_file(str(regular_file(d / "optimizer.safetensors", root=path)))
            restore_optimizer(optimizer, tensors, read_json(d / "optimizer.json", root=path), d)
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {path} cannot resume training: {Path(e.filename).name} is missing") from None
    except SafetensorError as e:
        raise UserError(f"trainer state in {path} is corrupt ({str(e).splitlines()[0]}); "
                        "start a new run directory or restore the checkpoint") from None
    return state


def base_fingerprint(path: Path) -> str:
    """Identifies a checkpoint's weights cheaply (no hashing of gigabytes): step, creation time, file size."""
    meta = read_meta(path)
    return f"{meta.get('step')}:{meta.get('created')}:{(Path(path) / WEIGHTS).stat().st_size}"


def refuse_to_replace(out: Path, keeps: tuple[str, ...], what: str) -> None:
    """An existing non-empty folder is only replaced when it holds one of `keeps` (a previous output):
    write_dir_atomically swaps the whole folder, and a mistyped --out must not delete someone's files."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not any((out / k).exists() for k in keeps))):
        raise UserError(f"{out} exists and is not {what}; choose a new or empty --out folder")


# --- finding checkpoints ----------------------------------------------------------------------
def is_checkpoint(path: Path) -> bool:
    return (Path(path) / MODEL_CONFIG).is_file()


def is_sharded(path: Path) -> bool:
    """Written by FSDP: every process's part of the weights and optimizer in shards/ (train/sharded.py)."""
    return (Path(path) / SHARDS).is_dir()


def run_checkpoint(run_dir: Path, name: str) -> Optional[Path]:
    """checkpoints/<name> of a run directory, if it exists (repairing an interrupted swap and removing
    the temp folders of killed writers)."""
    path = Path(run_dir) / CHECKPOINTS / name
    recover_interrupted_swap(path)
    return path if is_checkpoint(path) else None


def prepare_run_checkpoints(run_dir: Path) -> None:
    """Before a run writes checkpoints/{latest,best}: refuse one that is a symbolic link, and remove what
    killed writers left (temp dirs, a swap cut in half)."""
    for name in ("latest", "best"):
        path = Path(run_dir) / CHECKPOINTS / name
        check_replaceable(path)
        recover_interrupted_swap(path)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or a run directory's best (else latest) checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint or run directory not found: {path}")
    if is_checkpoint(path):
        return path
    for name in ("best", "latest"):
        found = run_checkpoint(path, name)
        if found:
            return found
    raise UserError(f"{path} is neither a checkpoint (no {MODEL_CONFIG}) nor a run directory with "
                    f"{CHECKPOINTS}/best or {CHECKPOINTS}/latest")


def keep_weights_copy(latest: Path, kept: Path) -> None:
    """checkpoints/step_N (keep_checkpoints, fine-tuning's per-epoch copies): `latest` without its trainer
    state, which only `latest` needs to resume (the optimizer's moments alone are twice the weights). A
    sharded `latest` (FSDP) is copied whole: its shards hold the weights and the optimizer together."""
    import shutil

    sharded = is_sharded(latest)

    def fill(d: Path) -> None:
        skip = [] if sharded else [TRAINER_DIR]
        shutil.copytree(latest, d, dirs_exist_ok=True,
                        ignore=lambda folder, names: skip if Path(folder) == Path(latest) else [])
        if not sharded:
            (d / META).write_text(json.dumps({**read_meta(d), "resumable": False}, indent=2))

    write_dir_atomically(Path(kept), fill)


# --- merging adapters ---------------------------------------------------------------------------------
def merge_lora_checkpoint(path: Path, out: Path) -> Path:
    """A LoRA checkpoint -> a plain checkpoint with the adapters folded into the weights."""
    refuse_to_replace(Path(out), (MODEL_CONFIG,), "a gptforge checkpoint")
    model, tokenizer, meta = load_model(path, "cpu")
    if not meta.get("lora"):
        raise UserError(f"{path} has no LoRA adapters to merge; it is already a full checkpoint")
    merge_lora(model)
    kept = {k: v for k, v in meta.items() if k in (FINETUNE_META, "classifier")}
    save_checkpoint(Path(out), model, tokenizer, step=meta.get("step", 0), val_loss=meta.get("val_loss"),
                    extra_meta={**kept, "merged_from": str(Path(path).resolve())})
    return Path(out)


def merge_lora_command(options: MergeLoraOptions) -> None:
    """`gptforge merge-lora`."""
    out = merge_lora_checkpoint(Path(options.checkpoint), Path(options.out))
    print(f"merged {options.checkpoint} -> {out}")
