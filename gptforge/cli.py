"""`gptforge` command line, derived: each command is an options dataclass (gptforge/options.py; the config
sections are gptforge/config.py's) and a function next to its feature that takes it. The parser and
--help come from the dataclasses (jsonargparse; field docstrings are the help), `validate()` checks every
value, then the function runs. Sections may also be given in a YAML file with --config; command-line
options override the file.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from importlib import import_module
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace, set_parsing_settings

from gptforge import __version__
from gptforge.cli_errors import usage_error
from gptforge.common import UserError
from gptforge.config import RunConfig
from gptforge.options import (ChatOptions, ClassifyOptions, CompletionOptions, ConsolidateOptions, EvalOptions,
                              ExportGGUFOptions, ExportONNXOptions, ExportOptions, FinetuneOptions, GenerateOptions,
                              ImportOptions, JudgeOptions, MergeLoraOptions, PrepareOptions, QuickstartOptions,
                              RunsOptions, SynthOptions)
from gptforge.serve import ServeOptions  # a plain dataclass: fastapi and torch load when the server starts
from gptforge.train.modes import MODES  # the modes' heavy parts load when they run

set_parsing_settings(docstring_parse_attribute_docstrings=True)


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    options: type
    """The options dataclass: its fields are the command's arguments, its docstring the description."""
    run: str
    """"module:function" taking the options; imported only when the command runs."""
    help: str
    """One line in `gptforge --help`."""
    config: Optional[str] = None
    """--config's help, for commands that read option sections from a YAML file."""
    description: Optional[str] = None


def _train(cfg: RunConfig) -> None:  # gptforge/train/pretrain.py is the loop work's: its command stays here
    from gptforge.train.pretrain import run_training

    print(f"done: {run_training(cfg).summary()}; run directory {cfg.train.run_dir}")


_MODE_LIST = "; ".join(f"{name} ({mode.summary})" for name, mode in MODES.items())

COMMANDS = [
    Command("prepare", PrepareOptions, "gptforge.data.prepare:prepare_command",
            "Tokenize text into shards (--data.source -> --data.dir).", config="YAML file with a data section."),
    Command("train", RunConfig, "gptforge.cli:_train", "Pretrain (or resume) a model on prepared data.",
            config="YAML file with model/data/train/sample sections.",
            description="Train a model. Running it again on an existing run directory resumes from its latest "
                        "checkpoint."),
    Command("generate", GenerateOptions, "gptforge.textgen:generate_command", "Sample text from a trained model."),
    Command("quickstart", QuickstartOptions, "gptforge.apps.quickstart:quickstart_command",
            "Prepare Shakespeare, train a small model, print samples."),
    Command("finetune", FinetuneOptions, "gptforge.train.finetune:finetune_command",
            "Fine-tune: " + ", ".join(MODES) + "; LoRA for any.", config="YAML file with finetune/train/sample sections.",
            description=f"{FinetuneOptions.__doc__} Modes: {_MODE_LIST}."),
    Command("consolidate", ConsolidateOptions, "gptforge.train.sharded:consolidate_command",
            "Make a sharded (FSDP) checkpoint readable by every command."),
    Command("merge-lora", MergeLoraOptions, "gptforge.checkpoint:merge_lora_command",
            "Merge LoRA adapters into the base weights."),
    Command("classify", ClassifyOptions, "gptforge.classify:classify_command",
            "Label texts with a fine-tuned classifier."),
    Command("chat", ChatOptions, "gptforge.apps.chat:chat_command", "Multi-turn terminal chat with a chat model."),
    Command("judge", JudgeOptions, "gptforge.apps.judge:judge_command", "Score model responses with an LLM judge."),
    Command("synth", SynthOptions, "gptforge.apps.synth:synth_command", "Generate a fine-tuning corpus with an LLM."),
    Command("import-gpt2", ImportOptions, "gptforge.interop.importer:import_command",
            "Import OpenAI / Hugging Face GPT-2 weights."),
    Command("export-hf", ExportOptions, "gptforge.interop.hf:export_command", "Export a checkpoint for transformers."),
    Command("export-gguf", ExportGGUFOptions, "gptforge.export.gguf:export_gguf_command",
            "Export a checkpoint for llama.cpp."),
    Command("export-onnx", ExportONNXOptions, "gptforge.export.onnx:export_onnx_command",
            "Export a checkpoint for onnxruntime."),
    Command("eval", EvalOptions, "gptforge.eval.run:eval_command",
            "Perplexity, bits per byte, HellaSwag and other benchmarks."),
    Command("serve", ServeOptions, "gptforge.serve.app:serve", "OpenAI-compatible API server and web app."),
    Command("runs", RunsOptions, "gptforge.train.runs:runs_command",
            "List runs: kind, step, best validation loss, tokens, size, last update."),
    Command("completion", CompletionOptions, "gptforge.cli_completion:completion_command",
            "Print a bash or zsh completion script."),
]
BY_NAME = {command.name: command for command in COMMANDS}


def build_parser() -> ArgumentParser:
    # Inherited by every subcommand: main() words parser errors itself, in one line; a misspelled option is
    # an error with a suggestion, never silently expanded (jsonargparse 5 drops abbreviations too).
    parser = ArgumentParser(prog="gptforge", description="Train, sample and inspect GPT-2 models you own.",
                            exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    sub = parser.add_subcommands(dest="command")
    for command in COMMANDS:
        sub.add_subcommand(command.name, command_parser(command), help=command.help)
    return parser


def command_parser(command: Command) -> ArgumentParser:
    """The parser of one command, from its options dataclass."""
    p = ArgumentParser(description=command.description or command.options.__doc__)
    if command.config:
        p.add_argument("--config", action=ActionConfigFile, help=command.config)
    fields = dataclasses.fields(command.options)
    special = {f.name: dict(f.metadata["argparse"]) for f in fields if "argparse" in f.metadata}
    p.add_class_arguments(command.options, as_group=False, as_positional=True, skip=set(special))
    for name, kwargs in special.items():
        flag = kwargs.pop("flag", f"--{name}")
        where = {"dest": name} if flag.startswith("-") else {}  # a positional's name is its dest
        p.add_argument(flag, help=_field_doc(command.options, name), **where, **kwargs)
    return p


def _field_doc(cls: type, name: str) -> Optional[str]:
    from docstring_parser import parse_from_object

    return next((p.description for p in parse_from_object(cls).params if p.arg_name == name), None)


def options_from(cls: type, values: Namespace, section: str = ""):
    """The options dataclass `cls` from its parsed namespace; sections (dataclass fields) recursively. A
    config file's `train: 5` reaches here as that bare value: one clear line instead of a traceback."""
    if not isinstance(values, Namespace):
        raise UserError(f"the {section} section of the config must map option names to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = values[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = options_from(hints[f.name], value, f"{section}.{f.name}".lstrip("."))
        kwargs[f.name] = value
    return cls(**kwargs)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except (ArgumentError, UnicodeDecodeError) as e:  # a config file that is not UTF-8 escapes as the latter
        usage_error(parser, argv, e, BY_NAME)
    command = BY_NAME[ns.command]
    try:
        options = options_from(command.options, ns[ns.command]).validate()
        module, function = command.run.split(":")
        getattr(import_module(module), function)(options)
    except UserError as e:
        print(f"gptforge: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:  # 130 = 128 + SIGINT, the shell's convention
        print(f"gptforge: interrupted{f' {e}' if str(e) else ''}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
