"""`gptforge` command line: subcommands map onto package functions; no logic of its own beyond wiring.

Options come from the config dataclasses (their docstrings are the help text) and may be given in a
YAML file with --config; command-line options override the file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace, set_parsing_settings

from gptforge.cli_errors import usage_error
from gptforge.common import UserError
from gptforge.config import (DataConfig, FinetuneConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig,
                             check_ranges)

set_parsing_settings(docstring_parse_attribute_docstrings=True)


def _run_parser(description: str) -> ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with model/data/train/sample sections.")
    p.add_class_arguments(ModelConfig, "model")
    p.add_class_arguments(DataConfig, "data")
    p.add_class_arguments(TrainConfig, "train")
    p.add_class_arguments(SampleConfig, "sample")
    return p


def _endpoint_arguments(p: ArgumentParser) -> None:
    p.add_argument("--endpoint", type=str, required=True,
                   help="API base of an OpenAI-compatible server, e.g. http://localhost:11434/v1 (Ollama).")
    p.add_argument("--model", type=str, required=True, help="Model name the server knows.")
    p.add_argument("--api_key", type=Optional[str], default=None,
                   help="Sent as a Bearer token. Default: the GPTFORGE_API_KEY environment variable.")
    p.add_argument("--timeout", type=float, default=60.0, help="Seconds to wait on the server per request.")
    p.add_argument("--retries", type=int, default=3,
                   help="Retries of a request that timed out or failed with a connection error, 429 or 5xx.")


def build_parser() -> ArgumentParser:
    # Inherited by every subcommand: main() words parser errors itself, in one line; a misspelled option is
    # an error with a suggestion, never silently expanded (jsonargparse 5 drops abbreviations too).
    parser = ArgumentParser(prog="gptforge", description="Train, sample and inspect GPT-2 models you own.",
                            exit_on_error=False, allow_abbrev=False)
    sub = parser.add_subcommands(dest="command")

    prep = ArgumentParser(description="Tokenize a corpus into token shards plus a manifest and tokenizer.")
    prep.add_argument("--config", action=ActionConfigFile, help="YAML file with a data section.")
    prep.add_class_arguments(DataConfig, "data")
    prep.add_argument("--overwrite", type=bool, default=False, help="Replace an existing prepared folder.")
    sub.add_subcommand("prepare", prep, help="Tokenize text into shards (--data.source -> --data.dir).")

    sub.add_subcommand("train", _run_parser(
        "Train a model. Running it again on an existing run directory resumes from its latest checkpoint."),
        help="Pretrain (or resume) a model on prepared data.")

    gen = ArgumentParser(description="Generate text from a checkpoint or run directory.")
    gen.add_argument("checkpoint", type=str, help="Checkpoint directory, or a run directory (uses best, else latest).")
    gen.add_argument("--prompt", type=Optional[str], default=None,
                     help="Text to continue. Default: start from the end-of-text token.")
    gen.add_argument("--prompt_file", type=Optional[str], default=None, help="Read the prompt from this file.")
    gen.add_class_arguments(SampleConfig, "sample", as_group=True)
    gen.add_argument("--stream", type=bool, default=False, help="Print tokens as they are generated.")
    gen.add_argument("--truncate", type=Optional[str], default=None,
                     help="'left' keeps the last tokens of a prompt longer than the context window.")
    gen.add_argument("--device", type=str, default="auto", help="cpu, cuda, mps or auto.")
    sub.add_subcommand("generate", gen, help="Sample text from a trained model.")

    quick = ArgumentParser(description="Download the built-in Shakespeare corpus, train a small character-"
                                       "level model on it for a few minutes, and print samples.")
    quick.add_argument("--run_dir", type=str, default="runs/quickstart", help="Where the run is written.")
    quick.add_argument("--minutes", type=float, default=3.0, help="Training time budget in minutes.")
    quick.add_argument("--steps", type=Optional[int], default=None,
                       help="Train exactly this many steps instead of sizing the run to --minutes.")
    quick.add_argument("--device", type=str, default="auto", help="cpu, cuda, mps or auto.")
    sub.add_subcommand("quickstart", quick, help="Prepare Shakespeare, train a small model, print samples.")

    # --- fine-tuning (gptforge/train/finetune.py, modes.py) -----------------------------------------
    ft = ArgumentParser(description="Fine-tune a checkpoint: text (domain text), classify (a classification "
                                    "head), instruct (Alpaca-style SFT) or chat (multi-turn SFT); any of them "
                                    "with LoRA. Running it again on the same run directory resumes.")
    ft.add_argument("--config", action=ActionConfigFile, help="YAML file with finetune/train/sample sections.")
    ft.add_argument("mode", type=str, help="text, classify, instruct or chat.")
    ft.add_argument("--from", dest="base", type=str, required=True,
                    help="Base checkpoint or run directory (e.g. one made by train or import-gpt2).")
    ft.add_argument("--data", type=Optional[str], default=None, help="Training data (same as --finetune.data).")
    ft.add_class_arguments(FinetuneConfig, "finetune")
    ft.add_class_arguments(TrainConfig, "train")
    ft.set_defaults({"train.max_steps": None})  # unset: --finetune.epochs decides; given: it wins
    ft.add_class_arguments(SampleConfig, "sample")
    sub.add_subcommand("finetune", ft, help="Fine-tune: text, classify, instruct, chat; LoRA for any.")

    con = ArgumentParser(description="Write a sharded (FSDP) checkpoint's weights as one file, in place.")
    con.add_argument("checkpoint", type=str, help="Sharded checkpoint, or a run directory (uses its latest).")
    sub.add_subcommand("consolidate", con, help="Make a sharded (FSDP) checkpoint readable by every command.")
    mrg = ArgumentParser(description="Fold a LoRA checkpoint's adapters into full weights (a plain checkpoint).")
    mrg.add_argument("checkpoint", type=str, help="LoRA checkpoint or run directory (uses best, else latest).")
    mrg.add_argument("--out", type=str, required=True, help="Checkpoint directory to write.")
    sub.add_subcommand("merge-lora", mrg, help="Merge LoRA adapters into the base weights.")

    # --- using fine-tuned models; LLM-judged evaluation and data (gptforge/chat.py, judge.py, synth.py) ---
    cls = ArgumentParser(description="Classify texts with a checkpoint from `gptforge finetune classify`: the "
                                     "label and each class's probability. Without --text or --file, classifies "
                                     "each line read from standard input until end of input.")
    cls.add_argument("checkpoint", type=str, help="Classifier checkpoint or run directory (uses best, else latest).")
    cls.add_argument("--text", type=str, action="append", help="A text to classify; repeat for several.")
    cls.add_argument("--file", type=Optional[str], default=None, help="Classify each non-empty line of this file.")
    cls.add_argument("--out", type=Optional[str], default=None,
                     help="Write {text, label, probabilities} per text to this JSONL file instead of printing.")
    cls.add_argument("--keep", type=str, default="start",
                     help="start or end: which part of a text longer than the context window is read.")
    cls.add_argument("--batch_size", type=int, default=32, help="Texts per forward pass.")
    cls.add_argument("--device", type=str, default="auto", help="cpu, cuda, mps or auto.")
    sub.add_subcommand("classify", cls, help="Label texts with a fine-tuned classifier.")

    chat = ArgumentParser(description="Chat with a checkpoint from `gptforge finetune chat` in the terminal. "
                                      "Replies stream as they are written; the oldest turns are forgotten when the "
                                      "context window is full. /reset clears the conversation, /exit or Ctrl-D "
                                      "quits. With piped input, each line is a message and only replies are printed.")
    chat.add_argument("checkpoint", type=str, help="Chat checkpoint or run directory (uses best, else latest).")
    chat.add_argument("--system", type=Optional[str], default=None, help="System message that starts the conversation.")
    chat.add_class_arguments(SampleConfig, "sample", as_group=True)
    chat.add_argument("--device", type=str, default="auto", help="cpu, cuda, mps or auto.")
    sub.add_subcommand("chat", chat, help="Multi-turn terminal chat with a chat model.")

    jdg = ArgumentParser(description="Score responses (the JSONL that `finetune instruct` writes: instruction, "
                                     "input, output, response) 0-100 with an LLM judge behind an OpenAI-compatible "
                                     "endpoint; prints the mean and the distribution.")
    jdg.add_argument("responses", type=str, help="JSONL file with instruction, output and response per line.")
    _endpoint_arguments(jdg)
    jdg.add_argument("--out", type=Optional[str], default=None,
                     help="Write each item with its score to this JSONL file.")
    jdg.add_argument("--concurrency", type=int, default=1, help="Requests in flight at once.")
    jdg.add_argument("--json", type=Optional[str], default=None, help="Also write the summary to this JSON file.")
    sub.add_subcommand("judge", jdg, help="Score model responses with an LLM judge.")

    syn = ArgumentParser(description="Generate a fine-tuning corpus with an LLM behind an OpenAI-compatible "
                                     "endpoint: one document per reply, delimited, deduplicated. Running it again "
                                     "continues up to --n (the file is the state).")
    _endpoint_arguments(syn)
    syn.add_argument("--prompt_file", type=str, required=True,
                     help="The request for one document; {tag} is replaced by a tag from --tags.")
    syn.add_argument("--n", type=int, default=1000, help="Documents the output file should hold.")
    syn.add_argument("--out", type=str, required=True, help="Text file the documents are appended to.")
    syn.add_argument("--delimiters", type=str, default="<DOC>,</DOC>",
                     help="OPEN,CLOSE around each document (give the same to finetune text --finetune.delimiters).")
    syn.add_argument("--tags", type=Optional[str], default=None,
                     help="Comma-separated tags, balanced across documents and written as <DOC tag=\"x\">.")
    syn.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature of the generating model.")
    syn.add_argument("--max_tokens", type=Optional[int], default=None, help="Longest reply, in the model's tokens.")
    syn.add_argument("--concurrency", type=int, default=4, help="Requests in flight at once.")
    syn.add_argument("--max_misses", type=int, default=50,
                     help="Stop after this many requests in a row without a new document.")
    syn.add_argument("--progress", type=bool, default=True, help="Show a progress bar.")
    sub.add_subcommand("synth", syn, help="Generate a fine-tuning corpus with an LLM.")

    # --- interop (gptforge/interop/) -------------------------------------------------------------
    imp = ArgumentParser(description="Import GPT-2 weights (Hugging Face model id or folder, or OpenAI's "
                                     "original TensorFlow checkpoint folder) as a gptforge checkpoint.")
    imp.add_argument("source", type=str, help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, openai-community/..., "
                                              "a Hugging Face model folder, or an OpenAI checkpoint folder.")
    imp.add_argument("--out", type=str, required=True, help="Checkpoint directory to write.")
    imp.add_argument("--tokenizer", type=Optional[str], default=None,
                     help="gpt2, byte, or a gptforge tokenizer/checkpoint folder. Default: the tokenizer the "
                          "source carries, else GPT-2's when the model has 50257 tokens.")
    imp.add_argument("--revision", type=Optional[str], default=None,
                     help="Branch, tag or commit of a Hugging Face model id (default: main).")
    sub.add_subcommand("import-gpt2", imp, help="Import OpenAI / Hugging Face GPT-2 weights.")

    exp = ArgumentParser(description="Export a checkpoint as a Hugging Face transformers model folder.")
    exp.add_argument("checkpoint", type=str, help="Checkpoint directory, or a run directory (uses best, else latest).")
    exp.add_argument("--out", type=str, required=True, help="Folder to write (config.json, model.safetensors, tokenizer).")
    sub.add_subcommand("export-hf", exp, help="Export a checkpoint for transformers.")

    # --- evaluation (gptforge/eval/) ---------------------------------------------------------------
    ev = ArgumentParser(description="Evaluate a checkpoint: loss/perplexity on text or prepared shards, or a "
                                    "multiple-choice benchmark.")
    ev.add_argument("checkpoint", type=str, help="Checkpoint directory, or a run directory (uses best, else latest).")
    ev.add_argument("--task", type=str, default="hellaswag",
                    help="loss, perplexity, hellaswag, piqa; several comma-separated (e.g. loss,hellaswag).")
    ev.add_argument("--data", type=Optional[str], default=None,
                    help="loss/perplexity: a UTF-8 text file or a prepared data folder. Benchmarks: a local "
                         "file in the original schema (.jsonl, .arrow or a datasets folder); default: the "
                         "official validation file, downloaded once into the cache. With several tasks: "
                         "task=PATH pairs, comma-separated (loss=val.txt,hellaswag=hs.jsonl).")
    ev.add_argument("--split", type=str, default="val", help="Split of a prepared data folder: val or train.")
    ev.add_argument("--stride", type=Optional[int], default=None,
                    help="loss/perplexity: new tokens scored per window. Default: the context length "
                         "(non-overlapping windows); smaller gives each token more context, at more cost.")
    ev.add_argument("--limit", type=Optional[int], default=None,
                    help="Evaluate only the first N examples (benchmarks) or tokens (loss), for quick runs.")
    ev.add_argument("--batch_size", type=int, default=16,
                    help="Rows per forward pass: choices (benchmarks) or windows (loss).")
    ev.add_argument("--prompt_format", type=str, default="harness",
                    help="harness (lm-evaluation-harness prompts; published numbers use these) or plain "
                         "(raw text, as build-nanogpt/llm.c).")
    ev.add_argument("--predictions", type=Optional[str], default=None,
                    help="Write per-example predictions of a benchmark to this JSONL file.")
    ev.add_argument("--device", type=str, default="auto", help="cpu, cuda, mps or auto.")
    ev.add_argument("--dtype", type=str, default="auto",
                    help="Autocast dtype: auto (bfloat16 on capable GPUs, else float32), float32, bfloat16, float16.")
    ev.add_argument("--json", type=Optional[str], default=None, help="Also write the results to this JSON file.")
    sub.add_subcommand("eval", ev, help="Perplexity, bits per byte, HellaSwag and other benchmarks.")

    # --- serving (gptforge/serve/) -----------------------------------------------------------------
    from gptforge.serve import ServeConfig  # a plain dataclass: fastapi and torch load in cmd_serve only

    srv = ArgumentParser(description="Serve a checkpoint over an OpenAI-compatible HTTP API, with a web app at /.")
    srv.add_argument("checkpoint", type=str, help="Checkpoint directory, or a run directory (uses best, else latest).")
    srv.add_class_arguments(ServeConfig, as_group=True)
    sub.add_subcommand("serve", srv, help="OpenAI-compatible API server and web app.")
    return parser


def _fields(ns, section: str) -> dict:
    """The options of one section. A config file's `train: 5` reaches here as that bare value."""
    values = getattr(ns, section)
    if not isinstance(values, Namespace):
        raise UserError(f"the {section} section of the config must map option names to values, got {values!r}")
    return vars(values)


def _run_config(ns) -> RunConfig:
    # validated here too (run_training does it for the Python API), so a bad value fails before torch loads
    return RunConfig(model=ModelConfig(**_fields(ns, "model")), data=DataConfig(**_fields(ns, "data")),
                     train=TrainConfig(**_fields(ns, "train")), sample=SampleConfig(**_fields(ns, "sample"))).validate()


def cmd_prepare(ns) -> None:
    from gptforge.data.prepare import prepare

    data = DataConfig(**_fields(ns, "data"))
    if not data.dir:
        raise UserError("prepare needs an output folder: --data.dir PATH")
    manifest = prepare(data, Path(data.dir), overwrite=ns.overwrite)
    splits = ", ".join(f"{name} {s['tokens']:,} tokens" for name, s in manifest["splits"].items())
    print(f"prepared {data.dir}: {splits}; tokenizer {manifest['tokenizer']['kind']} "
          f"(vocab {manifest['tokenizer']['vocab_size']})")


def cmd_train(ns) -> None:
    cfg = _run_config(ns)
    from gptforge.train.pretrain import run_training

    result = run_training(cfg)
    print(f"done: {result.summary()}; run directory {ns.train.run_dir}")


def cmd_generate(ns) -> None:
    from gptforge.checkpoint import load_model
    from gptforge.common import pick_device
    from gptforge.textgen import generate_text, stream_text

    prompts = [ns.prompt or ""]
    if ns.prompt_file:
        try:
            prompts = [Path(ns.prompt_file).read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {ns.prompt_file}: {e}") from None
    if ns.truncate not in (None, "left"):
        raise UserError(f"--truncate takes 'left', got {ns.truncate!r}")
    sample = SampleConfig(**_fields(ns, "sample")).validate()
    device = pick_device(ns.device)
    model, tokenizer, _ = load_model(Path(ns.checkpoint), device)
    if ns.stream:
        for prompt in prompts:
            sys.stdout.write(prompt)
            for _, delta in stream_text(model, tokenizer, [prompt], sample, device, truncate=ns.truncate):
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
        return
    texts = generate_text(model, tokenizer, prompts, sample, device, truncate=ns.truncate)
    per_prompt = len(texts) // len(prompts)
    for i, text in enumerate(texts):
        print(prompts[i // per_prompt] + text)
        if i < len(texts) - 1:
            print("-" * 40)


def cmd_quickstart(ns) -> None:
    from gptforge.quickstart import quickstart

    quickstart(run_dir=Path(ns.run_dir), minutes=ns.minutes, device=ns.device, steps=ns.steps)


def cmd_finetune(ns) -> None:
    options, train = _fields(ns, "finetune"), dict(_fields(ns, "train"))
    finetune = FinetuneConfig(**{**options, **({"data": ns.data} if ns.data else {})}).validate()
    if train["max_steps"] is None:
        train["max_steps"] = TrainConfig.max_steps
    else:  # an explicit step count wins over epochs
        finetune.epochs = 0
    tc, sample = TrainConfig(**train).validate(), SampleConfig(**_fields(ns, "sample")).validate()
    from gptforge.train.finetune import run_finetune

    result = run_finetune(ns.mode, ns.base, finetune, tc, sample)
    print(f"done: {result.loop.summary()}; {result.trainable:,} of {result.total:,} parameters trained; "
          f"run directory {result.run_dir}")
    for split in ("train", "val", "test"):
        if isinstance(result.report.get(split), dict):
            stats = result.report[split]
            print(f"{split:>5}: accuracy {stats['acc']:.4f}, loss {stats['loss']:.4f} ({stats['n']} examples)")
    if "confusion" in (result.report.get("test") or {}):
        labels = result.report["labels"]
        print("test confusion matrix (rows: true, columns: predicted): " + ", ".join(labels))
        for name, row in zip(labels, result.report["test"]["confusion"]):
            print(f"  {name:>12} " + " ".join(f"{n:>6}" for n in row))
    if "test_responses" in result.report:
        print(f"test-set responses: {result.report['test_responses']}")


def cmd_merge_lora(ns) -> None:
    from gptforge.train.finetune import merge_lora_checkpoint

    out = merge_lora_checkpoint(Path(ns.checkpoint), Path(ns.out))
    print(f"merged {ns.checkpoint} -> {out}")


def cmd_consolidate(ns) -> None:
    from gptforge.train.sharded import consolidate
    print(f"consolidated {consolidate(Path(ns.checkpoint))}")


def cmd_classify(ns) -> None:
    import json

    from gptforge.chat import input_lines
    from gptforge.checkpoint import load_model, read_meta, resolve_checkpoint
    from gptforge.common import pick_device
    from gptforge.train.modes import classify_texts

    path = resolve_checkpoint(Path(ns.checkpoint))
    labels = (read_meta(path).get("classifier") or {}).get("labels")
    if not labels:  # checked before the weights load
        raise UserError(f"{path} is not a classifier: it was not fine-tuned with `gptforge finetune classify`")
    device = pick_device(ns.device)
    model, tokenizer, _ = load_model(path, device)

    def classify(texts: list[str]) -> list[dict]:
        return [r for i in range(0, len(texts), ns.batch_size)
                for r in classify_texts(model, tokenizer, texts[i:i + ns.batch_size], labels, device, keep=ns.keep)]

    def show(result: dict) -> str:
        probs = ", ".join(f"{name} {p:.4f}" for name, p in result["probabilities"].items())
        return f"{result['label']}\t({probs})"

    texts = list(ns.text or [])
    if ns.file:
        try:
            texts += [line.strip() for line in Path(ns.file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {ns.file}: {e}") from None
    if ns.text is None and ns.file is None:  # one line at a time, answered at once (a pipe or a person)
        for line in input_lines(sys.stdin, "> " if sys.stdin.isatty() else None):
            if line.strip():
                print(show(classify([line.strip()])[0]), flush=True)
        return
    if not texts:
        raise UserError("nothing to classify: --text is empty and --file has no non-empty lines")
    results = classify(texts)
    if ns.out:
        from gptforge.common import atomic_write_text

        atomic_write_text(Path(ns.out), "".join(json.dumps({"text": t, **r}, ensure_ascii=False) + "\n"
                                                for t, r in zip(texts, results)))
        print(f"classified {len(texts)} texts -> {ns.out}")
        return
    for text, result in zip(texts, results):
        print(f"{show(result)}\t{text}")


def cmd_chat(ns) -> None:
    from gptforge.chat import NO_TEMPLATE, ChatSession, run_chat
    from gptforge.checkpoint import load_model
    from gptforge.common import pick_device

    sample = SampleConfig(**_fields(ns, "sample")).validate()
    device = pick_device(ns.device)
    model, tokenizer, meta = load_model(Path(ns.checkpoint), device)
    if meta.get("classifier") or not tokenizer.has_chat_template:
        raise UserError(f"{ns.checkpoint}: {NO_TEMPLATE}")
    run_chat(ChatSession(model, tokenizer, sample, device, system=ns.system))


def _api_key(ns) -> Optional[str]:
    import os

    return ns.api_key or os.environ.get("GPTFORGE_API_KEY") or None


def cmd_judge(ns) -> None:
    import json

    from gptforge.common import atomic_write_text
    from gptforge.judge import format_report, judge_file

    report = judge_file(Path(ns.responses), ns.endpoint, ns.model, api_key=_api_key(ns), timeout=ns.timeout,
                        retries=ns.retries, out=Path(ns.out) if ns.out else None, concurrency=ns.concurrency)
    print(format_report(report))
    if ns.json:
        atomic_write_text(Path(ns.json), json.dumps(report, indent=2) + "\n")


def cmd_synth(ns) -> None:
    from gptforge.judge import ChatClient
    from gptforge.data.finetune import parse_delimiters
    from gptforge.synth import synthesize

    try:
        prompt = Path(ns.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {ns.prompt_file}: {e}") from None
    delimiters = parse_delimiters(ns.delimiters)
    tags = [t.strip() for t in ns.tags.split(",") if t.strip()] if ns.tags else []
    client = ChatClient(ns.endpoint, ns.model, api_key=_api_key(ns), timeout=ns.timeout, retries=ns.retries)
    r = synthesize(Path(ns.out), client, prompt, ns.n, delimiters=delimiters, tags=tags, temperature=ns.temperature,
                   max_tokens=ns.max_tokens, concurrency=ns.concurrency, max_misses=ns.max_misses,
                   progress=ns.progress)
    print(f"{ns.out}: {r.total} documents ({r.new} new; skipped {r.duplicates} duplicates, {r.empty} empty, "
          f"{r.failed} failed requests)")
    print(f"fine-tune on it: gptforge finetune text --from BASE --finetune.data {ns.out} "
          f"--finetune.delimiters '{ns.delimiters}'")


def cmd_import_gpt2(ns) -> None:
    from gptforge.interop import import_gpt2

    out = import_gpt2(ns.source, Path(ns.out), tokenizer=ns.tokenizer, revision=ns.revision)
    print(f"imported {ns.source} -> {out}")


def cmd_export_hf(ns) -> None:
    from gptforge.interop import export_hf

    out = export_hf(Path(ns.checkpoint), Path(ns.out))
    print(f"exported {ns.checkpoint} -> {out} (load with transformers' AutoModelForCausalLM.from_pretrained)")


def cmd_eval(ns) -> None:
    import json

    from gptforge.common import atomic_write_text
    from gptforge.eval.run import evaluate_checkpoint, format_results, jsonable

    report = evaluate_checkpoint(
        ns.checkpoint, ns.task, device=ns.device, dtype=ns.dtype, predictions=ns.predictions, data=ns.data,
        split=ns.split, stride=ns.stride, limit=ns.limit, batch_size=ns.batch_size,
        prompt_format=ns.prompt_format, progress=True)
    print(format_results(report))
    if ns.json:
        atomic_write_text(Path(ns.json), json.dumps(jsonable(report), indent=2) + "\n")


def cmd_serve(ns) -> None:
    import dataclasses

    from gptforge.serve import ServeConfig
    from gptforge.serve.app import serve

    serve(ns.checkpoint, ServeConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServeConfig)}))


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "generate": cmd_generate, "quickstart": cmd_quickstart,
            "finetune": cmd_finetune, "merge-lora": cmd_merge_lora, "consolidate": cmd_consolidate,
            "classify": cmd_classify, "chat": cmd_chat, "judge": cmd_judge, "synth": cmd_synth,
            "import-gpt2": cmd_import_gpt2, "export-hf": cmd_export_hf, "eval": cmd_eval, "serve": cmd_serve}


# Ranges of the options that are not config fields (those are checked by the configs' validate()).
_TIMEOUTS = {"timeout": "(0, 86400]", "retries": "[0, inf)"}  # a socket takes no timeout beyond time_t
CLI_RANGES = {
    "quickstart": {"minutes": "(0, inf)", "steps": "[1, inf)"}, "classify": {"batch_size": "[1, inf)"},
    "judge": {**_TIMEOUTS, "concurrency": "[1, inf)"},
    "synth": {**_TIMEOUTS, "n": "[1, inf)", "temperature": "[0, inf)", "max_tokens": "[1, inf)",
              "concurrency": "[1, inf)", "max_misses": "[1, inf)"},
    "eval": {"stride": "[1, inf)", "limit": "[1, inf)", "batch_size": "[1, inf)"},
}


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except (ArgumentError, UnicodeDecodeError) as e:  # a config file that is not UTF-8 escapes as the latter
        usage_error(parser, argv, e, COMMANDS)
    try:
        check_ranges(getattr(ns, ns.command), "--", CLI_RANGES.get(ns.command, {}))
        COMMANDS[ns.command](getattr(ns, ns.command))
    except UserError as e:
        print(f"gptforge: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:  # 130 = 128 + SIGINT, the shell's convention
        print(f"gptforge: interrupted{f' {e}' if str(e) else ''}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
