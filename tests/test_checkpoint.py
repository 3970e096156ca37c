"""Atomic directory writes: what a kill, a failure, a full disk or a linked folder at any point leaves behind;
and checks a checkpoint's weights before anything is built from them."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.checkpoint import load_model, run_checkpoint, save_checkpoint
from gptforge.common import UserError, atomic_write_bytes, default_file_mode, recover_interrupted_swap, write_dir_atomically
from gptforge.config import ModelConfig
from gptforge.model import GPT
from gptforge.tokenizer import build_tokenizer
from helpers import REPO, run_cli, tiny_train_args, write_corpus


def fill_with(text):
    def fill(d):
        (d / "model_config.json").write_text(text)
        return text
    return fill


def test_swap_replaces_and_returns_fill_result(tmp_path):
    target = tmp_path / "latest"
    assert write_dir_atomically(target, fill_with("one")) == "one"
    write_dir_atomically(target, fill_with("two"))
    assert (target / "model_config.json").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temp or old dirs left


def test_failing_fill_leaves_the_old_directory_intact(tmp_path):
    target = tmp_path / "latest"
    write_dir_atomically(target, fill_with("good"))

    def broken(d):
        (d / "model_config.json").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_dir_atomically(target, broken)
    assert (target / "model_config.json").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    run_dir = tmp_path / "run"
    target = run_dir / "checkpoints" / "latest"
    write_dir_atomically(target, fill_with("previous"))
    os.rename(target, target.parent / ".latest.old")  # the state right after the first rename
    assert not target.exists()
    found = run_checkpoint(run_dir, "latest")
    assert found == target and (target / "model_config.json").read_text() == "previous"
    recover_interrupted_swap(target)  # idempotent
    assert target.exists()


def test_files_get_ordinary_permissions(tmp_path):
    target = tmp_path / "ckpt"
    write_dir_atomically(target, fill_with("x"))
    assert (target / "model_config.json").stat().st_mode & 0o777 == default_file_mode()


# --- what a killed, linked or starved writer leaves (issue 10: items 10-12) ------------------------------
def dead_pid():
    """The pid of a process that has exited (so no live process of ours has it)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_dirs_of_killed_writers_are_removed_by_the_next_save_and_resume(tmp_path):
    target = tmp_path / "run" / "checkpoints" / "latest"
    write_dir_atomically(target, fill_with("one"))
    stale = target.parent / f".latest.tmp-{dead_pid()}"
    (stale / "trainer").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = target.parent / f".latest.tmp-{sleeper.pid}"  # a live writer's: never touched
        alive.mkdir()
        other = target.parent / f".best.tmp-{dead_pid()}"  # another checkpoint's name: not this save's business
        other.mkdir()
        write_dir_atomically(target, fill_with("two"))
        assert not stale.exists() and alive.exists() and other.exists()
        (stale / "x").mkdir(parents=True)
        assert run_checkpoint(tmp_path / "run", "latest") == target  # what a resume looks up first
        assert not stale.exists() and alive.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_locked_temp_dir_is_kept_even_when_its_pid_is_gone(tmp_path):
    """A writer on another machine sharing the folder has a pid unknown here, but holds its dir's lock."""
    target = tmp_path / "latest"
    remote = tmp_path / f".latest.tmp-{dead_pid()}"
    remote.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(remote)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        write_dir_atomically(target, fill_with("x"))
        assert remote.exists()
    finally:
        holder.kill()
        holder.wait()
    write_dir_atomically(target, fill_with("y"))
    assert not remote.exists()


def test_a_symlinked_target_is_refused_and_its_target_left_alone(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_dir_atomically(elsewhere, fill_with("theirs"))
    target = tmp_path / "checkpoints" / "latest"
    target.parent.mkdir()
    os.symlink(elsewhere, target)
    with pytest.raises(UserError, match="symbolic link"):
        write_dir_atomically(target, fill_with("ours"))
    assert (elsewhere / "model_config.json").read_text() == "theirs" and target.is_symlink()
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest"]  # no temp dir leaked


def test_a_symlinked_old_dir_is_unlinked_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_dir_atomically(elsewhere, fill_with("theirs"))
    target = tmp_path / "checkpoints" / "latest"
    write_dir_atomically(target, fill_with("one"))
    os.symlink(elsewhere, target.parent / ".latest.old")
    write_dir_atomically(target, fill_with("two"))
    write_dir_atomically(target, fill_with("three"))
    assert (target / "model_config.json").read_text() == "three"
    assert (elsewhere / "model_config.json").read_text() == "theirs"
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest"]


def test_disk_full_is_one_line_naming_path_and_space_and_keeps_the_previous(tmp_path, monkeypatch):
    import gptforge.checkpoint as ckpt

    tok = build_tokenizer("byte")
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size))
    target = tmp_path / "latest"
    ckpt.save_checkpoint(target, model, tok, step=1)
    before = (target / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(UserError) as e:
        ckpt.save_checkpoint(target, model, tok, step=2)
    message = str(e.value)
    assert "\n" not in message and str(target) in message and "no space left" in message and "needs about" in message
    assert (target / "model.safetensors").read_bytes() == before and load_model(target)[2]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 384 KiB filesystem, where one can be mounted (root on Linux); skipped elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mount)], capture_output=True)
    except OSError as e:  # no mount command
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_one_line_too(tiny_tmpfs):
    tok = build_tokenizer("byte")
    small = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size))
    big = GPT(ModelConfig(n_layer=4, n_head=2, n_embd=96, block_size=16, vocab_size=tok.vocab_size))  # ~2 MB
    target = tiny_tmpfs / "latest"
    save_checkpoint(target, small, tok, step=1)
    with pytest.raises(UserError, match=f"no space left on the device to write {target}"):
        save_checkpoint(target, big, tok, step=2)
    assert load_model(target)[2]["step"] == 1
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["latest"]
    with pytest.raises(UserError, match="no space left on the device to write .*big.json: it needs about 1.049MB"):
        atomic_write_bytes(tiny_tmpfs / "big.json", b" " * (1 << 20))
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["latest"]


# --- through the command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run (and its data), made once; tests resume copies of it."""
    from gptforge.cli import main

    root = tmp_path_factory.mktemp("run")
    corpus = write_corpus(root / "corpus.txt", 200)
    main(tiny_train_args(root / "data", root / "run", "--data.source", str(corpus), "--data.tokenizer", "byte",
                         "--train.max_steps", "2", "--train.checkpoint_every", "1"))
    return root


def resume_args(root: Path, run: Path, steps: int = 4) -> list[str]:
    return tiny_train_args(root / "data", run, "--train.max_steps", str(steps), "--train.checkpoint_every", "1")


def copy_run(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    return run


def test_cli_resume_removes_a_killed_writers_temp_dir(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    stale = run / "checkpoints" / f".latest.tmp-{dead_pid()}"
    shutil.copytree(run / "checkpoints" / "latest", stale)
    result = run_cli(*resume_args(finished_run, run, 3), timeout=300)
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("linked", ["latest", ".latest.old"])
def test_cli_with_a_symlinked_checkpoint_folder(finished_run, tmp_path, linked):
    run = copy_run(finished_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run / "checkpoints" / "latest", elsewhere)
    checkpoints = run / "checkpoints"
    if linked == "latest":
        shutil.rmtree(checkpoints / "latest")
    os.symlink(elsewhere, checkpoints / linked)
    snapshot = sorted((p.relative_to(elsewhere), p.read_bytes()) for p in elsewhere.rglob("*") if p.is_file())
    result = run_cli(*resume_args(finished_run, run), timeout=300)
    lines = result.stderr.strip().splitlines()
    if linked == "latest":  # refused, at once: the run would replace the user's link at its first save
        assert result.returncode == 2 and len(lines) == 1 and "symbolic link" in lines[0], result.stderr
    else:  # our scratch name: the link is dropped (not followed) and the run goes on
        assert result.returncode == 0, result.stderr
        assert not (checkpoints / ".latest.old").exists()
        assert json.loads((checkpoints / "latest" / "meta.json").read_text())["step"] == 4
    assert sorted((p.relative_to(elsewhere), p.read_bytes()) for p in elsewhere.rglob("*") if p.is_file()) == snapshot
    assert not [p.name for p in checkpoints.iterdir() if ".tmp-" in p.name]


def test_cli_disk_full_during_a_checkpoint_is_one_line(finished_run, tmp_path):
    """The real CLI in a subprocess whose checkpoint writer finds the disk full (patched in that process,
    before main runs: no test hook in the product)."""
    run = copy_run(finished_run, tmp_path)
    previous = (run / "checkpoints" / "latest" / "model.safetensors").read_bytes()
    driver = ("import errno, sys\n"
              "import gptforge.checkpoint as c\n"
              "def full(*a, **k):\n"
              "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "c.save_file = full\n"
              "from gptforge.cli import main\n"
              "main(sys.argv[1:])\n")
    result = subprocess.run([sys.executable, "-c", driver, *resume_args(finished_run, run)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no space left" in lines[0] and str(run / "checkpoints") in lines[0] and "B are free" in lines[0]
    assert (run / "checkpoints" / "latest" / "model.safetensors").read_bytes() == previous
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]


# --- the weights file is checked before the model is built (issue 10, item 8) -------------------------
def test_weights_header_is_checked_before_the_model_is_built_or_read(finished_run, tmp_path, monkeypatch):
    import gptforge.checkpoint as ckpt
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ckpt"
    shutil.copytree(finished_run / "run" / "checkpoints" / "latest", path)
    config = json.loads((path / "model_config.json").read_text())
    (path / "model_config.json").write_text(json.dumps({**config, "n_layer": 200}))
    built = []
    monkeypatch.setattr(ckpt, "GPT", lambda cfg: built.append(cfg.n_layer) or GPT(cfg))
    monkeypatch.setattr(ckpt, "load_file", lambda *a, **k: pytest.fail("tensors read before the header check"))
    with pytest.raises(UserError, match=r"missing \[.transformer\.h\.10"):
        load_model(path)
    assert max(built, default=0) <= 1  # at most the one-block model that names the tensors
    state = load_file(str(path / "model.safetensors"))
    state["transformer.h.0.mlp.c_fc.weight"] = state["transformer.h.0.mlp.c_fc.weight"][:, :8].contiguous()
    save_file(state, str(path / "model.safetensors"))
    (path / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"transformer.h.0.mlp.c_fc.weight has shape \(128, 8\)"):
        load_model(path)
