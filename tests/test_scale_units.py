"""Scale-out pieces that run in one process: the micro-batch search (with an injected out-of-memory
threshold), the memory prediction, the global data cursor, resume refusals, and sharded checkpoints
written and read by FSDP over a one-process group (tests/test_scale.py runs several processes)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import load_model
from gptforge.common import Runtime, UserError
from gptforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig, resolve_model_config
from gptforge.data.loader import TokenLoader
from gptforge.model import GPT
from gptforge.train.memory import choose_micro_batch, largest_fitting, predict_memory
from gptforge.train.parallelize import (apply_activation_checkpointing, is_activation_checkpointed,
                                        remove_activation_checkpointing)
from gptforge.train.pretrain import run_training
from gptforge.train.sharded import consolidate
from helpers import prepared_byte_corpus, run_cli

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    return prepared_byte_corpus(tmp_path_factory.mktemp("data"), n_lines=300)


def tiny_run(data: Path, run_dir: Path, **train) -> RunConfig:
    options = dict(run_dir=str(run_dir), device="cpu", micro_batch_size=4, max_steps=4, lr=3e-3, warmup_steps=2,
                   eval_every=0, eval_batches=2, log_every=1, checkpoint_every=2, progress=False, plot=False)
    return RunConfig(model=ModelConfig(preset="tiny"), data=DataConfig(dir=str(data)),
                     train=TrainConfig(**{**options, **train}))


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --- micro_batch_size auto ---------------------------------------------------------------------------
class FakeMeter:
    """GPU memory as a test says: a trial's peak is `per_sequence` bytes per sequence of its batch (a third
    of it with activation checkpointing), and a batch over `oom_above` sequences raises torch's
    OutOfMemoryError mid-forward, as CUDA would."""

    def __init__(self, model: GPT, capacity: int, per_sequence: int, oom_above: int = 10**9):
        self.model, self.capacity_bytes, self.per_sequence, self.tried = model, capacity, per_sequence, []
        self._peak = 0

        def forward_pre_hook(module, args):
            n = args[0].shape[0]
            self.tried.append((n, is_activation_checkpointed(module)))
            if n > oom_above:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            self._peak = n * self.per_sequence // (3 if is_activation_checkpointed(module) else 1)

        model.register_forward_pre_hook(forward_pre_hook)

    def capacity(self) -> int:
        return self.capacity_bytes

    def reset(self) -> None:
        self._peak = 0

    def peak(self) -> int:
        return self._peak


def search(meter_args: dict, tokens_per_step: int = 16 * 64, **train):
    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset="tiny")))
    meter = FakeMeter(model, **meter_args)
    tc = TrainConfig(micro_batch_size="auto", tokens_per_step=tokens_per_step, **train)
    rng = torch.get_rng_state()
    chosen = choose_micro_batch(model, tc, CPU, "single", meter=meter)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is where it was
    assert not is_activation_checkpointed(model) and all(p.grad is None for p in model.parameters())
    return chosen, meter.tried


def test_micro_batch_search_finds_the_largest_divisor_that_fits():
    optimizer = predict_memory(resolve_model_config(ModelConfig(preset="tiny")), 1).optimizer
    # 16 sequences per step (tokens_per_step 16 x 64): divisors 1, 2, 4, 8, 16; 100 bytes a sequence fit up
    # to 4.5 within the 10% margin, so 4; with activation checkpointing (a third of the bytes) 8 of them
    tc, tried = search(dict(capacity=int((450 + optimizer) / 0.9) + 1, per_sequence=100))
    assert (tc.micro_batch_size, tc.activation_checkpointing) == (8, True)
    assert tc.tokens_per_step == 16 * 64  # the global batch is kept: 2 micro-steps of 8
    plain = [n for n, ac in tried if not ac]
    assert len(plain) == len(set(plain)) and max(plain) == 8  # every size tried once; 8 did not fit
    # everything fits: the largest, no recomputation
    tc, _ = search(dict(capacity=10**9, per_sequence=100))
    assert (tc.micro_batch_size, tc.activation_checkpointing) == (16, False)


def test_micro_batch_search_survives_out_of_memory_errors_and_keeps_checkpointing_only_when_it_helps():
    # a hard limit of 2 sequences (an OutOfMemoryError above it), whatever checkpointing saves
    tc, tried = search(dict(capacity=10**9, per_sequence=100, oom_above=2))
    assert (tc.micro_batch_size, tc.activation_checkpointing) == (2, False)
    assert (4, False) in tried and (4, True) in tried  # both searches ran into the error and went on
    tc, _ = search(dict(capacity=10**9, per_sequence=100, oom_above=2), activation_checkpointing=True)
    assert (tc.micro_batch_size, tc.activation_checkpointing) == (2, True)  # asked for: kept
    with pytest.raises(UserError, match="not even one sequence"):
        search(dict(capacity=10**9, per_sequence=100, oom_above=0))
    with pytest.raises(UserError, match="--train.tokens_per_step"):
        search(dict(capacity=10**9, per_sequence=100), tokens_per_step=None)


def test_largest_fitting_bisects_without_trying_twice():
    tried = []
    candidates = list(range(1, 101))
    assert largest_fitting(candidates, lambda n: tried.append(n) or n <= 37) == 37
    assert len(tried) == len(set(tried)) < 15
    assert largest_fitting(candidates, lambda n: False) == 0 and largest_fitting([1, 2], lambda n: True) == 2


def test_memory_prediction():
    gpt2 = resolve_model_config(ModelConfig(preset="gpt2"))
    one = predict_memory(gpt2, 1, torch.bfloat16)
    assert one.gradients == 4 * gpt2.parameter_count and one.optimizer == 8 * gpt2.parameter_count
    eight = predict_memory(gpt2, 8, torch.bfloat16)
    assert eight.activations - one.activations == 7 * 20 * 12 * 1024 * 768 * 2  # linear in the micro-batch
    one_ac, eight_ac = (predict_memory(gpt2, n, torch.bfloat16, activation_checkpointing=True) for n in (1, 8))
    # per sequence, recomputing keeps each block's fp32 input and one block's values: ~5x less
    assert eight_ac.activations - one_ac.activations < (eight.activations - one.activations) / 5
    sharded = predict_memory(gpt2, 8, torch.bfloat16, shards=8)
    assert sharded.optimizer == one.optimizer // 8 and sharded.activations == eight.activations
    assert predict_memory(gpt2, 1, optimizer="muon").optimizer < one.optimizer


def test_auto_micro_batch_on_cpu_is_saved_in_the_config(byte_data, tmp_path, capsys):
    cfg = tiny_run(byte_data, tmp_path / "run", micro_batch_size="auto", tokens_per_step=8 * 64, max_steps=2)
    run_training(cfg)
    assert "micro_batch_size auto: 8 sequences (predicted" in capsys.readouterr().out  # tiny: RAM is plenty
    assert "micro_batch_size: 8\n" in (tmp_path / "run" / "config.yaml").read_text()


# --- the data cursor and resuming ---------------------------------------------------------------------
def test_random_rows_do_not_depend_on_how_the_global_batch_is_split(byte_data):
    """One global cursor: 1 process x 8 rows, 2 ranks x 4, 4 ranks x 2, and 2 accumulation micro-steps of 4
    read the same rows in the same order (the old loader drew per call, so the last two differed)."""
    def rows(batch_size, world_size=1, calls=1):
        loaders = [TokenLoader(byte_data, "train", batch_size=batch_size, block_size=16, seed=5, rank=r,
                               world_size=world_size) for r in range(world_size)]
        return torch.cat([loader.next_batch()[0] for _ in range(calls) for loader in loaders])

    whole = rows(8)
    assert torch.equal(rows(4, world_size=2), whole) and torch.equal(rows(2, world_size=4), whole)
    assert torch.equal(rows(4, calls=2), whole)


@pytest.mark.slow
def test_resume_keeps_the_global_batch_and_refuses_to_change_it_silently(byte_data, tmp_path):
    run = tmp_path / "run"
    run_training(tiny_run(byte_data, run, max_steps=2))  # 4 sequences of 64 tokens per step
    with pytest.raises(UserError, match=r"saved training 256 tokens per step .* asks for train.tokens_per_step 512"):
        run_training(tiny_run(byte_data, run, max_steps=4, tokens_per_step=512))
    with pytest.raises(UserError, match=r"not a whole number of micro-batches .* --train.micro_batch_size 4"):
        run_training(tiny_run(byte_data, run, max_steps=4, micro_batch_size=8))
    result = run_training(tiny_run(byte_data, run, max_steps=4, micro_batch_size=2))  # 2 micro-steps of 2
    assert result.step == 4
    state = json.loads((run / "checkpoints/latest/trainer/state.json").read_text())
    assert state["tokens_per_step"] == 256
    changed = run_training(tiny_run(byte_data, run, max_steps=5, tokens_per_step=512, allow_batch_change=True))
    assert changed.step == 5


@pytest.mark.slow
def test_resume_with_another_model_shape_is_one_line(byte_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--model.preset", "tiny", "--data.dir", str(byte_data), "--train.run_dir", str(run),
            "--train.device", "cpu", "--train.progress", "false", "--train.max_steps", "2", "--train.eval_every", "0",
            "--train.micro_batch_size", "2"]
    assert run_cli(*args).returncode == 0
    res = run_cli(*args, "--model.n_layer", "3", "--model.n_embd", "64")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "different model (n_layer 2 -> 3; n_embd 32 -> 64)" in res.stderr


# --- FSDP in one process: sharded checkpoints ---------------------------------------------------------
@pytest.mark.slow
def test_fsdp_in_one_process_matches_plain_training_and_writes_sharded_checkpoints(byte_data, tmp_path):
    plain = run_training(tiny_run(byte_data, tmp_path / "plain"))
    sharded = run_training(tiny_run(byte_data, tmp_path / "fsdp", strategy="fsdp"))
    assert losses(tmp_path / "plain") == losses(tmp_path / "fsdp") and plain.step == sharded.step == 4
    latest = tmp_path / "fsdp" / "checkpoints" / "latest"
    assert json.loads((latest / "meta.json").read_text())["sharded"] == 1
    assert [p.name for p in (latest / "shards").iterdir()] == ["shard-00001-model-00001-of-00001.safetensors"]
    # the last checkpoint of a run also has the weights in one file: every command reads it
    a, _, _ = load_model(latest)
    b, _, _ = load_model(tmp_path / "plain" / "checkpoints" / "latest")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("first, then", [("single", "fsdp"), ("fsdp", "single")])
def test_a_run_changes_strategy_when_it_resumes(byte_data, tmp_path, first, then):
    """One-file checkpoints resume under FSDP (the optimizer state is sliced), sharded ones without it."""
    straight = tmp_path / "straight"
    run_training(tiny_run(byte_data, straight, lr_decay_steps=4))
    run = tmp_path / "run"
    run_training(tiny_run(byte_data, run, lr_decay_steps=4, max_steps=2, strategy=first))
    assert (run / "checkpoints" / "latest" / "shards").is_dir() == (first == "fsdp")
    run_training(tiny_run(byte_data, run, lr_decay_steps=4, strategy=then))
    assert losses(run) == losses(straight)


@pytest.mark.slow
def test_a_sharded_checkpoint_is_consolidated_in_place_and_checked(byte_data, tmp_path):
    run = tmp_path / "fsdp"
    run_training(tiny_run(byte_data, run, strategy="fsdp"))
    latest = run / "checkpoints" / "latest"
    expected = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").unlink()  # as every periodic sharded checkpoint is
    res = run_cli("generate", str(latest), "--sample.max_new_tokens", "2")
    assert res.returncode == 2 and "gptforge consolidate" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    copy = tmp_path / "copy"
    shutil.copytree(latest, copy)
    res = run_cli("consolidate", str(run))  # a run directory: its latest
    assert res.returncode == 0 and res.stdout.strip() == f"consolidated {latest}", res.stderr
    assert (latest / "model.safetensors").read_bytes() == expected
    assert (latest / "shards").is_dir()  # still resumable
    # a shard swapped for something else is one line, not a traceback
    shard = next((copy / "shards").iterdir())
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt"):
        consolidate(copy)
    shard.unlink()
    shard.symlink_to("/etc/hostname")
    with pytest.raises(UserError, match="points outside"):
        consolidate(copy)
    with pytest.raises(UserError, match="not a sharded checkpoint"):
        consolidate(tmp_path / "fsdp" / "checkpoints" / "best")


def test_activation_checkpointing_comes_off_again():
    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset="tiny")))
    classes = [type(b) for b in model.transformer.h]
    apply_activation_checkpointing(model)
    assert is_activation_checkpointed(model) and [type(b) for b in model.transformer.h] != classes
    apply_activation_checkpointing(model)  # twice: still one layer of recomputation
    assert all(type(b).__bases__[1] is c for b, c in zip(model.transformer.h, classes))
    remove_activation_checkpointing(model)
    assert [type(b) for b in model.transformer.h] == classes
