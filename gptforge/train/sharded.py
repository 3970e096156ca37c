"""Sharded checkpoints: under FSDP each process writes its own part of the weights and optimizer state with
torch.distributed.checkpoint (DCP), and no process gathers the whole state; they load on any number of
processes (DCP reshards on reading), which is what lets a run move from N GPUs to M.

A sharded checkpoint is an ordinary checkpoint directory (model_config.json, tokenizer/, meta.json with
"sharded": N, trainer/state.json) whose tensors are in shards/ instead of model.safetensors and
trainer/optimizer.safetensors:
    shards/shard-0000R-model-00001-of-00001.safetensors   rank R's slices, with their offsets in the header
    trainer/optimizer.json                                 the optimizer's JSON part, keyed by parameter name
Tensors are named "model.<parameter>" and "optim.<parameter>.<state>". The files are safetensors (DCP's
Hugging Face storage), so reading them runs no pickle code, unlike DCP's default format. It is written like
every checkpoint: into a temp folder, renamed into place by rank 0 once every rank has written (a kill at any
moment leaves the previous one loadable). `consolidate` adds the one-file weights that `generate`, `serve`,
`eval`, `export-*` and fine-tuning read; the last checkpoint of a run gets them when it is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from gptforge.checkpoint import (SHARDS, TRAINER_DIR, WEIGHTS, describe_checkpoint, is_sharded, load_model,
                                 model_state_for_saving, model_without_weights, resolve_checkpoint, run_checkpoint,
                                 save_tensors)
from gptforge.common import Runtime, UserError, write_dir_atomically
from gptforge.files import read_json, regular_file
from gptforge.model import GPT
from gptforge.options import ConsolidateOptions
from gptforge.tokenizer import Tokenizer

SHARD_FILE = re.compile(r"shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors")


# --- writing ------------------------------------------------------------------------------------------
def save_sharded(target: Path, model: GPT, optimizer: torch.optim.Optimizer, tokenizer: Tokenizer,
                 runtime: Runtime, step: int, val_loss: Optional[float], trainer_state: dict,
                 extra_meta: Optional[dict] = None, plain: Optional[GPT] = None) -> None:
    """Write checkpoint `target` from every process (a collective). `plain` (the gathered model, on rank 0):
    also write the consolidated weights."""
    import torch.distributed as dist

    tensors, layout = training_tensors(model, optimizer)

    def write_shards(folder: Path) -> None:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

        save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True))

    if not runtime.is_main:
        folder = [None]
        dist.broadcast_object_list(folder, src=0)
        write_shards(Path(folder[0]))
        dist.barrier()  # rank 0 renames the folder into place
        return

    def fill(tmp: Path) -> None:
        dist.broadcast_object_list([str(tmp)], src=0)
        write_shards(tmp)
        written = [f for f in os.listdir(tmp / SHARDS) if SHARD_FILE.fullmatch(f)]
        if len(written) != runtime.world_size:
            raise UserError(f"only {len(written)} of {runtime.world_size} processes' shards reached {tmp}: under "
                            "FSDP the run directory must be one folder that every node shares (see docs/scale.md)")
        describe_checkpoint(tmp, model.config, tokenizer, step=step, val_loss=val_loss, resumable=True,
                            extra_meta={**(extra_meta or {}), "sharded": runtime.world_size})
        (tmp / TRAINER_DIR).mkdir()
        (tmp / TRAINER_DIR / "state.json").write_text(json.dumps(trainer_state, indent=2))
        (tmp / TRAINER_DIR / "optimizer.json").write_text(json.dumps(layout))
        if plain is not None:
            save_tensors(model_state_for_saving(plain, adapters_only=bool((extra_meta or {}).get("lora"))),
                         tmp / WEIGHTS)

    try:
        write_dir_atomically(Path(target), fill)
    finally:
        dist.barrier()


def training_tensors(model: GPT, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of the model and optimizer by name, as this process holds them (shards under FSDP), and
    the optimizer's other values (step counts, parameter groups) as JSON. The tied head is stored once."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    # keyed by parameter name, whatever the number of processes
    weights, optim = get_state_dict(model, optimizer) if optimizer is not None else (get_model_state_dict(model), {})
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    tensors = {f"model.{name}": t for name, t in weights.items()}
    layout = {"param_groups": optim.get("param_groups", []), "state": {}}
    for name, entry in optim.get("state", {}).items():
        layout["state"][name] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{key}"] = value
                layout["state"][name][key] = {"tensor": f"optim.{name}.{key}"}
            else:
                layout["state"][name][key] = {"value": value}
    return tensors, layout


# --- reading ------------------------------------------------------------------------------------------
def load_sharded(path: Path, model: GPT, optimizer: Optional[torch.optim.Optimizer], runtime: Runtime) -> None:
    """Read a sharded checkpoint into `model` (sharded or not, on any number of processes) and `optimizer`;
    every process calls it. Tensors are resliced to how this run holds them."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    tensors, layout = training_tensors(model, optimizer)
    if optimizer is not None:
        layout = _saved_layout(path, layout)
    read_shards(path, tensors, runtime)
    weights = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
    if model.config.tie_embeddings:
        weights["lm_head.weight"] = weights["transformer.wte.weight"]
    if optimizer is None:
        set_model_state_dict(model, weights)
        return
    optim = {"param_groups": layout["param_groups"],
             "state": {name: {key: tensors[v["tensor"]] if "tensor" in v else v["value"] for key, v in entry.items()}
                       for name, entry in layout["state"].items()}}
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim)


def read_shards(path: Path, tensors: dict[str, torch.Tensor], runtime: Runtime) -> None:
    """Fill `tensors` (this process's slices) from checkpoint `path`'s shard files, after checking they are
    regular files inside it; anything wrong with them is one UserError."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader, load

    folder = path / SHARDS
    names = sorted(os.listdir(folder))
    if not names or not all(SHARD_FILE.fullmatch(n) for n in names):
        raise UserError(f"{folder} holds {names[:3] or 'nothing'}, not only shard files; the checkpoint is corrupt")
    for name in names:
        regular_file(folder / name, root=path)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not _group_initialized())
    except (CheckpointException, SafetensorError, RuntimeError, ValueError, KeyError, AssertionError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"the sharded checkpoint {path} does not fit this run or is corrupt ({reason}); resume "
                        "with the options it was saved with, or start a new run directory") from None


def _saved_layout(path: Path, current: dict) -> dict:
    """trainer/optimizer.json, checked against this run's optimizer: the same parameter groups holding the
    same parameters."""
    where = path / TRAINER_DIR / "optimizer.json"
    try:
        saved = read_json(where, root=path)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} cannot resume training: optimizer.json is missing") from None
    try:
        same_groups = [sorted(g["params"]) for g in saved["param_groups"]] == \
            [sorted(g["params"]) for g in current["param_groups"]]
        fits = same_groups and saved["state"].keys() == current["state"].keys() and all(
            entry.keys() == current["state"][name].keys() and all(isinstance(v, dict) for v in entry.values())
            for name, entry in saved["state"].items())
    except (KeyError, TypeError, AttributeError):
        fits = False
    if not fits:
        raise UserError(f"optimizer state in {where} does not fit this run (other parameter groups or a corrupt "
                        "file); resume with the options it was saved with, or start a new run directory")
    return saved


def _group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def load_flat_optimizer(path: Path, model: GPT, optimizer: torch.optim.Optimizer) -> None:
    """A one-file checkpoint's optimizer state (single process or DDP: whole tensors, numbered by position)
    into the optimizer of a sharded model: each process keeps its slices. For a run that moves to FSDP."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from gptforge.trainer_state import unflatten_optimizer_state

    where = path / TRAINER_DIR
    tensors = load_file(str(regular_file(where / "optimizer.safetensors", root=path)))
    saved = unflatten_optimizer_state(tensors, read_json(where / "optimizer.json", root=path))
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the order state is numbered in
    saved_counts = [len(g["params"]) for g in saved["param_groups"]]
    if saved_counts != [len(g["params"]) for g in optimizer.param_groups] or \
            any(not 0 <= i < len(params) for i in saved["state"]) or \
            any(t.shape != params[i].shape for i, entry in saved["state"].items() for t in entry.values()
                if torch.is_tensor(t) and t.dim() > 0):
        raise UserError(f"optimizer state in {where} does not fit this run (other parameter groups or shapes); "
                        "resume with the options it was saved with, or start a new run directory")
    by_name = {"state": {names[id(params[i])]: entry for i, entry in saved["state"].items()},
               "param_groups": [{**g, "params": [names[id(params[i])] for i in g["params"]]}
                                for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# --- for training and for users -----------------------------------------------------------------------
def load_for_training(path: Path, device: torch.device | str) -> tuple[GPT, Tokenizer, dict]:
    """A checkpoint to train on (resume or start from): `load_model`'s result, or for a sharded checkpoint
    without one-file weights the model it describes, whose tensors the training loop reads from the shards."""
    path = resolve_checkpoint(Path(path))
    if is_sharded(path) and not (path / WEIGHTS).exists():
        model, tokenizer, meta = model_without_weights(path)
        return model.to(device), tokenizer, meta
    return load_model(path, device)


def consolidate(path: Path) -> Path:
    """Give a sharded checkpoint (or a run directory's sharded `latest`) its weights as one
    model.safetensors, in place: afterwards every command reads it, and it still resumes. Runs in one
    process, reading every shard. Returns the checkpoint's path."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint or run directory not found: {path}")
    if not is_sharded(path):
        path = run_checkpoint(path, "latest") or resolve_checkpoint(path)
    if not is_sharded(path):
        raise UserError(f"{path} is not a sharded checkpoint: its weights are one file already")
    model, tokenizer, meta = model_without_weights(path)
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32)
    load_sharded(path, model, None, runtime)
    weights = model_state_for_saving(model, adapters_only=bool(meta.get("lora")))

    def fill(tmp: Path) -> None:
        for item in os.listdir(path):  # everything as it is (hard links where the disk allows), plus the weights
            _link_tree(path / item, tmp / item)
        save_tensors(weights, tmp / WEIGHTS)

    write_dir_atomically(path, fill, size_hint=sum(t.nbytes for t in weights.values()))
    return path


def consolidate_command(options: ConsolidateOptions) -> None:
    """`gptforge consolidate`."""
    print(f"consolidated {consolidate(Path(options.checkpoint))}")


def _link_tree(source: Path, dest: Path) -> None:
    def link_or_copy(src: str, dst: str) -> Any:
        try:
            return os.link(src, dst)
        except OSError:
            return shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, dest, copy_function=link_or_copy)
    elif source.is_file() and not source.is_symlink() and source.name != WEIGHTS:
        link_or_copy(str(source), str(dest))

