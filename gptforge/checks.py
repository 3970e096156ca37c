"""Checks of values from outside (CLI options, config files, checkpoint and data JSON), each failure one
line naming the value: `check_ranges` (numbers inside documented intervals) and `from_dict` / `checked`
(parsed JSON or YAML against a dataclass's annotations)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from gptforge.common import UserError


def check_ranges(cfg: Any, prefix: str, ranges: dict[str, str]) -> None:
    """Refuse, in one line naming the field (prefix + name: "train.lr", "--timeout"), the first value
    outside its range.

    ranges maps a field to an interval such as "[0, 1)" or "(0, inf)"; None (an unset Optional) passes,
    a list is checked item by item, and nan never passes. An "inf)" bound refuses infinity itself."""
    for name, interval in ranges.items():
        value = getattr(cfg, name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not _inside(item, interval):
                finite = "a finite number " if isinstance(item, float) and not math.isfinite(item) else ""
                raise UserError(f"{prefix}{name} must be {finite}{_describe_interval(interval)}, got {item!r}")


def _bounds(interval: str) -> tuple[float, float]:
    # ints stay ints, so a seed bound such as 2**64 - 1 is compared exactly
    return tuple(int(b) if b.lstrip("-").isdigit() else float(b)
                 for b in (part.strip(" [()]") for part in interval.split(",")))


def _inside(value: Any, interval: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    lo, hi = _bounds(interval)
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[-1] == ")" else value <= hi
    return above and below


def _describe_interval(interval: str) -> str:
    lo, hi = _bounds(interval)
    if hi == math.inf:
        return f"{'>' if interval[0] == '(' else '>='} {lo}"
    return f"in {interval}"


def from_dict(cls: type, values: Any, where: str = "config") -> Any:
    """Build a (nested) dataclass from a dict (parsed JSON or YAML), naming any unknown key or value of
    the wrong type (checked against the field's annotation) in one line."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(
                f"unknown config key '{where}.{key}'; valid keys: {', '.join(sorted(known))}"
            )
        kwargs[key] = checked(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def checked(value: Any, annotation: Any, where: str) -> Any:
    """`value` if it has the annotated type (bool is not an int; an int is a float; Optional and list[...]
    are followed; a dataclass is built with from_dict), else a UserError naming `where`."""
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return checked(value, options[0], where)
    elif origin is list and isinstance(value, list):
        return [checked(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    elif origin is dict and isinstance(value, dict):
        return value
    elif annotation is Any:
        return value
    elif annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif annotation in (int, str, bool, list, dict) and isinstance(value, annotation) and \
            not (annotation is int and isinstance(value, bool)):
        return value
    raise UserError(f"{where} must be {_describe_type(annotation)}, got {_show(value)}")


def _describe_type(annotation: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "a mapping"}
    if annotation in names:
        return names[annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return f"a list of {_describe_type(args[0]).split(' ', 1)[1]}s" if args else "a list"
    if typing.get_origin(annotation) is typing.Union:
        return " or ".join("null" if a is type(None) else _describe_type(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}... ({type(value).__name__})" if len(text) > 40 else f"{text} ({type(value).__name__})"
