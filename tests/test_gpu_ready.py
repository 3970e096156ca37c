"""Issue 6 without a GPU: activation checkpointing computes the same function as the plain path, and every
GPU benchmark script runs end to end on the CPU (--smoke), so a session with a GPU can measure at once."""

import json
import runpy
import subprocess
import sys
import time

import pytest
import torch

from gptforge.config import ModelConfig
from gptforge.engine import Engine, SamplingParams
from gptforge.model import GPT
from gptforge.train.parallelize import apply_activation_checkpointing, is_activation_checkpointed
from helpers import REPO, prepared_byte_corpus, tiny_train_args, write_corpus

GPU_BENCH = REPO / "bench" / "gpu"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models run fastest on one thread, and on a shared machine a second one mostly waits (seen: 2-3x
    slower under load). Subprocesses the scripts start inherit it through OMP_NUM_THREADS."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def count_checkpoints(monkeypatch):
    """Counts calls of torch.utils.checkpoint.checkpoint (which still does the work)."""
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return calls


def tiny_model(dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=101, dropout=dropout))


def loss_and_grads(model: GPT, x, y, seed: int = 5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both paths, if checkpointing preserves the RNG
    _, loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
        torch.rand(3)  # where the RNG stream stands afterwards


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(dropout, count_checkpoints):
    model = tiny_model(dropout).train()
    x, y = torch.randint(0, 101, (4, 32)), torch.randint(0, 101, (4, 32))
    plain = loss_and_grads(model, x, y)
    assert not count_checkpoints
    apply_activation_checkpointing(model)
    checkpointed = loss_and_grads(model, x, y)
    assert count_checkpoints == [False] * 3  # each block, non-reentrant
    assert torch.equal(plain[0], checkpointed[0])
    assert plain[1].keys() == checkpointed[1].keys() and len(plain[1]) == len(list(model.parameters()))
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(plain[2], checkpointed[2])  # recomputation left the global RNG stream where it was


def test_activation_checkpointing_with_a_frozen_body():
    # Fine-tuning the last blocks only (classify --finetune.train_last_blocks): the checkpointed blocks'
    # inputs may not require grad, which the reentrant variant would silently get wrong.
    model = tiny_model().train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.transformer.h[-1].parameters():
        p.requires_grad_(True)
    x, y = torch.randint(0, 101, (2, 32)), torch.randint(0, 101, (2, 32))
    plain = loss_and_grads(model, x, y)
    apply_activation_checkpointing(model)
    checkpointed = loss_and_grads(model, x, y)
    assert torch.equal(plain[0], checkpointed[0]) and plain[1].keys() == checkpointed[1].keys() != set()
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=0, atol=1e-6, msg=name)


def test_activation_checkpointing_leaves_evaluation_and_generation_alone(count_checkpoints):
    reference, model = tiny_model(), tiny_model()
    apply_activation_checkpointing(model)
    x = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        assert torch.equal(model.train()(x)[0], reference.train()(x)[0])  # training mode, but no backward
        assert torch.equal(model.eval()(x)[0], reference.eval()(x)[0])
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert Engine(model).generate(prompts, params) == Engine(reference).generate(prompts, params)  # KV cache
    assert not count_checkpoints
    assert is_activation_checkpointed(model)  # survives eval(): training turns recomputation back on


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    return prepared_byte_corpus(tmp_path_factory.mktemp("data"), n_lines=300)


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_train_cli_with_activation_checkpointing_matches_plain_training(byte_data, tmp_path, count_checkpoints):
    from gptforge.cli import main as cli_main

    options = ["--train.max_steps", "4", "--train.log_every", "1", "--train.eval_every", "0",
               "--train.plot", "false", "--model.dropout", "0.1"]
    # In-process, so the spy sees the loop's checkpointed blocks (a subprocess costs seconds, too).
    cli_main(tiny_train_args(byte_data, tmp_path / "cli", *options, "--train.activation_checkpointing", "true"))
    assert len(count_checkpoints) == 4 * 2  # every step, both blocks of the tiny preset
    assert "activation_checkpointing: true" in (tmp_path / "cli" / "config.yaml").read_text()
    count_checkpoints.clear()
    cli_main(tiny_train_args(byte_data, tmp_path / "plain", *options))
    assert not count_checkpoints
    assert losses(tmp_path / "cli") == losses(tmp_path / "plain") and len(losses(tmp_path / "plain")) == 4


# --- the GPU benchmark scripts, run small on the CPU ---------------------------------------------------
@pytest.fixture
def run_script(monkeypatch, capsys):
    """Runs bench/gpu/NAME --smoke ARGS in this process (a fresh interpreter per script would spend most of
    the time importing torch and transformers again) and returns its output."""
    monkeypatch.syspath_prepend(str(GPU_BENCH))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # what the scripts set, undone after
    before = set(sys.modules)

    def run(name: str, *args: str) -> str:
        monkeypatch.setattr(sys, "argv", [str(GPU_BENCH / name), *args, "--smoke"])
        capsys.readouterr()
        runpy.run_path(str(GPU_BENCH / name), run_name="__main__")
        return capsys.readouterr().out

    yield run
    for name in set(sys.modules) - before:  # the scripts' helper modules (common, bench_train, ...)
        if getattr(sys.modules[name], "__file__", None) and str(REPO / "bench") in sys.modules[name].__file__:
            del sys.modules[name]


def table_rows(out: str) -> list[list[str]]:
    """The markdown table rows that start with a date, split into cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| 20")]


def test_train_speed_bench_runs_ours_and_transformers(run_script):
    pytest.importorskip("transformers")
    out = run_script("bench_train_gpu.py", "speed", "--profile")
    assert "Self CPU time total" in out and "profile failed" not in out
    rows = table_rows(out)
    assert len(rows) == 1
    ours, hf = rows[0][5], rows[0][7]
    assert float(ours.replace(",", "")) > 0 and float(hf.replace(",", "")) > 0
    assert rows[0][-1].startswith("`python bench/gpu/bench_train_gpu.py speed --profile --smoke")


def test_memory_bench_searches_with_and_without_checkpointing(run_script):
    rows = table_rows(run_script("bench_train_gpu.py", "memory"))
    assert [r[4] for r in rows] == ["no", "yes"]
    assert all(r[5] == ">= 4 (--max-batch)" for r in rows)  # the smoke cap; nothing runs out on a CPU


def test_memory_search_finds_the_largest_fitting_batch():
    sys.path.insert(0, str(GPU_BENCH))
    try:
        from bench_train_gpu import search_largest
    finally:
        sys.path.remove(str(GPU_BENCH))
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 37

    far = time.time() + 60
    assert search_largest(fits, 1, 4096, 0.0, far) == (37, 38, "exact")
    assert len(tried) == len(set(tried))  # never tries a size twice
    assert search_largest(fits, 1, 4096, 0.1, far) == (36, 38, "exact")  # within 10%: stops early
    assert search_largest(fits, 1, 16, 0.0, far) == (16, None, "cap")
    assert search_largest(fits, 1, 4096, 0.0, time.time() - 1) == (0, None, "time")


def test_decode_bench_matches_uncached_reference_and_transformers(run_script):
    pytest.importorskip("transformers")
    out = run_script("bench_decode_gpu.py", "--profile")
    assert "Self CPU time total" in out and "profile failed" not in out
    rows = table_rows(out)
    assert [r[4] for r in rows] == ["1", "2"]
    assert all(r[10] == "yes" and r[11] == "yes" for r in rows)  # same tokens: uncached path, transformers


def test_shakespeare_bench_times_a_run_to_the_target(run_script, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=200)
    rows = table_rows(run_script("bench_shakespeare_gpu.py", "--data", str(corpus)))
    assert len(rows) == 1 and rows[0][3] == "config" and rows[0][4].endswith("(step 3)")


@pytest.mark.slow
def test_curve_bench_compares_runs_against_fp32(run_script, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_lines=200)
    rows = table_rows(run_script("bench_curve_gpu.py", "--data", str(corpus)))
    assert [r[3] for r in rows] == ["fp32", "bf16"] and rows[1][-1] == "yardstick (bf16 noise)"


def test_run_all_is_valid_bash_and_names_existing_scripts():
    script = GPU_BENCH / "run_all.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for name in ("bench_train_gpu.py", "bench_decode_gpu.py", "bench_curve_gpu.py", "bench_shakespeare_gpu.py"):
        assert f"bench/gpu/{name}" in text and (GPU_BENCH / name).is_file()
