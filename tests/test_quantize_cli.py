"""`--quantize` through the CLI: each command that runs a model (generate, chat, classify, eval, serve) loads
it through checkpoint.load_for_inference, which packs the weights once as asked."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from gptforge import checkpoint
from gptforge.checkpoint import save_checkpoint
from gptforge.cli import main
from gptforge.common import UserError, inference_runtime
from gptforge.config import ModelConfig, resolve_model_config
from gptforge.model import GPT, GPTClassifier
from gptforge.quantize import PackedLinear
from gptforge.tokenizer import ByteTokenizer

from helpers import REPO

TEXT = REPO / "tests" / "fixtures" / "wikitext2_valid_head.txt"


def tiny_config(tok) -> ModelConfig:
    return resolve_model_config(ModelConfig(preset="tiny", vocab_size=tok.vocab_size, tie_embeddings=False))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("quantize_cli")
    tok = ByteTokenizer()
    tok.add_chat_tokens()
    torch.manual_seed(0)
    save_checkpoint(root / "lm", GPT(tiny_config(tok)), tok)
    plain = ByteTokenizer()
    save_checkpoint(root / "cls", GPTClassifier(tiny_config(plain), 2), plain,
                    extra_meta={"classifier": {"labels": ["ham", "spam"]}})
    return {"lm": str(root / "lm"), "cls": str(root / "cls")}


@pytest.fixture
def packed(monkeypatch) -> list:
    """Every model load_for_inference packs: (model class, --quantize value, packed weight dtypes)."""
    seen, real = [], checkpoint.quantize_model

    def spy(model, weights):
        out = real(model, weights)
        kinds = {m.packed.dtype for m in out.modules() if isinstance(m, PackedLinear)}
        seen.append((type(model).__name__, weights, kinds))
        return out

    monkeypatch.setattr(checkpoint, "quantize_model", spy)
    return seen


def serve_without_listening(monkeypatch) -> list:
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    return apps


COMMANDS = {
    "generate": lambda c: ["generate", c["lm"], "--prompt", "ab", "--sample.max_new_tokens", "4"],
    "chat": lambda c: ["chat", c["lm"], "--sample.max_new_tokens", "4"],
    "classify": lambda c: ["classify", c["cls"], "--text", "a message"],
    "eval": lambda c: ["eval", c["lm"], "--task", "loss", "--data", str(TEXT), "--limit", "300"],
    "serve": lambda c: ["serve", c["lm"], "--port", "0"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_inference_command_packs_its_model_once(command, checkpoints, packed, monkeypatch, capsys):
    apps = serve_without_listening(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))  # chat's one message
    main([*COMMANDS[command](checkpoints), "--device", "cpu", "--quantize", "int8"])
    model_class = "GPTClassifier" if command == "classify" else "GPT"
    assert packed == [(model_class, "int8", {torch.uint8})]
    assert capsys.readouterr().out or command == "serve"
    assert bool(apps) == (command == "serve")


def test_float32_packing_is_the_cpu_default_and_prints_what_the_plain_model_prints(checkpoints, packed, capsys):
    """On a CPU the default (--quantize auto) is f32, the fast float32 path: the same greedy text as torch's
    own layers (--quantize none)."""
    args = ["generate", checkpoints["lm"], "--prompt", "hello", "--sample.max_new_tokens", "24",
            "--sample.temperature", "0", "--device", "cpu"]
    main([*args, "--quantize", "none"])
    plain = capsys.readouterr().out
    assert packed == []
    main(args)
    assert capsys.readouterr().out == plain
    main([*args, "--quantize", "f32"])
    assert capsys.readouterr().out == plain
    assert packed == [("GPT", None, {torch.float32})] * 2  # quantize_model(model, None): float32, packed


def test_auto_packs_float32_on_a_cpu_only(monkeypatch):
    assert inference_runtime("cpu").weights == "f32"
    assert inference_runtime("cpu", "bfloat16").weights is None  # bf16 autocast: torch's layers
    assert inference_runtime("cpu", "auto", "none").weights is None
    assert inference_runtime("cpu", "auto", None).weights is None
    monkeypatch.setattr("gptforge.common.pick_device", lambda requested: torch.device("cuda"))
    assert inference_runtime("cuda", "float32").weights is None


def test_bad_quantize_values_are_one_line_errors(checkpoints, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["generate", checkpoints["lm"], "--device", "cpu", "--quantize", "int4"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--quantize takes auto, none, int8, bf16, f32" in err
    monkeypatch.setattr("gptforge.common.pick_device", lambda requested: torch.device("cuda"))
    with pytest.raises(UserError, match="--quantize is for CPU inference"):
        inference_runtime("cuda", "auto", "int8")
