"""A run's configuration over time. config.yaml is the configuration the run started with and stays as it
was; each resume that changes a setting appends one line to config_history.jsonl ({"step", "time",
"changes": {"train.lr": [old, new]}}), `step` being where the run stood: the steps after it use the new values. The
configuration in force is config.yaml with the lines applied in order (`effective_config`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from gptforge.common import UserError, atomic_write_text, iter_jsonl
from gptforge.files import read_bytes

CONFIG, HISTORY = "config.yaml", "config_history.jsonl"

# Settings that change how the run is watched or how long it goes, not the optimisation up to there.
# (Raising max_steps stretches the cosine schedule unless train.lr_decay_steps is set: docs/runs.md.)
SAFE_TO_CHANGE = {
    "train.max_steps", "train.time_limit_s", "train.eval_every", "train.eval_batches", "train.log_every",
    "train.sample_every", "train.sample_prompt", "train.sample_tokens", "train.eval_tasks", "train.eval_tasks_every",
    "train.eval_tasks_limit", "train.checkpoint_every", "train.keep_checkpoints", "train.early_stop_patience",
    "train.plot", "train.progress", "train.loggers", "train.device", "train.compile", "data.verify",
}


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    """Settings whose value differs, as name -> [old, new] (a setting only one side has: None on the other)."""
    old, new = flatten(old), flatten(new)
    return {key: [old.get(key), new.get(key)] for key in {**old, **new} if old.get(key) != new.get(key)}


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml as a mapping ({} when there is none), read through the bounded file reader."""
    import yaml

    path = Path(run_dir) / CONFIG
    if not path.exists():
        return {}
    try:
        config = yaml.safe_load(read_bytes(path, root=run_dir).decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid YAML") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a mapping of sections")
    return config


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY
    if not path.exists():
        return []
    text = read_bytes(path, root=run_dir).decode("utf-8", "replace")
    entries = []
    for number, entry in iter_jsonl(text.splitlines(), path):
        if not (isinstance(entry, dict) and isinstance(entry.get("step"), int) and isinstance(entry.get("changes"), dict)
                and all(isinstance(v, list) and len(v) == 2 for v in entry["changes"].values())):
            raise UserError(f"{path} line {number}: not a {{step, changes}} entry; remove the line to go on")
        entries.append(entry)
    return entries


def effective_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml with each recorded change applied: the settings the run trains with now."""
    config = read_run_config(run_dir)
    for entry in read_history(run_dir):
        for name, (_, new) in entry["changes"].items():
            *sections, key = name.split(".")
            target = config
            for section in sections:
                target = target.setdefault(section, {}) if isinstance(target.get(section, {}), dict) else {}
            target[key] = new
    return config


def record_run_config(run_dir: Path, resolved: dict[str, Any], resume_step: Optional[int],
                      say: Callable[[str], None] = print) -> dict[str, list]:
    """Save a new run's config.yaml; on resume, keep it and record what this run changes (said one line
    each, `name: old -> new`). Returns the changes."""
    import yaml

    run_dir = Path(run_dir)
    if resume_step is None or not (run_dir / CONFIG).exists():
        atomic_write_text(run_dir / CONFIG, yaml.safe_dump(resolved, sort_keys=False))
        return {}
    changes = config_changes(effective_config(run_dir), resolved)
    if changes:
        say(f"resuming at step {resume_step} with {len(changes)} changed setting{'s' * (len(changes) > 1)} "
            f"(kept in {HISTORY}; {CONFIG} stays as the run began):")
        for name, (old, new) in sorted(changes.items()):
            note = "" if name in SAFE_TO_CHANGE else "  (changes training from here on)"
            say(f"  {name}: {old!r} -> {new!r}{note}")
        line = {"step": resume_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}
        with open(run_dir / HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    return changes
