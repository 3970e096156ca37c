"""The training loop: it learns, writes its run directory, resumes bit-exactly after SIGKILL, and two
DDP processes follow the same loss trajectory as one process with the same global batch."""

import json
import math
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from gptforge.data.prepare import prepare
from gptforge.train.optim import lr_at
from gptforge.train.pretrain import run_training
from helpers import kill_after_checkpoint, prepared_byte_corpus, run_cli, signal_after_checkpoint, tiny_train_args, write_corpus

# the first 16 rows of HellaSwag validation (tests/fixtures/README.md)
HELLASWAG = Path(__file__).parent / "fixtures" / "hellaswag_val_first16.jsonl"


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    return prepared_byte_corpus(tmp_path_factory.mktemp("data"), n_lines=600)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_training_learns_and_writes_run_directory(byte_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = RunConfig(model=ModelConfig(preset="tiny"), data=DataConfig(dir=str(byte_data)),
                    train=TrainConfig(run_dir=str(run_dir), device="cpu", micro_batch_size=16, max_steps=120,
                                      lr=3e-3, warmup_steps=10, eval_every=40, eval_batches=4, log_every=10,
                                      checkpoint_every=40, tokens_per_step=16 * 64 * 2, progress=False,
                                      sample_every=60, sample_tokens=16))
    result = run_training(cfg)
    assert result.step == 120
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[0] > math.log(257) - 0.5  # starts near uniform over the byte vocabulary
    assert losses[-1] < 2.6 and vals[-1] < 2.6  # and learns the corpus's words
    assert len(vals) == 3 and result.best_val_loss == pytest.approx(min(vals), abs=1e-4)
    assert any("sample" in r for r in records)
    for name in ("config.yaml", "loss.png", "checkpoints/latest/model.safetensors",
                 "checkpoints/latest/trainer/optimizer.safetensors", "checkpoints/best/model.safetensors",
                 "checkpoints/best/tokenizer/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    saved = (run_dir / "config.yaml").read_text()
    assert "tokens_per_step: 2048" in saved and "vocab_size: 257" in saved  # resolved values
    best_meta = json.loads((run_dir / "checkpoints/best/meta.json").read_text())
    assert best_meta["val_loss"] == pytest.approx(min(vals), abs=1e-4)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(byte_data, tmp_path):
    args = ["--train.max_steps", "150", "--train.checkpoint_every", "10", "--train.eval_every", "50",
            "--model.dropout", "0.1"]  # dropout: the RNG state must be restored too
    straight = tmp_path / "straight"
    done = run_cli(*tiny_train_args(byte_data, straight, *args))
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    killed_at = kill_after_checkpoint(tiny_train_args(byte_data, killed, *args), killed, min_step=30)
    assert 30 <= killed_at < 150

    resumed = run_cli(*tiny_train_args(byte_data, killed, *args))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    a = load_file(str(straight / "checkpoints/latest/model.safetensors"))
    b = load_file(str(killed / "checkpoints/latest/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run's metrics continue the interrupted ones without duplicate steps
    steps = [r["step"] for r in read_metrics(killed) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 150


def test_ctrl_c_saves_latest_and_exits_130(byte_data, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_train_args(byte_data, run_dir, "--train.max_steps", "100000", "--train.checkpoint_every", "5",
                           "--train.eval_every", "0")
    code, err = signal_after_checkpoint(args, run_dir, min_step=5, sig=signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    stopped = re.fullmatch(r"gptforge: interrupted at step (\d+); saved .*latest\. Run the same command again to "
                           r"resume", line)
    assert stopped, line
    step = int(stopped[1])
    assert step >= 5
    assert json.loads((run_dir / "checkpoints/latest/meta.json").read_text())["step"] == step  # saved at the stop
    resumed = run_cli(*tiny_train_args(byte_data, run_dir, "--train.max_steps", str(step + 2),
                                       "--train.eval_every", "0"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {step}" in resumed.stdout
    assert json.loads((run_dir / "checkpoints/latest/meta.json").read_text())["step"] == step + 2


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_same_global_batch(byte_data, tmp_path):
    common = ["--train.max_steps", "12", "--train.log_every", "1", "--train.eval_every", "6",
              "--train.checkpoint_every", "0", "--train.sampling", "random"]
    one = run_cli(*tiny_train_args(byte_data, tmp_path / "one", *common, "--train.micro_batch_size", "8"))
    assert one.returncode == 0, one.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    two = run_cli(*tiny_train_args(byte_data, tmp_path / "two", *common, "--train.micro_batch_size", "4"),
                  launcher=launcher, env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    loss_one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    loss_two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(loss_one) == len(loss_two) == 12
    assert loss_one == pytest.approx(loss_two, abs=2e-4)
    val_one = [r["val_loss"] for r in read_metrics(tmp_path / "one") if "val_loss" in r]
    val_two = [r["val_loss"] for r in read_metrics(tmp_path / "two") if "val_loss" in r]
    assert val_one == pytest.approx(val_two, abs=2e-4)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(byte_data, tmp_path):
    base = ["--train.max_steps", "8", "--train.log_every", "1", "--train.eval_every", "0",
            "--train.checkpoint_every", "0", "--train.sampling", "sequential"]
    big = run_cli(*tiny_train_args(byte_data, tmp_path / "big", *base, "--train.micro_batch_size", "8"))
    acc = run_cli(*tiny_train_args(byte_data, tmp_path / "acc", *base, "--train.micro_batch_size", "4",
                                   "--train.tokens_per_step", str(8 * 64)))
    assert big.returncode == 0 and acc.returncode == 0, big.stderr + acc.stderr
    a = [r["loss"] for r in read_metrics(tmp_path / "big") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "acc") if "loss" in r]
    assert a == pytest.approx(b, abs=2e-4)


def test_init_from_checkpoint_continues_from_its_weights_and_checks_vocab(byte_data, tmp_path):
    base = dict(device="cpu", micro_batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, eval_batches=4,
                checkpoint_every=0, progress=False, log_every=1)
    first = RunConfig(model=ModelConfig(preset="tiny"), data=DataConfig(dir=str(byte_data)),
                      train=TrainConfig(run_dir=str(tmp_path / "a"), max_steps=60, **base))
    trained = run_training(first)
    second = RunConfig(model=ModelConfig(preset="tiny"), data=DataConfig(dir=str(byte_data)),
                       train=TrainConfig(run_dir=str(tmp_path / "b"), max_steps=2, init_from=str(tmp_path / "a"),
                                         **base))
    run_training(second)
    start_loss = read_metrics(tmp_path / "b")[0]["loss"]
    assert abs(start_loss - trained.train_loss) < 0.3 < math.log(257) - start_loss  # not a fresh model

    char_dir = tmp_path / "char"
    prepare(DataConfig(source=str(write_corpus(tmp_path / "c.txt")), tokenizer="char", num_proc=1), char_dir,
            progress=False)
    mismatch = RunConfig(model=ModelConfig(preset="tiny"), data=DataConfig(dir=str(char_dir)),
                         train=TrainConfig(run_dir=str(tmp_path / "c"), max_steps=2, init_from=str(tmp_path / "a"),
                                           **base))
    from gptforge.common import UserError

    with pytest.raises(UserError, match="vocabulary mismatch"):
        run_training(mismatch)


@pytest.mark.slow
def test_benchmarks_during_training_are_logged_and_plotted(byte_data, tmp_path):
    run = tmp_path / "run"
    res = run_cli(*tiny_train_args(byte_data, run, "--train.max_steps", "6", "--train.eval_every", "3",
                                   "--train.eval_tasks", f"[hellaswag={HELLASWAG}]",
                                   "--train.eval_tasks_limit", "4"))
    assert res.returncode == 0, res.stderr
    scored = [r for r in read_metrics(run) if "hellaswag/acc_norm" in r]
    assert [r["step"] for r in scored] == [3, 6]
    assert all(r["hellaswag/acc"] in (0, 0.25, 0.5, 0.75, 1.0) for r in scored)  # 4 examples
    assert (run / "loss.png").stat().st_size > 0


def test_unknown_benchmark_fails_before_training(byte_data, tmp_path):
    res = run_cli(*tiny_train_args(byte_data, tmp_path / "run", "--train.max_steps", "2",
                                   "--train.eval_tasks", "[mmlu]"))
    assert res.returncode == 2 and "unknown task 'mmlu'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_compiled_training_coexists_with_benchmarks_and_samples(byte_data, tmp_path):
    # build-nanogpt's compiled model broke HellaSwag and sampling (new shapes); ours evaluate the
    # uncompiled module, so the numbers equal a fresh evaluation of the saved weights.
    from gptforge.checkpoint import load_model
    from gptforge.eval import run_task

    run = tmp_path / "run"
    res = run_cli(*tiny_train_args(byte_data, run, "--train.max_steps", "4", "--train.eval_every", "2",
                                   "--train.compile", "true", "--train.sample_every", "2",
                                   "--train.eval_tasks", f"[hellaswag={HELLASWAG}]", "--train.eval_tasks_limit", "6"))
    assert res.returncode == 0, res.stderr
    records = read_metrics(run)
    assert sum("sample" in r for r in records) == 2
    last = [r for r in records if "hellaswag/acc_norm" in r][-1]
    model, tok, _ = load_model(run / "checkpoints" / "latest")
    fresh = run_task(model, tok, "hellaswag", data=HELLASWAG, limit=6)
    assert last["step"] == 4
    assert (last["hellaswag/acc"], last["hellaswag/acc_norm"]) == (round(fresh["acc"], 5), round(fresh["acc_norm"], 5))


def test_a_first_ctrl_c_is_held_until_the_step_ends_and_a_second_interrupts_at_once(capsys):
    """A KeyboardInterrupt inside torch's backward pass once hung a run in CI: the first SIGINT only sets a flag."""
    import os

    from gptforge.train.loop import interrupts_between_steps

    # Python's own handler, as a fresh `gptforge train` has it (earlier tests in this process may leave another)
    suite_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with interrupts_between_steps(enabled=True) as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
            assert interrupt and "Ctrl-C again" in capsys.readouterr().err
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with interrupts_between_steps(enabled=False) as interrupt:  # several processes: interrupted where they are
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert not interrupt
    finally:
        signal.signal(signal.SIGINT, suite_handler)
