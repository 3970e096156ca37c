"""Self-describing checkpoint directories, written atomically and loaded without pickle.

A checkpoint directory holds:
    model.safetensors      weights of the unwrapped, uncompiled model (tied weights stored once)
    model_config.json      ModelConfig
    tokenizer/             the tokenizer (tokenizer.json)
    meta.json              format version, step, validation loss, what else is inside
    trainer/               only in resumable checkpoints: optimizer tensors (safetensors) + JSON state
                           (step, data-loader position, RNG states, ...)
Fine-tuned checkpoints say what they hold in meta.json: "classifier": {"labels": [...]} adds a
classification head (GPTClassifier); "lora": {config} + "base": PATH marks an adapter-only checkpoint, whose
model.safetensors holds only the trained tensors (adapters, a head) and whose frozen weights are read from
the base checkpoint (grown to this vocabulary, deterministically, if tokens were added).
A run directory holds config.yaml, metrics.jsonl, loss.png and checkpoints/{latest,best,step_N}/.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge import __version__
from gptforge.common import UserError, recover_interrupted_swap, write_dir_atomically
from gptforge.config import ModelConfig, from_dict
from gptforge.lora import LoRAConfig, apply_lora, has_lora
from gptforge.model import GPT, GPTClassifier
from gptforge.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
WEIGHTS, MODEL_CONFIG, META, TOKENIZER_DIR, TRAINER_DIR = (
    "model.safetensors", "model_config.json", "meta.json", "tokenizer", "trainer")
CHECKPOINTS = "checkpoints"


# --- weights --------------------------------------------------------------------------------------
def model_state_for_saving(model: GPT, adapters_only: bool = False) -> dict[str, torch.Tensor]:
    if adapters_only:  # the base checkpoint has everything frozen; keep what training changed
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as transformer.wte.weight
    return state


def save_checkpoint(path: Path, model: GPT, tokenizer: Tokenizer, step: int = 0,
                    val_loss: Optional[float] = None, trainer_state: Optional[dict] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, extra_meta: Optional[dict] = None) -> None:
    """Write a checkpoint directory atomically. With trainer_state/optimizer it can resume training."""

    adapters_only = bool((extra_meta or {}).get("lora"))
    if adapters_only != has_lora(model):
        raise ValueError("a model with LoRA adapters is saved with extra_meta lora + base, and only then")

    def fill(d: Path) -> None:
        save_file(model_state_for_saving(model, adapters_only), str(d / WEIGHTS))
        (d / MODEL_CONFIG).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
        tokenizer.save(d / TOKENIZER_DIR)
        meta = {"format": FORMAT_VERSION, "gptforge": __version__, "step": step, "val_loss": val_loss,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumable": trainer_state is not None,
                "tokenizer": tokenizer.describe(), **(extra_meta or {})}
        (d / META).write_text(json.dumps(meta, indent=2))
        if trainer_state is not None:
            (d / TRAINER_DIR).mkdir()
            (d / TRAINER_DIR / "state.json").write_text(json.dumps(trainer_state, indent=2))
            if optimizer is not None:
                tensors, layout = flatten_optimizer_state(optimizer.state_dict())
                save_file(tensors, str(d / TRAINER_DIR / "optimizer.safetensors"))
                (d / TRAINER_DIR / "optimizer.json").write_text(json.dumps(layout))

    write_dir_atomically(Path(path), fill)


def read_model_config(path: Path) -> ModelConfig:
    try:
        values = json.loads((Path(path) / MODEL_CONFIG).read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no {MODEL_CONFIG}; it is incomplete or not a checkpoint") from None
    except json.JSONDecodeError:
        raise UserError(f"{Path(path) / MODEL_CONFIG} is corrupt (not JSON)") from None
    return from_dict(ModelConfig, values, where=MODEL_CONFIG).validate()


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """Load weights, tokenizer and meta from a checkpoint or run directory, checking they agree."""
    path = resolve_checkpoint(path)
    config = read_model_config(path)
    meta = read_meta(path)
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(
            f"vocabulary mismatch in {path}: the model has {config.vocab_size} tokens but its tokenizer has "
            f"{tokenizer.vocab_size}; the checkpoint's tokenizer/ folder does not belong to these weights"
        )
    state = _read_weights(path)
    with torch.device("meta"):
        labels = (meta.get("classifier") or {}).get("labels")
        model = GPTClassifier(config, len(labels)) if labels else GPT(config)
    if meta.get("lora"):
        trained = set(state)  # adapters and any head: trainable again, as when they were saved
        state = {**_base_state(path, meta, config), **state}
        apply_lora(model, LoRAConfig(**meta["lora"]))
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


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / WEIGHTS), device="cpu")
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no {WEIGHTS}; it is incomplete") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path / WEIGHTS} is corrupt ({e}); use another checkpoint") from None


def _base_state(path: Path, meta: dict, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The frozen weights of an adapter checkpoint: its base model's, grown to this vocabulary."""
    base = Path(meta.get("base") or "")
    if not is_checkpoint(base):
        raise UserError(f"{path} holds LoRA adapters for the base model {base}, which is missing; restore "
                        "it, or use a checkpoint merged with `gptforge merge-lora`")
    if meta.get("base_fingerprint") not in (None, base_fingerprint(base)):
        raise UserError(f"{path} holds LoRA adapters for the base model {base}, whose weights have changed since "
                        "(e.g. a run's checkpoints/best moved on); fine-tune from a fixed copy of the base, or "
                        "merge adapters with `gptforge merge-lora` while the base is unchanged")
    base_model, _, _ = load_model(base, "cpu")
    if base_model.config.vocab_size != config.vocab_size:
        base_model.grow_vocab(config.vocab_size)  # as fine-tuning did: same rows, same init
    state = base_model.state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise UserError(f"checkpoint {path} has a missing or corrupt {META}") from None


def load_trainer_state(path: Path, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Trainer JSON state; also restores the optimizer in place when given."""
    d = Path(path) / TRAINER_DIR
    try:
        state = json.loads((d / "state.json").read_text())
        if optimizer is not None:
            tensors = load_file(str(d / "optimizer.safetensors"))
            layout = json.loads((d / "optimizer.json").read_text())
            optimizer.load_state_dict(unflatten_optimizer_state(tensors, layout))
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {path} cannot resume training: {Path(e.filename).name} is missing") from None
    except (json.JSONDecodeError, SafetensorError, KeyError) as e:
        raise UserError(f"trainer state in {path} is corrupt ({type(e).__name__}); "
                        "start a new run directory or restore the checkpoint") from None
    return state


# --- optimizer state without pickle -------------------------------------------------------------
def flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and a JSON layout."""
    tensors, layout = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        entry = {}
        for name, value in st.items():
            if torch.is_tensor(value):
                key = f"{idx}.{name}"
                tensors[key] = value.detach().cpu().contiguous()
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        layout["state"][str(idx)] = entry
    return tensors, layout


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state = {}
    for idx, entry in layout["state"].items():
        state[int(idx)] = {name: tensors[v["tensor"]] if "tensor" in v else v["value"]
                           for name, v in entry.items()}
    return {"state": state, "param_groups": layout["param_groups"]}


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


def run_checkpoint(run_dir: Path, name: str) -> Optional[Path]:
    """checkpoints/<name> of a run directory, if it exists (repairing an interrupted swap)."""
    path = Path(run_dir) / CHECKPOINTS / name
    recover_interrupted_swap(path)
    return path if is_checkpoint(path) else None


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

