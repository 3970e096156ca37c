"""The command line: help for everything, generate from checkpoints, and one clear line for bad input."""

import json
import sys

import pytest
import torch

from gptforge.checkpoint import load_model, save_checkpoint
from gptforge.cli import build_parser, main
from gptforge.common import UserError
from gptforge.config import ModelConfig, resolve_model_config
from gptforge.model import GPT
from gptforge.tokenizer import build_tokenizer
from helpers import run_cli, write_corpus


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    tok = build_tokenizer("byte")
    model = GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=tok.vocab_size)))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_checkpoint(path, model, tok, step=7, val_loss=1.5)
    return path


def fails_with(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) <= 3, err  # reason (+ a guess) (+ where help is)
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_every_subcommand_has_help(capsys):
    for argv in ([], ["prepare"], ["train"], ["generate"], ["quickstart"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage:" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--train.lr", "--model.preset", "--data.source", "--sample.top_p", "--config"):
        assert option in out
    assert "Peak learning rate" in out  # field docstrings are the help text


def test_preset_help_names_every_preset(capsys):
    from gptforge.config import PRESETS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    start = help_text.rindex("--model.preset PRESET")  # its help, after the usage lines
    preset_help = help_text[start:help_text.index("--model.n_layer", start)]
    assert [name for name in PRESETS if name not in preset_help] == []


def test_console_script_and_module_entry_point():
    result = run_cli("--help")
    assert result.returncode == 0 and "quickstart" in result.stdout


def test_checkpoint_round_trip_is_exact(checkpoint):
    model, tok, meta = load_model(checkpoint)
    assert meta["step"] == 7 and tok.kind == "byte"
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # re-tied
    torch.manual_seed(0)
    fresh = GPT(model.config)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_generate_from_checkpoint_streams_and_is_reproducible(checkpoint, capsys):
    argv = ["generate", str(checkpoint), "--prompt", "The king", "--sample.max_new_tokens", "20",
            "--sample.seed", "3", "--device", "cpu"]
    main(argv)
    first = capsys.readouterr().out
    main(argv)
    assert capsys.readouterr().out == first and first.startswith("The king")
    main(argv + ["--stream", "true"])
    assert capsys.readouterr().out == first


def test_generate_prompt_longer_than_context(checkpoint, capsys):
    long_prompt = "x" * 100  # the tiny model's context is 64 bytes
    fails_with(capsys, ["generate", str(checkpoint), "--prompt", long_prompt, "--device", "cpu"],
               "context window")
    main(["generate", str(checkpoint), "--prompt", long_prompt, "--truncate", "left",
          "--sample.max_new_tokens", "5", "--device", "cpu"])
    assert capsys.readouterr().out.startswith(long_prompt)


def test_missing_and_corrupt_checkpoints(checkpoint, tmp_path, capsys):
    fails_with(capsys, ["generate", str(tmp_path / "nope")], "not found")
    fails_with(capsys, ["generate", str(tmp_path)], "neither a checkpoint")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    fails_with(capsys, ["generate", str(broken), "--device", "cpu"], "corrupt")
    (broken / "model.safetensors").unlink()
    fails_with(capsys, ["generate", str(broken), "--device", "cpu"], "model.safetensors")
    shutil.rmtree(broken / "tokenizer")
    fails_with(capsys, ["generate", str(broken), "--device", "cpu"], "tokenizer")


def test_vocab_mismatch_between_model_and_tokenizer(checkpoint, tmp_path, capsys):
    import shutil

    mismatched = tmp_path / "mismatch"
    shutil.copytree(checkpoint, mismatched)
    build_tokenizer("char", texts=["abc"]).save(mismatched / "tokenizer")
    fails_with(capsys, ["generate", str(mismatched), "--device", "cpu"], "vocabulary mismatch")


def test_bad_data_inputs(tmp_path, capsys):
    out = str(tmp_path / "out")
    fails_with(capsys, ["prepare", "--data.source", str(tmp_path / "missing.txt"), "--data.dir", out],
               "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    fails_with(capsys, ["prepare", "--data.source", str(tmp_path / "empty.txt"), "--data.dir", out], "empty")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 10)
    fails_with(capsys, ["prepare", "--data.source", str(tmp_path / "blob.txt"), "--data.dir", out], "binary")
    fails_with(capsys, ["prepare", "--data.source", str(tmp_path / "empty.txt")], "--data.dir")
    fails_with(capsys, ["train", "--data.dir", str(tmp_path / "d2"), "--train.run_dir", str(tmp_path / "r"),
                        "--data.source", str(tmp_path / "empty.txt")], "empty")


def test_bad_config_keys_and_types(tmp_path, capsys):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("train:\n  lrr: 0.1\n")
    assert fails_with(capsys, ["train", "--config", str(bad_key)]).splitlines() == [
        "gptforge: error: unknown option or config key 'train.lrr'", "did you mean --train.lr?",
        "see: gptforge train --help"]
    assert fails_with(capsys, ["train", "--train.lr", "fast"]).splitlines() == [
        "gptforge: error: --train.lr expects float, got 'fast'", "see: gptforge train --help"]
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("train: [unclosed\n")
    fails_with(capsys, ["train", "--config", str(broken_yaml)], f"{broken_yaml} is not valid YAML", "line 2")
    fails_with(capsys, ["train", "--config", str(tmp_path / "missing.yaml")], "missing.yaml", "does not exist")
    fails_with(capsys, ["train", "--model.preset", "gpt5", "--train.run_dir", str(tmp_path / "r"),
                        "--data.source", str(write_corpus(tmp_path / "c.txt")), "--data.tokenizer", "byte",
                        "--train.progress", "false"], "unknown model preset")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)")])
def test_out_of_memory_suggests_smaller_micro_batch(tmp_path, capsys, monkeypatch, error):
    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(GPT, "forward", oom)
    fails_with(capsys, ["train", "--model.preset", "tiny", "--train.run_dir", str(tmp_path / "r"),
                        "--data.source", str(write_corpus(tmp_path / "c.txt")), "--data.tokenizer", "byte",
                        "--data.num_proc", "1", "--train.progress", "false", "--train.micro_batch_size", "64"],
               "out of memory", "micro_batch_size")


@pytest.mark.parametrize("argv,lines", [
    (["train", "--train.max_stps", "5"], ["gptforge: error: unrecognized arguments: --train.max_stps 5",
                                          "did you mean --train.max_steps?", "see: gptforge train --help"]),
    (["finetune", "text", "--from", "x", "--finetune.lora_rnk", "4"],
     ["gptforge: error: unrecognized arguments: --finetune.lora_rnk 4", "did you mean --finetune.lora.rank?",
      "see: gptforge finetune --help"]),
    (["trian"], ["gptforge: error: argument command: invalid choice: 'trian' (choose from 'prepare', 'train', "
                 "'generate', 'quickstart', 'finetune', 'consolidate', 'merge-lora', 'classify', 'chat', 'judge', "
                 "'synth', 'import-gpt2', 'export-hf', 'export-gguf', 'export-onnx', 'eval', 'serve', 'runs', "
                 "'completion')", "did you mean train?", "see: gptforge --help"]),
    (["generate"], ["gptforge: error: the following arguments are required: generate.checkpoint",
                    "see: gptforge generate --help"]),
])
def test_parser_errors_are_the_reason_a_guess_and_where_help_is(capsys, argv, lines):
    assert fails_with(capsys, argv).splitlines() == lines  # no usage dump


def test_rerunning_a_finished_run_says_it_is_complete(tmp_path, capsys):
    args = ["train", "--model.preset", "tiny", "--train.run_dir", str(tmp_path / "r"), "--data.source",
            str(write_corpus(tmp_path / "c.txt")), "--data.tokenizer", "byte", "--data.num_proc", "1",
            "--train.progress", "false", "--train.max_steps", "2", "--train.eval_every", "0"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    again = capsys.readouterr().out
    assert "already complete at step 2" in again and "raise --train.max_steps" in again
    assert "nan" not in again
    assert first.splitlines()[-1].startswith("done: step 2, train loss ")
    assert again.splitlines()[-1].startswith("done: step 2, train loss ")  # the loss the run ended on
    main(args + ["--train.max_steps", "3"])
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((tmp_path / "r/checkpoints/latest/meta.json").read_text())["step"] == 3


def test_seeds_take_the_whole_unsigned_64_bit_range(checkpoint, capsys):
    argv = ["generate", str(checkpoint), "--prompt", "a", "--sample.max_new_tokens", "3", "--device", "cpu"]
    main(argv + ["--sample.seed", str(2**64 - 1)])
    assert capsys.readouterr().out.startswith("a")
    fails_with(capsys, argv + ["--sample.seed", str(2**64)], "sample.seed must be in [0, 18446744073709551615]")
    fails_with(capsys, argv + ["--sample.seed", "-1"], "sample.seed")


def test_resume_refuses_a_different_model(tmp_path, capsys):
    corpus = str(write_corpus(tmp_path / "c.txt"))
    args = ["train", "--model.preset", "tiny", "--train.run_dir", str(tmp_path / "r"), "--data.source", corpus,
            "--data.tokenizer", "byte", "--data.num_proc", "1", "--train.progress", "false",
            "--train.max_steps", "2", "--train.eval_every", "0"]
    main(args)
    capsys.readouterr()
    fails_with(capsys, args + ["--model.n_layer", "3"], "different model", "n_layer 2 -> 3")
    assert json.loads((tmp_path / "r/checkpoints/latest/meta.json").read_text())["step"] == 2


def test_parser_builds_without_torch_import():
    assert build_parser() is not None
    with pytest.raises(UserError):
        raise UserError("sanity")


def test_generate_streams_by_default_only_to_a_terminal(checkpoint, capsys, monkeypatch):
    import gptforge.textgen as textgen

    streamed = []
    real = textgen.stream_text
    monkeypatch.setattr(textgen, "stream_text", lambda *a, **k: streamed.append(1) or real(*a, **k))
    argv = ["generate", str(checkpoint), "--prompt", "The king", "--sample.max_new_tokens", "5", "--device", "cpu"]
    main(argv)  # captured output is not a terminal: printed at the end
    assert not streamed
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    main(argv)
    assert streamed == [1]
    main(argv + ["--stream", "false"])
    assert streamed == [1]
    capsys.readouterr()
    fails_with(capsys, argv + ["--stream", "maybe"], "--stream takes auto, true or false")
