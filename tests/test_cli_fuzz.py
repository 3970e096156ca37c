"""Malformed configs and CLI values, generated: every one must end in exit 2 with one short message that
names the option (at most: the reason, a "did you mean" line and a pointer to --help), never a traceback,
a hang, or a run that silently goes ahead.

Each case runs in-process through `gptforge.cli.main` (a subprocess costs seconds of imports); a few also
run as real `python -m gptforge` subprocesses. The bases are complete, valid commands on tiny data, so a
bad value that slips through would really run (and be caught here as a silent acceptance).
"""

from __future__ import annotations

import contextlib
import io
import signal

import pytest
import torch

from gptforge.checkpoint import save_checkpoint
from gptforge.cli import main
from gptforge.common import UserError
from gptforge.config import DataConfig, FinetuneConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from gptforge.data.prepare import prepare
from gptforge.model import GPT
from gptforge.tokenizer import ByteTokenizer
from gptforge.train.finetune import run_finetune
from gptforge.train.pretrain import run_training
from helpers import run_cli, write_corpus

TRAIN = ["train", "--model.preset", "tiny", "--data.dir", "{data}", "--train.run_dir", "{run}", "--train.device", "cpu",
         "--train.progress", "false", "--train.plot", "false", "--train.max_steps", "2", "--train.eval_batches", "1",
         "--train.micro_batch_size", "2"]
GENERATE = ["generate", "{ckpt}", "--device", "cpu", "--sample.max_new_tokens", "4"]
FINETUNE = ["finetune", "text", "--from", "{ckpt}", "--finetune.data", "{paragraphs}", "--train.run_dir", "{run}",
            "--train.device", "cpu", "--train.progress", "false", "--train.plot", "false", "--finetune.epochs", "0",
            "--train.max_steps", "2", "--train.micro_batch_size", "2"]
PREPARE = ["prepare", "--data.source", "{corpus}", "--data.dir", "{run}", "--data.tokenizer", "byte",
           "--data.num_proc", "1"]
ENDPOINT = ["--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--retries", "0", "--timeout", "1"]
JUDGE = ["judge", "{responses}", *ENDPOINT]
SYNTH = ["synth", *ENDPOINT, "--prompt_file", "{prompt}", "--out", "{run}.txt", "--progress", "false"]
EVAL = ["eval", "{ckpt}", "--task", "loss", "--data", "{corpus}", "--device", "cpu"]

# Values outside each numeric field's range (the fields' documented meaning decides the range).
OUT_OF_RANGE = [
    (TRAIN, "train", {
        "seed": ["-1", "18446744073709551616"], "micro_batch_size": ["0"], "tokens_per_step": ["0"],
        "max_steps": ["-5", "0"], "time_limit_s": ["0", "nan"], "lr": ["-1", "0", "nan", "inf"],
        "muon_lr": ["-1"], "muon_momentum": ["1.5"], "min_lr_ratio": ["-0.1", "2"], "warmup_steps": ["-5"],
        "lr_decay_steps": ["0"], "weight_decay": ["-1"], "beta1": ["1"], "beta2": ["-0.5"], "grad_clip": ["-1"],
        "eval_every": ["-1"], "eval_batches": ["0"], "log_every": ["0"], "sample_every": ["-1"],
        "sample_tokens": ["0"], "eval_tasks_every": ["-1"], "eval_tasks_limit": ["-1"], "checkpoint_every": ["-1"],
        "early_stop_patience": ["-1"]}),
    (GENERATE, "sample", {
        "max_new_tokens": ["-1"], "temperature": ["-1", "nan", "inf"], "top_k": ["-1"], "top_p": ["0", "1.5"],
        "repetition_penalty": ["0", "nan"], "seed": ["-1", "18446744073709551616"], "num_samples": ["0"]}),
    (PREPARE, "data", {
        "bpe_vocab_size": ["0"], "val_fraction": ["-0.1", "1", "nan"], "shard_tokens": ["0"], "num_proc": ["-1"],
        "max_documents": ["0"]}),
    (FINETUNE, "finetune", {
        "epochs": ["-1", "nan", "inf"], "evals_per_epoch": ["0"], "val_fraction": ["-0.1", "1"],
        "test_fraction": ["1.5"], "split_seed": ["-1"], "train_last_blocks": ["-1"], "response_tokens": ["0"],
        "lr_sweep": ["[-0.001]", "[0]"], "sweep_steps": ["0"], "lora.rank": ["-1"], "lora.alpha": ["0"],
        "lora.dropout": ["1", "-0.1"]}),
]
# Options of one subcommand only (not from a config dataclass).
CLI_ONLY = [
    (GENERATE + ["--stream", "maybe"], "--stream"),
    (["quickstart", "--run_dir", "{run}", "--steps", "0"], "--steps"),
    (JUDGE + ["--timeout", "0"], "--timeout"), (JUDGE + ["--timeout", "inf"], "--timeout"),
    (JUDGE + ["--retries", "-1"], "--retries"), (JUDGE + ["--concurrency", "0"], "--concurrency"),
    (SYNTH + ["--n", "0"], "--n"), (SYNTH + ["--concurrency", "0"], "--concurrency"),
    (SYNTH + ["--max_misses", "0"], "--max_misses"), (SYNTH + ["--max_tokens", "0"], "--max_tokens"),
    (SYNTH + ["--temperature", "-1"], "--temperature"), (SYNTH + ["--timeout", "nan"], "--timeout"),
    (EVAL + ["--batch_size", "0"], "--batch_size"), (EVAL + ["--stride", "0"], "--stride"),
    (EVAL + ["--limit", "0"], "--limit"),
    (["classify", "{ckpt}", "--text", "hi", "--batch_size", "0"], "--batch_size"),
]
# Misspelled options: the message must suggest the real one.
TYPOS = [
    (TRAIN, "--train.max_stesp", "--train.max_steps"), (TRAIN, "--train.lrr", "--train.lr"),
    (TRAIN, "--trian.warmup_steps", "--train.warmup_steps"), (TRAIN, "--model.n_layers", "--model.n_layer"),
    (TRAIN, "--train.micro_batchsize", "--train.micro_batch_size"), (TRAIN, "--data.tokeniser", "--data.tokenizer"),
    (GENERATE, "--sample.temprature", "--sample.temperature"), (GENERATE, "--sample.topk", "--sample.top_k"),
    (FINETUNE, "--finetune.epoch", "--finetune.epochs"), (FINETUNE, "--finetune.lora-rank", "--finetune.lora.rank"),
    (FINETUNE, "--finetune.lora_rank", "--finetune.lora.rank"),  # the name before LoRA became one group
    (JUDGE, "--concurency", "--concurrency"), (SYNTH, "--max_mises", "--max_misses"),
]
# Config files: name -> (bytes, what the message must name).
CONFIGS = {
    "garbage.yaml": (b"train: [unclosed\n", "garbage.yaml"),
    "tabs.yaml": (b"train:\n\tlr: 1\n", "tabs.yaml"),
    "not_utf8.yaml": (b"\xff\xfe\x00train", "not_utf8.yaml"),
    "scalar.yaml": (b"just a string\n", "scalar.yaml"),
    "list.yaml": (b"- 1\n- 2\n", "list.yaml"),
    "type_int.yaml": (b"train:\n  max_steps: abc\n", "train.max_steps"),
    "type_float.yaml": (b"train:\n  lr: [1, 2]\n", "train.lr"),
    "type_optional.yaml": (b"sample:\n  top_k: x\n", "sample.top_k"),
    "type_section.yaml": (b"train: 5\n", "train"),
    "type_bool.yaml": (b"train:\n  compile: maybe\n", "train.compile"),
    "range_lr.yaml": (b"train:\n  lr: -1\n", "train.lr"),
    "range_warmup.yaml": (b"train:\n  warmup_steps: -5\n", "train.warmup_steps"),
    "unknown_key.yaml": (b"train:\n  bogus: 1\n", "train.bogus"),
    "unknown_section.yaml": (b"trian:\n  lr: 0.1\n", "trian"),
    "unknown_top.yaml": (b"bogus: 1\n", "bogus"),
}
CONFIG_CASES = [(TRAIN + ["--config", "{dir}/" + name], fragment) for name, (_, fragment) in CONFIGS.items()] + [
    (TRAIN + ["--config", "{dir}/missing.yaml"], "missing.yaml"),
    (TRAIN + ["--config", "{dir}"], "--config"),
    (FINETUNE + ["--config", "{dir}/range_lr.yaml"], "train.lr"),
    (FINETUNE + ["--config", "{dir}/unknown_key.yaml"], "train.bogus"),
    (TRAIN + ["--config"], "--config"),
]


def generated_cases() -> list[tuple[list[str], str]]:
    """(argv, a fragment the message must contain) for every malformed variant."""
    cases = []
    for base, section, fields in OUT_OF_RANGE:
        for field, values in fields.items():
            option = f"--{section}.{field}"
            cases += [(base + [option, value], f"{section}.{field}") for value in values]
            cases.append((base + [option, "abc"], f"{section}.{field}"))  # wrong type
    cases += CLI_ONLY
    cases += [(base + [typo, "1"], f"did you mean {real}?") for base, typo, real in TYPOS]
    cases += CONFIG_CASES
    cases += [(TRAIN + ["--model.n_layer", "2.5"], "model.n_layer"),
              (TRAIN + ["--train.eval_tasks", "3"], "eval_tasks"),
              (TRAIN + ["--train.max_step", "5"], "did you mean --train.max_steps?"),  # no silent abbreviation
              (["nonsense"], "nonsense"), (["train", "extra_positional"], "extra_positional")]
    return cases


CASES = generated_cases()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """The files the bases name: tiny prepared data, a tiny byte-level checkpoint, a corpus, config files."""
    root = tmp_path_factory.mktemp("fuzz")
    corpus = write_corpus(root / "corpus.txt", n_lines=300)
    paragraphs = root / "paragraphs.txt"  # fine-tuning's text mode: a blank line ends a document
    paragraphs.write_text(corpus.read_text().replace("\n", "\n\n"))
    prepare(DataConfig(source=str(corpus), tokenizer="byte", num_proc=1), root / "data", progress=False)
    torch.manual_seed(0)
    tok = ByteTokenizer()
    save_checkpoint(root / "ckpt", GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32,
                                                   vocab_size=tok.vocab_size)), tok)
    (root / "responses.jsonl").write_text('{"instruction": "i", "output": "o", "response": "r"}\n')
    (root / "prompt.txt").write_text("Describe a place.\n")
    configs = root / "configs"
    configs.mkdir()
    for name, (content, _) in CONFIGS.items():
        (configs / name).write_bytes(content)
    return {"data": root / "data", "ckpt": root / "ckpt", "corpus": corpus, "paragraphs": paragraphs,
            "responses": root / "responses.jsonl",
            "prompt": root / "prompt.txt", "dir": configs, "root": root}


def fill(argv: list[str], paths: dict, run) -> list[str]:
    return [a.format(**paths, run=run) for a in argv]


def judge_outcome(code, err: str, fragment: str) -> str:
    """ok, or what went wrong: traceback, silent (it ran, or failed on something else), long (message)."""
    if "Traceback" in err:
        return "traceback"
    if code != 2 or fragment not in err:
        return "silent"
    lines = err.strip().splitlines()
    return "ok" if len(lines) <= 3 and lines[0].startswith("gptforge") else "long"


def run_in_process(argv: list[str], limit_s: int = 60) -> tuple[object, str]:
    """main(argv) -> (exit code, stderr), with an alarm as the hang guard."""
    err = io.StringIO()

    def hang(*_):
        raise TimeoutError(f"hung for {limit_s}s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(limit_s)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    except Exception as e:  # what the user would see as a traceback
        err.write(f"Traceback (in process): {type(e).__name__}: {e}\n")
        code = 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def test_at_least_fifty_variants():
    assert len(CASES) >= 50


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(a[-2:])[:60] for a, _ in CASES])
def test_malformed_config_gets_one_short_message(argv, fragment, paths, tmp_path):
    code, err = run_in_process(fill(argv, paths, tmp_path / "run"))
    assert judge_outcome(code, err, fragment) == "ok", (code, err)


@pytest.mark.parametrize("argv,fragment", [
    (TRAIN + ["--train.lr", "-1"], "train.lr"),
    (GENERATE + ["--sample.seed", "18446744073709551616"], "sample.seed"),
    (TRAIN + ["--train.max_stps", "5"], "did you mean --train.max_steps?"),
    (TRAIN + ["--config", "{dir}/garbage.yaml"], "garbage.yaml"),
    (JUDGE + ["--timeout", "-1"], "--timeout"),
])
def test_malformed_config_in_a_real_process(argv, fragment, paths, tmp_path):
    result = run_cli(*fill(argv, paths, tmp_path / "run"), timeout=120)
    assert judge_outcome(result.returncode, result.stderr, fragment) == "ok", (result.returncode, result.stderr)
    assert result.stdout == ""


def test_zero_heads_is_one_line(paths, tmp_path):
    code, err = run_in_process(fill(TRAIN + ["--model.n_head", "0"], paths, tmp_path / "run"))
    assert judge_outcome(code, err, "model.n_head") == "ok", (code, err)


def test_the_python_api_checks_the_same_ranges_before_any_work(tmp_path):
    missing = str(tmp_path / "missing.txt")  # reading it would fail differently: the check comes first
    with pytest.raises(UserError, match=r"^train.max_steps must be >= 1, got -5$"):
        run_training(RunConfig(data=DataConfig(source=missing), train=TrainConfig(max_steps=-5)))
    with pytest.raises(UserError, match=r"^data.val_fraction must be in \[0, 1\), got 1.0$"):
        prepare(DataConfig(source=missing, val_fraction=1.0), tmp_path / "out")
    with pytest.raises(UserError, match=r"^finetune.epochs must be a finite number >= 0, got nan$"):
        run_finetune("text", str(tmp_path / "nope"), FinetuneConfig(data=missing, epochs=float("nan")), TrainConfig())
    with pytest.raises(UserError, match=r"^sample.top_p must be in \(0, 1\], got 2$"):
        run_finetune("text", str(tmp_path / "nope"), FinetuneConfig(data=missing), TrainConfig(), SampleConfig(top_p=2))
    assert not (tmp_path / "out").exists()
