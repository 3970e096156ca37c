"""Every `--option` the project names exists in the parser of the command it is named with: command lines and
prose in README.md and docs/*.md, each command's --help, and the messages the package raises or prints. The
parser is derived from the options dataclasses, so this is what keeps words and options from drifting apart."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from gptforge.cli import COMMANDS, build_parser, command_parser
from helpers import REPO

OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*(?:\.[a-z0-9_-]+)*")
MENTION = re.compile(r"\bgptforge\s+([a-z][a-z0-9-]*)")  # "gptforge eval", "python -m gptforge train"
SCRIPT = re.compile(r"\bbench/[\w/]+\.py\b")
INFERENCE = ("generate", "chat", "classify", "eval", "serve")


def options_of(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


PARSERS = {c.name: options_of(command_parser(c)) for c in COMMANDS}
TOP_LEVEL = options_of(build_parser()) - {"--help"}  # `gptforge --version`: no command's, valid anywhere


def unknown(option: str, commands) -> bool:
    """Whether `option` exists in none of `commands`' parsers (all of them when None). An option of a
    section (--train.lr) must also exist wherever that section does: a section means the same everywhere."""
    if option in TOP_LEVEL:
        return False
    names = PARSERS if commands is None else commands
    if not any(option in PARSERS[c] for c in names):
        return True
    section = option.split(".")[0] + "."
    return "." in option and any(option not in PARSERS[c] and any(o.startswith(section) for o in PARSERS[c])
                                 for c in PARSERS)


def problems(text: str, where: str, commands=None, scripts=(), strict: bool = False) -> list[str]:
    """Options in `text` that do not exist where they are used. After `gptforge CMD` up to the next command,
    the end of its inline code span or the end of the line: CMD's (in a code span, what comes before is a
    launcher's, such as torchrun's). Elsewhere: in `commands` (default: any command), or in one of
    `scripts` (bench scripts that define it); a section's option (--train.lr) names its section, so prose may
    mention it anywhere, unless `strict` (a command's own messages: only its options)."""
    found, taken = [], []
    mentions = [m for m in MENTION.finditer(text) if m.group(1) in PARSERS]  # "gptforge is ..." is prose
    for i, m in enumerate(mentions):
        line_start = text.rfind("\n", 0, m.start()) + 1
        span_start = text.rfind("`", line_start, m.start())
        in_span = text.count("`", line_start, m.start()) % 2 == 1
        ends = [text.find("`" if in_span else "\n", m.end()), mentions[i + 1].start() if i + 1 < len(mentions) else -1]
        end = min([e for e in ends if e >= 0], default=len(text))
        taken.append((span_start if in_span else m.start(), end))
        found += [f"{where}: {o} (after `gptforge {m.group(1)}`)" for o in OPTION.findall(text[m.end():end])
                  if o not in PARSERS[m.group(1)]]
    rest = "".join(" " if any(a <= i < b for a, b in taken) else ch for i, ch in enumerate(text))
    for option in OPTION.findall(rest):
        if any(f'"{option}"' in (REPO / s).read_text() for s in scripts):
            continue
        if unknown(option, None if "." in option and not strict else commands):
            found.append(f"{where}: {option}" + (f" (with {'/'.join(commands)})" if commands else ""))
    return found


# --- README.md and docs/ ---------------------------------------------------------------------------------
def markdown_problems(path: Path) -> list[str]:
    """Code blocks: options of gptforge command lines (a line may continue with a backslash); the flags of
    other programs on those lines (pip, torchrun, python bench/...) are theirs. Prose: an option belongs to
    the commands the section heading names, or to a bench script the document names, else to any command."""
    text = path.read_text(encoding="utf-8")
    scripts = sorted(set(SCRIPT.findall(text)))
    found, heading, in_code = [], None, False
    for number, line in enumerate(text.replace("\\\n", " ").splitlines(), 1):
        where = f"{path.name}:{number}"
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif in_code:
            command = MENTION.search(line)
            if command:  # what comes before `gptforge` on the line is another program's (torchrun, env)
                found += problems(line[command.start():], where)
        elif line.startswith("#"):
            heading = [c for c in MENTION.findall(line) if c in PARSERS] or None
        else:
            found += problems(line, where, heading, scripts)
    return found


@pytest.mark.parametrize("path", [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_documented_options_exist(path):
    assert not markdown_problems(path)


def test_the_check_finds_stale_options():
    """The checker itself: a renamed option, an option given to the wrong command, a misplaced section."""
    assert problems("gptforge finetune text --finetune.lora_rank 8", "x")
    assert problems("`gptforge generate ckpt --train.device cpu`", "x")
    assert problems("lower --data.vocab_size", "x")
    assert problems("use --host", "x", commands=["generate"])
    assert problems("use --train.device cpu", "x", commands=["generate"], strict=True)
    assert not problems("`gptforge merge-lora X --out DIR` and then --train.lr", "x", commands=["finetune"])


# --- --help ------------------------------------------------------------------------------------------------
def help_texts(parser) -> list[str]:
    return [parser.description or ""] + [a.help for a in parser._actions if isinstance(a.help, str)]


def test_help_texts_name_options_of_their_command():
    found = []
    for command in COMMANDS:
        found += problems(command.help, f"gptforge --help, {command.name}", [command.name], strict=True)
        for text in help_texts(command_parser(command)):
            found += problems(text, f"gptforge {command.name} --help", [command.name], strict=True)
    assert not found, found


# --- messages ----------------------------------------------------------------------------------------------
def message_text(node: ast.AST) -> str:
    """The text of the strings in an expression, an f-string's fields as {}."""
    parts = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            parts.append(sub.value)
        elif isinstance(sub, ast.FormattedValue):
            parts.append("{}")
    return " ".join(parts)


def messages(tree: ast.AST):
    """(line, text) of what is raised, printed or warned."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            yield node.lineno, message_text(node.exc)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "print", "warn", "warning"):
            yield node.lineno, message_text(node)


def owners() -> dict[tuple[str, str], list[str]]:
    """(module, name) of the code that speaks for known commands -> those commands: each command's run
    function, and each options class (for every command whose options inherit from it)."""
    found: dict[tuple[str, str], list[str]] = {}
    for command in COMMANDS:
        found.setdefault(tuple(command.run.split(":")), []).append(command.name)
        for cls in command.options.__mro__:
            if dataclasses.is_dataclass(cls):
                found.setdefault((cls.__module__, cls.__name__), []).append(command.name)
    return found


def test_messages_name_options_that_exist():
    """Every message names options that exist (a section's wherever that section is); the messages of a
    command's own code (its run function, its options class) name options of that command."""
    own = owners()
    found = []
    for path in sorted((REPO / "gptforge").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        scopes = [(tree, None)] + [(node, own[(module, node.name)]) for node in tree.body
                                   if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and (module, node.name) in own]
        for scope, commands in scopes:
            for line, text in messages(scope):
                found += problems(text, f"{path.relative_to(REPO)}:{line}", commands, strict=commands is not None)
    assert not found, found


def test_runtime_errors_name_options_every_inference_command_has():
    """Device and dtype errors come from the one runtime set-up every inference command shares, so the
    option they suggest must exist in all of them (it once said --train.device to `generate`)."""
    import torch

    from gptforge.common import UserError, pick_device, pick_dtype

    texts = []
    bad = ["nonsense", "mps"] + (["cuda"] if not torch.cuda.is_available() else [])
    for device in bad:
        with pytest.raises(UserError) as e:
            pick_device(device)
        texts.append(str(e.value))
    for dtype in ("float16", "bogus"):
        with pytest.raises(UserError) as e:
            pick_dtype(dtype, torch.device("cpu"))
        texts.append(str(e.value))
    for command in INFERENCE:
        assert not [p for t in texts for p in problems(t, "runtime", [command], strict=True)], (command, texts)


def test_inference_commands_share_device_and_dtype_options():
    """One RuntimeOptions: the same --device and --dtype (name, default, help) in every command that runs a model."""
    seen = {}
    for command in COMMANDS:
        actions = {o: a for a in command_parser(command)._actions for o in a.option_strings}
        if command.name in INFERENCE:
            assert {"--device", "--dtype"} <= set(actions), command.name
        for option in ("--device", "--dtype"):
            if option in actions:
                seen.setdefault(option, set()).add((actions[option].default, actions[option].help))
    assert {option: len(v) for option, v in seen.items()} == {"--device": 1, "--dtype": 1}, seen
