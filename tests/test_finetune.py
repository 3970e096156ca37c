"""Fine-tuning through the one loop: every mode on real data slices, LoRA (adapter-only checkpoints, merge,
bitwise resume after SIGKILL), frozen blocks, learning-rate sweeps, and the errors a user can hit."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.checkpoint import load_model, save_checkpoint
from gptforge.config import ModelConfig
from gptforge.model import GPT, GPTClassifier
from gptforge.tokenizer import ByteTokenizer
from helpers import kill_after_checkpoint, run_cli, write_corpus

# Slices of real data (tests/fixtures/README.md says where each comes from)
FIXTURES = Path(__file__).parent / "fixtures"
SMS = FIXTURES / "sms_spam_first400.tsv"
ALPACA = FIXTURES / "alpaca_first60.json"
OASST = FIXTURES / "oasst_en_first8_trees.jsonl"
PLAYS = FIXTURES / "tinyshakespeare_first1600lines.txt"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny byte-level base model, as `gptforge train` would leave one."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    path = tmp_path_factory.mktemp("base") / "ckpt"
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=tok.vocab_size))
    save_checkpoint(path, model, tok)
    return path


def finetune_args(mode, base, data, run_dir, *extra):
    return ["finetune", mode, "--from", str(base), "--finetune.data", str(data), "--train.run_dir", str(run_dir),
            "--train.device", "cpu", "--train.progress", "false", "--train.micro_batch_size", "8",
            "--train.lr", "3e-3", "--train.warmup_steps", "2", *extra]


def finetune(mode, base, data, run_dir, *extra, **kw):
    return run_cli(*finetune_args(mode, base, data, run_dir, *extra), **kw)


@pytest.mark.slow
def test_classify_learns_spam_and_stores_labels(base, tmp_path):
    run = tmp_path / "clf"
    res = finetune("classify", base, SMS, run, "--finetune.epochs", "2",
                   "--finetune.balance", "downsample", "--finetune.train_last_blocks", "1")
    assert res.returncode == 0, res.stderr
    report = json.loads((run / "classify_report.json").read_text())
    assert report["labels"] == ["ham", "spam"]
    assert sum(map(sum, report["test"]["confusion"])) == report["test"]["n"] == 80  # 20% of 400, stratified
    assert report["test"]["acc"] > 0.75 and "test: accuracy" in res.stdout
    model, _, meta = load_model(run)
    assert isinstance(model, GPTClassifier) and meta["classifier"]["labels"] == ["ham", "spam"]
    # only the last block, the final norm and the head trained
    base_model, _, _ = load_model(base)
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, base_model.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(model.transformer.wte.weight, base_model.transformer.wte.weight)
    assert not torch.equal(model.transformer.h[1].mlp.c_fc.weight, base_model.transformer.h[1].mlp.c_fc.weight)
    accuracy = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val/acc" in r]
    assert len(accuracy) == 2  # one per epoch, plotted beside the losses
    assert (run / "loss.png").stat().st_size > 0


@pytest.mark.slow
def test_instruct_masks_prompts_and_writes_test_responses(base, tmp_path):
    run = tmp_path / "sft"
    res = finetune("instruct", base, ALPACA, run, "--finetune.epochs", "1",
                   "--finetune.response_tokens", "8")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (run / "test_responses.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all({"instruction", "output", "response"} <= set(r) for r in rows)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("sample" in r for r in records)
    # throughput counts the tokens trained on (responses), not the padded batch x context
    last = [r for r in records if "tokens" in r][-1]
    assert 0 < last["tokens"] < last["step"] * 8 * 64


@pytest.mark.slow
def test_chat_grows_vocabulary_and_keeps_the_template(base, tmp_path):
    run = tmp_path / "chat"
    res = finetune("chat", base, OASST, run, "--finetune.epochs", "1",
                   "--finetune.oasst_paths", "top")
    assert res.returncode == 0, res.stderr
    model, tok, _ = load_model(run)
    assert tok.has_chat_template and model.config.vocab_size == ByteTokenizer().vocab_size + 4
    base_model, _, _ = load_model(base)
    old = base_model.config.vocab_size
    new_rows = model.transformer.wte.weight[old:old + 4]
    assert torch.isfinite(new_rows).all() and not torch.equal(new_rows[0], new_rows[1])  # trained apart


@pytest.mark.slow
def test_text_mode_with_tags_and_lr_sweep(base, tmp_path):
    corpus = tmp_path / "places.txt"
    corpus.write_text("".join(f'<LOC tag="{"dark" if i % 2 else "sunny"}">The {i}th hall is '
                              f'{"grim and cold" if i % 2 else "bright and warm"}.</LOC>\n' for i in range(80)))
    run = tmp_path / "text"
    args = ("--finetune.delimiters", "<LOC>,</LOC>", "--finetune.lr_sweep", "[1e-4,3e-3]",
            "--finetune.sweep_steps", "15", "--train.lr", "1e-3")
    res = finetune("text", base, corpus, run, "--finetune.epochs", "2", *args)
    assert res.returncode == 0, res.stderr
    sweep = json.loads((run / "sweep" / "sweep.json").read_text())
    assert [r["lr"] for r in sweep] == [1e-4, 3e-3]
    best = min(sweep, key=lambda r: r["val_loss"])["lr"]
    assert best == 3e-3  # 15 steps at 1e-4 barely move a random model
    assert (run / "sweep" / "sweep.png").stat().st_size > 0
    assert f"continuing with lr {best:g}" in res.stdout
    _, tok, _ = load_model(run)
    assert {"<|tag:dark|>", "<|tag:sunny|>"} <= set(tok.special_tokens)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert {"best", "latest"} <= set(kept) and sum(k.startswith("step_") for k in kept) == 2  # one per epoch
    # training on for a third epoch keeps the rate the sweep chose, not --train.lr (which it overrode)
    res = finetune("text", base, corpus, run, "--finetune.epochs", "3", *args)
    assert res.returncode == 0 and "train.lr" not in res.stdout, res.stdout + res.stderr
    changes = [json.loads(line)["changes"] for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert changes and all("train.lr" not in c for c in changes), changes


@pytest.mark.slow
def test_lora_checkpoints_hold_adapters_only_and_merge_exactly(base, tmp_path):
    run = tmp_path / "lora"
    before = load_file(str(base / "model.safetensors"))
    res = finetune("instruct", base, ALPACA, run, "--finetune.epochs", "1",
                   "--finetune.lora.rank", "4", "--finetune.lora.targets", "[attn,mlp]",
                   "--finetune.response_tokens", "4")
    assert res.returncode == 0, res.stderr
    adapters = load_file(str(run / "checkpoints" / "best" / "model.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)  # nothing else trained: nothing else stored
    assert "parameters trained" in res.stdout
    after = load_file(str(base / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base checkpoint is untouched

    merged_dir = tmp_path / "merged"
    assert run_cli("merge-lora", str(run), "--out", str(merged_dir)).returncode == 0
    adapted, tok, _ = load_model(run)
    merged, _, meta = load_model(merged_dir)
    assert "lora" not in meta
    idx = torch.tensor([tok.encode("### Instruction:\nSay hi")])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(idx)[0], adapted.eval()(idx)[0], atol=1e-5, rtol=0)
        assert not torch.allclose(merged(idx)[0], load_model(base)[0].eval()(idx)[0])  # adapters did something

    # export-hf folds the adapters in (transformers has none); import brings back the adapted model
    exported, reimported = tmp_path / "hf", tmp_path / "back"
    assert run_cli("export-hf", str(run), "--out", str(exported)).returncode == 0
    assert run_cli("import-gpt2", str(exported), "--out", str(reimported)).returncode == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(reimported)[0].eval()(idx)[0], adapted(idx)[0], atol=1e-5, rtol=0)

    # a mistyped --out never deletes someone's folder; adapters refuse a base that changed under them
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    res = run_cli("merge-lora", str(run), "--out", str(tmp_path / "notes"))
    assert res.returncode == 2 and (tmp_path / "notes" / "todo.txt").exists()
    meta_path = run / "checkpoints" / "best" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "base_fingerprint": "0:earlier:1"}))
    res = run_cli("generate", str(run), "--sample.max_new_tokens", "2")
    assert res.returncode == 2 and "have changed" in res.stderr
    # and a LoRA checkpoint is not a base to fine-tune from: merge it first
    res = finetune("text", run / "checkpoints" / "latest", PLAYS, tmp_path / "again")
    assert res.returncode == 2 and "merge-lora" in res.stderr


@pytest.mark.slow
def test_lora_resume_after_sigkill_is_bitwise_identical(base, tmp_path):
    args = ["--finetune.epochs", "3", "--finetune.evals_per_epoch", "4", "--finetune.lora.rank", "4",
            "--finetune.lora.dropout", "0.1", "--train.sample_every", "1000"]  # dropout: RNG restored too
    straight = tmp_path / "straight"
    assert finetune("text", base, PLAYS, straight, *args).returncode == 0

    killed = tmp_path / "killed"
    total = json.loads((straight / "checkpoints" / "latest" / "meta.json").read_text())["step"]
    killed_at = kill_after_checkpoint(finetune_args("text", base, PLAYS, killed, *args), killed,
                                      min_step=total // 3)
    assert killed_at < total

    resumed = finetune("text", base, PLAYS, killed, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    a = load_file(str(straight / "checkpoints/latest/model.safetensors"))
    b = load_file(str(killed / "checkpoints/latest/model.safetensors"))
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("args, message", [
    (["classify", "--finetune.data", "missing.tsv"], "missing.tsv"),
    (["poetry", "--finetune.data", "x.txt"], "unknown fine-tuning mode 'poetry'"),
    (["chat"], "needs data"),
    (["text", "--finetune.data", "{plays}", "--finetune.lora.rank", "4", "--finetune.lora.targets", "[ffn]"], "ffn"),
])
def test_finetune_errors_are_one_line(base, tmp_path, args, message):
    args = [a.replace("{plays}", str(PLAYS)) for a in args]
    res = run_cli("finetune", args[0], "--from", str(base), "--train.run_dir", str(tmp_path / "r"),
                  "--train.device", "cpu", *args[1:])
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.slow
def test_resuming_a_run_in_another_mode_is_refused(base, tmp_path):
    run = tmp_path / "run"
    assert finetune("text", base, PLAYS, run, "--finetune.epochs", "0",
                    "--train.max_steps", "2").returncode == 0
    res = run_cli("finetune", "instruct", "--from", str(base), "--data", str(ALPACA),
                  "--train.run_dir", str(run), "--train.device", "cpu")  # --data: short for --finetune.data
    assert res.returncode == 2 and "holds a text run" in res.stderr


def test_an_explicit_max_steps_wins_over_epochs(base, tmp_path):
    corpus = tmp_path / "paragraphs.txt"  # a blank line ends a document
    corpus.write_text(write_corpus(tmp_path / "lines.txt").read_text().replace("\n", "\n\n"))
    res = finetune("text", base, corpus, tmp_path / "run", "--train.max_steps", "5")
    assert res.returncode == 0, res.stderr
    assert ", 5 steps" in res.stdout  # "N steps per epoch, 5 steps", with the default 3 epochs in force
    assert json.loads((tmp_path / "run/checkpoints/latest/meta.json").read_text())["step"] == 5
    per_epoch = int(re.search(r"(\d+) steps per epoch", res.stdout)[1])
    assert 3 * per_epoch != 5  # the epochs would have given another count


def train_losses(run_dir: Path) -> list[float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("mode, data, extra", [
    ("classify", SMS, ("--finetune.lora.rank", "4", "--finetune.balance", "downsample")),
    ("chat", OASST, ()),
], ids=["classify-lora", "chat"])
def test_fine_tuning_under_fsdp_follows_plain_training(base, tmp_path, mode, data, extra):
    """FSDP (one gloo process here; tests/test_scale.py runs several) changes where parameters live, not what
    fine-tuning computes: frozen base and adapters, a grown vocabulary, a classifier head."""
    runs = {}
    for strategy in ("single", "fsdp"):
        runs[strategy] = tmp_path / strategy
        res = finetune(mode, base, data, runs[strategy], "--train.max_steps", "4", "--train.strategy", strategy, *extra)
        assert res.returncode == 0, res.stderr
    plain, sharded = train_losses(runs["single"]), train_losses(runs["fsdp"])
    assert len(plain) >= 2 and sharded == pytest.approx(plain, abs=1e-5)
    a, _, _ = load_model(runs["single"])
    b, _, _ = load_model(runs["fsdp"])
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("content", [None, "[]", '[{"lr": "big", "val_loss": 1.0}]', '{"lr": 0.1}', "not json"])
def test_a_resumed_sweep_without_its_table_is_one_line(tmp_path, content):
    from gptforge.common import UserError
    from gptforge.train.finetune import _read_sweep

    if content is not None:
        (tmp_path / "sweep").mkdir()
        (tmp_path / "sweep" / "sweep.json").write_text(content)
    with pytest.raises(UserError, match="learning rate the sweep chose is unknown|corrupt"):
        _read_sweep(tmp_path)
