"""What every export format shares: its optional packages, the output path (never half-written, never
replaced by accident) and the chat template that other runtimes render."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Callable

from gptforge.checkpoint import refuse_to_replace
from gptforge.common import UserError, default_file_mode
from gptforge.prompts import CHAT_ROLES, END_OF_TURN, ROLE_TOKENS

# The `export` extra of pyproject.toml pins the same packages.
PACKAGES = {"gguf": "gguf>=0.19", "onnx": "onnx>=1.23", "onnxscript": "onnxscript>=0.7",
            "onnxruntime": "onnxruntime>=1.31"}


def require(module: str, command: str) -> ModuleType:
    """Import an optional package, or fail with the line that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{command} needs the {module} package, which is not installed; run: "
                        f"pip install \"{PACKAGES[module]}\" (or pip install \"gptforge[export]\" for every "
                        "export format)") from None


def check_output_file(out: Path, force: bool) -> Path:
    """An output file path that may be written: an existing file only with force, never a folder."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of the file to write")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it, or choose another --out")
    return out


def check_output_dir(out: Path, force: bool, marker: str, what: str) -> Path:
    """An output folder that may be written: new or empty, or (with force) an earlier export, recognised by
    `marker`; a mistyped --out never replaces someone's folder."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not force:
            raise UserError(f"{out} exists; pass --force to replace it, or choose another --out")
        refuse_to_replace(out, (marker,), what)
    return out


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename: a failed
    or interrupted export leaves no partial file, and an earlier file stays as it was."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, default_file_mode())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def disk_errors(path: Path):
    """An OSError while writing (disk full, no permission) becomes one line naming the output."""
    try:
        yield
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from None


def chat_template() -> str:
    """Jinja that renders a conversation as `Tokenizer.encode_chat` does: <|role|> content <|end|> per
    message, then <|assistant|> when a reply is wanted. Runtimes render it to text and tokenize that with
    special tokens recognised, which gives encode_chat's ids as long as no message contains a special
    token's text."""
    roles = json.dumps(ROLE_TOKENS)
    allowed = ", ".join(CHAT_ROLES)
    return ("{%- set roles = " + roles + " -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in roles -%}"
            "{{ raise_exception('chat roles are " + allowed + "') }}"
            "{%- endif -%}"
            "{{- roles[message['role']] + message['content'] + '" + END_OF_TURN + "' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- roles['assistant'] -}}{%- endif -%}")
