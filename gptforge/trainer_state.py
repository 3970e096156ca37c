"""The trainer/ part of a resumable checkpoint: optimizer state without pickle, and the checks of what a
resume reads back (trainer/state.json, trainer/optimizer.json + optimizer.safetensors) before any of it
reaches the optimizer, the RNGs or the loop."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import torch

from gptforge.common import UserError
from gptforge.checks import checked

# What the training loop reads from trainer/state.json (keys it may lack are optional)
STATE_FIELDS: dict[str, Any] = {"step": int, "best_val_loss": Optional[float], "evals_since_best": int,
                                "elapsed_s": float, "train_batches": dict, "rng": dict}
OPTIONAL_STATE_FIELDS: dict[str, Any] = {"world_size": int, "tokens": int, "tokens_per_step": int, "scaler": dict,
                                         "rng_ranks": list[dict]}


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


def check_trainer_state(state: Any, where: Path) -> dict:
    """trainer/state.json with the types the loop expects and RNG states the generators accept."""
    def corrupt(what: str) -> UserError:
        return UserError(f"{where} is corrupt ({what}); start a new run directory or restore the checkpoint")

    if not isinstance(state, dict):
        raise corrupt(f"a {type(state).__name__}, not a mapping")
    try:
        for key, annotation in {**STATE_FIELDS, **OPTIONAL_STATE_FIELDS}.items():
            if key in state or key in STATE_FIELDS:
                checked(state.get(key), annotation, key)
    except UserError as e:
        raise corrupt(str(e)) from None
    if state["step"] < 0 or state["evals_since_best"] < 0:
        raise corrupt("a negative step count")
    for rng in [state["rng"], *state.get("rng_ranks", [])]:
        _check_rng_state(rng, corrupt)
    return state


def _check_rng_state(rng: dict, corrupt) -> None:
    """Set each saved state on a throwaway generator: what it refuses, the loop's would too."""
    try:
        torch.Generator().set_state(torch.tensor(checked(rng.get("torch"), list[int], "rng.torch"), dtype=torch.uint8))
        version, internal, gauss = checked(rng.get("python"), list, "rng.python")
        random.Random().setstate((version, tuple(internal), gauss))
        checked(rng.get("cuda", []), list[list[int]], "rng.cuda")
    except UserError as e:
        raise corrupt(str(e)) from None
    except (RuntimeError, ValueError, TypeError, OverflowError):
        raise corrupt("a random generator state that does not restore") from None


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], layout: Any,
                      where: Path) -> None:
    """Load a flattened optimizer state into `optimizer` once it is known to fit it: the same parameter
    groups (sizes and option types) and state tensors shaped like their parameters."""
    def corrupt(what: str) -> UserError:
        return UserError(f"optimizer state in {where} does not fit this run ({what}); resume with the options "
                         "it was saved with, or start a new run directory")

    try:
        saved = unflatten_optimizer_state(tensors, layout)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise corrupt("its layout is incomplete or corrupt") from None
    groups = saved["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise corrupt(f"{len(groups) if isinstance(groups, list) else 'no'} parameter groups, this run has "
                      f"{len(optimizer.param_groups)}")
    for i, (group, current) in enumerate(zip(groups, optimizer.param_groups)):
        if not isinstance(group, dict) or not all(_same_kind(group.get(k), v) for k, v in current.items() if k in group):
            raise corrupt(f"parameter group {i} holds values of other types")
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError) as e:
        raise corrupt(str(e).splitlines()[0]) from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                    raise corrupt(f"a '{name}' of shape {tuple(value.shape)} for a parameter of shape {tuple(p.shape)}")


def _same_kind(saved: Any, current: Any) -> bool:
    """Whether a saved optimizer option can stand in for the current one (a JSON list for a tuple, any int or
    float for a number; an option that is None now accepts any scalar)."""
    if isinstance(current, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(current) and all(map(_same_kind, saved, current))
    if current is None:
        return saved is None or isinstance(saved, (bool, int, float, str))
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(current, str):
        return isinstance(saved, str)
    return True  # tensors (parameters): their count is what the list comparison above checks
