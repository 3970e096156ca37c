"""Atomic directory writes: what a kill or a failure at any point leaves behind."""

import os

import pytest

from gptforge.checkpoint import run_checkpoint
from gptforge.common import default_file_mode, recover_interrupted_swap, write_dir_atomically


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
