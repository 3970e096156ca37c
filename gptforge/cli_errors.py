"""Parser errors in one line: the reason, a guess for a misspelled option or command, and where help is.

jsonargparse (like argparse) prints a full usage, 60-odd lines for `train`, before the one line that says
what was wrong; main() turns the parser's ArgumentError into this instead.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Iterable, NoReturn


def usage_error(parser: argparse.ArgumentParser, argv: list[str], error: Exception,
                commands: Iterable[str]) -> NoReturn:
    """Print the reason, "did you mean ...?" when a close name exists, and the --help pointer; exit 2."""
    command = argv[0] if argv and argv[0] in commands else None
    message = " ".join(str(error).split())
    lines = [f"gptforge: error: {reason(message, argv, error)}"]
    unknown = unknown_name(message, command is not None)
    names = option_names(parser, command) if command else list(commands)
    if unknown:
        lines += [f"did you mean {guess}?" for guess in closest(unknown, names)]
    lines.append(f"see: gptforge{f' {command}' if command else ''} --help")
    print("\n".join(lines), file=sys.stderr)
    raise SystemExit(2)


def reason(message: str, argv: list[str], error: Exception) -> str:
    """jsonargparse's message, reworded where it is long or cryptic, in one line."""
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    config = configs[-1] if configs else "a --config file"
    if isinstance(error, UnicodeDecodeError):
        return f"{config} is not UTF-8 text ({error.reason} at byte {error.start})"
    if message.startswith("Problems parsing config"):
        detail = message.split(":", 1)[1].replace(' in "<unicode string>",', " at").strip()
        return f"{config} is not valid YAML: {detail}"[:300]
    if message.startswith("Unexpected config"):
        got = message.split(":", 1)[1].strip()
        return f"{config} must hold option sections (train:, model:, ...), got: {got}"[:300]
    typed = re.match(r'Parser key "([^"]+)": .*?(?:Got value|Given value): (.*)$', message)
    expected = re.findall(r"Expected a <class '(\w+)'>", message)
    if typed and expected:
        kinds = dict.fromkeys(t.replace("NoneType", "null") for t in expected)
        return f"--{typed[1]} expects {' or '.join(kinds)}, got {typed[2]!r}"
    unknown = re.search(r"does not accept option '([^']+)'", message)
    if unknown:
        return f"unknown option or config key '{unknown[1]}'"
    return message.replace('Parser key "', "--").replace('":', ":", 1)[:300]


def unknown_name(message: str, in_command: bool) -> str | None:
    """The misspelled option ("--train.max_stps") or command a message names, if any."""
    found = re.search(r"unrecognized arguments: (-\S+)", message)
    if found:
        return found[1].split("=")[0]
    found = re.search(r"does not accept option '([^']+)'", message)  # a config key, or --section FILE's
    if found:
        return "--" + found[1]
    found = re.search(r"invalid choice: '([^']+)'", message)
    return found[1] if found and not in_command else None


def option_names(parser: argparse.ArgumentParser, command: str) -> list[str]:
    # argparse has no public handle on subcommand parsers or their options: read its action lists
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [o for a in subcommands.choices[command]._actions for o in a.option_strings if o.startswith("--")]


def closest(word: str, names: list[str]) -> list[str]:
    """The one name closest to `word`. A dotted option is compared within its own section first, so the
    shared "--train." prefix alone never makes "--train.bogus" look like "--train.progress"."""
    section, dot, _ = word.partition(".")
    same_section = [n for n in names if dot and n.startswith(section + ".")]
    if same_section:
        fields = {n[len(section) + 1:]: n for n in same_section}
        return [fields[f] for f in difflib.get_close_matches(word[len(section) + 1:], list(fields), n=1, cutoff=0.6)]
    return difflib.get_close_matches(word, names, n=1, cutoff=0.6)
