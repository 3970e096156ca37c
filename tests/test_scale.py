"""Several processes on the CPU (gloo), as CI runs them: FSDP and DDP follow one process's losses, a sharded
run killed with SIGKILL resumes exactly on 1, 2 and 4 processes, two torchrun "nodes" on loopback train as
one run, and only rank 0 prints. Tiny models: the runs share module fixtures to stay within a few minutes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, prepared_byte_corpus, wait_for_checkpoint

pytestmark = pytest.mark.slow

STEPS = 20
# n_embd 64: big enough that a shard file's header is a small part of it (the 1/N + 5% bound below)
TRAIN = ["--model.preset", "tiny", "--model.n_embd", "64", "--train.device", "cpu", "--train.progress", "false",
         "--train.warmup_steps", "5", "--train.lr", "3e-3", "--train.max_steps", str(STEPS), "--train.log_every", "1",
         "--train.eval_every", "1", "--train.eval_batches", "2", "--train.checkpoint_every", "5",
         "--train.plot", "false"]  # validation every step: slower steps, so the kill below lands after step 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_byte_corpus(tmp_path_factory.mktemp("data"), n_lines=600)


def command(data: Path, run_dir: Path, processes: int, *extra: str, launcher: list[str] | None = None) -> list[str]:
    """python -m gptforge train ..., under torchrun when processes > 0 (0: a plain process)."""
    if launcher is None:
        launcher = [sys.executable] if processes == 0 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [*launcher, "-m", "gptforge", "train", "--data.dir", str(data), "--train.run_dir", str(run_dir),
            *TRAIN, *extra]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def launch(cmd: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    """Run to the end. A launch that dies before its first step (torchrun or gloo failing to start on a
    loaded machine) is tried once more; a failure after that is the test's."""
    for attempt in range(2):
        res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
        if res.returncode == 0 or (Path(run_dir) / "metrics.jsonl").exists() or attempt:
            return res
        print(f"launch failed before training (exit {res.returncode}), retrying once:\n{res.stderr[-1500:]}")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def close(a: dict, b: dict, steps) -> float:
    """Largest loss difference over `steps`. Losses are logged to 6 decimals, so a logged difference of at
    most 9e-6 means a true one under 1e-5."""
    return max(abs(a[s] - b[s]) for s in steps)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The same 20 steps of the same global batch (8 sequences): one process, 2 FSDP ranks, 2 DDP ranks."""
    root = tmp_path_factory.mktemp("runs")
    done = {}
    for name, processes, extra in (("single", 0, ["--train.micro_batch_size", "8"]),
                                   ("fsdp", 2, ["--train.micro_batch_size", "4", "--train.strategy", "fsdp"]),
                                   ("ddp", 2, ["--train.micro_batch_size", "4", "--train.strategy", "ddp"])):
        res = launch(command(data, root / name, processes, *extra), root / name)
        assert res.returncode == 0, res.stderr[-3000:]
        done[name] = (root / name, res)
    return done


def test_fsdp_and_ddp_follow_one_process(runs):
    single, fsdp, ddp = (losses(runs[name][0]) for name in ("single", "fsdp", "ddp"))
    assert len(single) == len(fsdp) == len(ddp) == STEPS
    assert close(single, fsdp, range(1, STEPS + 1)) <= 9e-6
    assert close(ddp, fsdp, range(1, STEPS + 1)) <= 9e-6
    assert single[STEPS] < single[1] - 0.5  # and they learn


def test_only_rank_0_prints(runs):
    for name in ("fsdp", "ddp"):
        out = runs[name][1].stdout
        assert out.count("done: step 20") == 1 and out.count("model: ") == 1, out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so killing its
    process group would miss them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill_after_checkpoint(cmd: list[str], run_dir: Path, min_step: int) -> int:
    """Start `cmd`, SIGKILL it and every process under it (torchrun and its workers) as soon as run_dir's
    latest checkpoint has reached min_step, and return the step it holds."""
    meta = Path(run_dir) / "checkpoints" / "latest" / "meta.json"
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(proc, run_dir, min_step, timeout=300)
    finally:
        tree = descendants(proc.pid)
        for pid in [*tree, proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in tree):
            time.sleep(0.01)  # the workers are gone before anyone reads the run directory
    return json.loads(meta.read_text())["step"]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.fixture(scope="module")
def killed(data, runs, tmp_path_factory):
    """The FSDP run again on 2 processes, killed with SIGKILL once it has checkpointed step 10."""
    run = tmp_path_factory.mktemp("killed") / "run"
    step = kill_after_checkpoint(command(data, run, 2, "--train.micro_batch_size", "4", "--train.strategy", "fsdp"),
                                 run, min_step=10)
    assert 10 <= step < STEPS, f"the run was killed at step {step}: the machine was too slow to stop it in time"
    return run, step


@pytest.mark.parametrize("processes, micro_batch, strategy", [(0, 8, "single"), (2, 4, "fsdp"), (4, 2, "fsdp")])
def test_a_killed_sharded_run_resumes_exactly_on_another_number_of_processes(
        data, runs, killed, tmp_path, processes, micro_batch, strategy):
    run, step = killed
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    res = launch(command(data, resumed, processes, "--train.micro_batch_size", str(micro_batch),
                         "--train.strategy", strategy), resumed)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {resumed / 'checkpoints' / 'latest'} at step {step}" in res.stdout
    straight, again = losses(runs["fsdp"][0]), losses(resumed)
    assert sorted(again) == list(range(1, STEPS + 1))  # the killed run's lines after step `step` were dropped
    assert close(straight, again, range(step + 1, STEPS + 1)) <= 9e-6
    if processes == 2:  # the same number of processes: bitwise the same weights
        a = load_file(str(runs["fsdp"][0] / "checkpoints" / "latest" / "model.safetensors"))
        b = load_file(str(resumed / "checkpoints" / "latest" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert straight == again


def test_each_rank_writes_its_share_of_the_state(runs, killed):
    """A periodic sharded checkpoint: each of the 2 ranks wrote one file of at most half the whole state
    (weights + optimizer, as one process saves them) + 5%, and no process wrote the weights whole."""
    run, _ = killed
    latest = run / "checkpoints" / "latest"
    single = runs["single"][0] / "checkpoints" / "latest"
    whole = sum((single / name).stat().st_size for name in ("model.safetensors", "trainer/optimizer.safetensors"))
    shards = sorted((latest / "shards").iterdir())
    assert len(shards) == 2 and not (latest / "model.safetensors").exists()
    for shard in shards:
        assert shard.stat().st_size <= whole / 2 * 1.05, (shard.name, shard.stat().st_size, whole)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_as_one_run(data, runs, tmp_path):
    """Two torchrun agents ("nodes", one process each) meet through the c10d rendezvous on 127.0.0.1 and
    train as one 2-process FSDP run: the same losses, bitwise, as the single-node one."""
    run = tmp_path / "run"
    for attempt in range(2):
        port = free_port()
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "gptforge-test"]
        cmd = command(data, run, 2, "--train.micro_batch_size", "4", "--train.strategy", "fsdp",
                      launcher=launcher)
        nodes = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outputs = [node.communicate(timeout=600) for node in nodes]
        if all(node.returncode == 0 for node in nodes) or (run / "metrics.jsonl").exists() or attempt:
            break
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    assert losses(run) == losses(runs["fsdp"][0])
    assert sum(out.count("done: step 20") for out, _ in outputs) == 1  # rank 0 only, on one node
    assert len(list((run / "checkpoints" / "latest" / "shards").iterdir())) == 2
