"""`gptforge classify`: labels and probabilities for --text, --file (to JSONL) and lines on standard input,
matching the Python API; a checkpoint that is not a classifier is one clear error line."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from gptforge.checkpoint import load_model, save_checkpoint
from gptforge.cli import main
from gptforge.config import ModelConfig, resolve_model_config
from gptforge.model import GPT, GPTClassifier
from gptforge.tokenizer import ByteTokenizer
from gptforge.classify import classify_texts
from helpers import REPO, run_cli

LABELS = ["ham", "spam"]
TEXTS = ["see you at lunch", "WIN a FREE prize now, text 8080", "ok"]


def tiny_config(tok):
    return resolve_model_config(ModelConfig(preset="tiny", vocab_size=tok.vocab_size))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = GPTClassifier(tiny_config(tok), len(LABELS))
    torch.nn.init.normal_(model.classifier.weight, std=1.0)  # probabilities well away from 50/50
    path = tmp_path_factory.mktemp("cls") / "ckpt"
    save_checkpoint(path, model, tok, extra_meta={"classifier": {"labels": LABELS}})
    return path


@pytest.fixture(scope="module")
def expected(classifier):
    model, tok, meta = load_model(classifier)
    assert isinstance(model, GPTClassifier) and meta["classifier"]["labels"] == LABELS
    return classify_texts(model, tok, TEXTS, LABELS, "cpu")


def parse(line: str) -> tuple[str, dict]:
    """'spam\\t(ham 0.1234, spam 0.8766)' -> ('spam', {'ham': 0.1234, 'spam': 0.8766})."""
    label, probs = line.split("\t")[:2]
    pairs = [p.rsplit(" ", 1) for p in probs.strip("()").split(", ")]
    return label, {name: float(p) for name, p in pairs}


def check(line: str, want: dict) -> None:
    label, probs = parse(line)
    assert label == want["label"] and list(probs) == LABELS
    for name in LABELS:
        assert probs[name] == pytest.approx(want["probabilities"][name], abs=1e-4)


def test_text_options_print_label_probabilities_and_text(classifier, expected):
    assert {r["label"] for r in expected} == set(LABELS)  # the fixture's model tells the texts apart
    result = run_cli("classify", str(classifier), "--text", TEXTS[0], "--text", TEXTS[1], "--text", TEXTS[2],
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line, text, want in zip(lines, TEXTS, expected):
        check(line, want)
        assert line.split("\t")[2] == text


def test_lines_from_piped_stdin_are_classified_one_by_one(classifier, expected):
    result = subprocess.run([sys.executable, "-m", "gptforge", "classify", str(classifier), "--device", "cpu"],
                            input=f"{TEXTS[0]}\n\n{TEXTS[1]}\n{TEXTS[2]}", capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and "> " not in result.stdout  # no prompt when stdin is not a terminal
    for line, want in zip(lines, expected):
        check(line, want)
        assert len(line.split("\t")) == 2  # the text is not echoed back


def test_file_to_jsonl_in_batches(classifier, expected, tmp_path, monkeypatch, capsys):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    main(["classify", str(classifier), "--file", str(tmp_path / "in.txt"), "--out", str(out), "--batch_size", "2",
          "--device", "cpu"])
    assert f"classified 3 texts -> {out}" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    for row, want in zip(rows, expected):
        assert row["label"] == want["label"]
        assert row["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXTS[1] + "\n"))  # the in-process stdin path, too
    main(["classify", str(classifier), "--device", "cpu"])
    check(capsys.readouterr().out.strip(), expected[1])


def fails(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and fragment in err, err


def test_bad_input_is_one_line(classifier, tmp_path, capsys):
    tok = ByteTokenizer()
    save_checkpoint(tmp_path / "lm", GPT(tiny_config(tok)), tok)
    fails(capsys, ["classify", str(tmp_path / "lm"), "--text", "hi"],
          "was not fine-tuned with `gptforge finetune classify`")
    fails(capsys, ["classify", str(classifier), "--file", str(tmp_path / "missing.txt")], "cannot read")
    (tmp_path / "blank.txt").write_text("\n \n")
    fails(capsys, ["classify", str(classifier), "--file", str(tmp_path / "blank.txt")], "nothing to classify")
    fails(capsys, ["classify", str(classifier), "--text", "hi", "--keep", "middle"], "unknown keep 'middle'")
