"""Files from outside (checkpoints, model folders, run and data folders) that are malformed or hostile: each
is refused with one line (exit 2), never a traceback, a hang or an allocation sized by the file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptforge.common import UserError
from gptforge.checks import from_dict
from gptforge.config import ModelConfig, RunConfig, resolve_model_config
from helpers import REPO, run_cli

import hostile_files

DRIVER_TIMEOUT_S = 900  # a hang guard for ~120 cases on a busy 2-core machine, not a speed requirement


def one_line_refusal(code, stderr: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return code == 2 and len(lines) == 1 and "Traceback" not in stderr and lines[0].startswith("gptforge: error:")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    hostile_files.build_inputs(work)
    return work


def test_every_malformed_file_is_one_line_without_hang(work):
    """The fuzz run: every generated variant through the CLI (in one driver process, an alarm per case)."""
    done = subprocess.run([sys.executable, str(Path(hostile_files.__file__)), str(work)], capture_output=True,
                          text=True, timeout=DRIVER_TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(REPO)})
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(hostile_files.cases()) >= 50, done.stderr[-3000:]
    bad = [f"{r['case']} ({r['command']}): code {r['code']}, timed out {r['timed_out']}: {r['stderr'][-400:]}"
           for r in results if r["timed_out"] or not one_line_refusal(r["code"], r["stderr"])]
    assert not bad, "\n".join(bad)


# Cases that also run as real processes: the hangs, the allocations and the reads of /dev/zero of before.
REAL_PROCESS_CASES = ["config n_layer 1e5", "config block_size 1e12", "meta link to /dev/zero",
                      "weights is a FIFO", "config n_head 0", "hf: index points to ../"]


@pytest.mark.parametrize("name", REAL_PROCESS_CASES)
def test_hostile_checkpoint_in_a_real_process(work, name):
    index = [c[0] for c in hostile_files.cases()].index(name)
    _, argv = hostile_files.materialize(work, index)
    result = run_cli(*argv, timeout=120)
    assert one_line_refusal(result.returncode, result.stderr), (argv, result.returncode, result.stderr[-2000:])


# --- the validating reader ---------------------------------------------------------------------------------
def test_read_json_refuses_what_is_not_a_small_regular_json_file_inside_its_folder(tmp_path):
    from gptforge.files import read_json

    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "ok.json").write_text('{"a": 1}')
    assert read_json(root / "ok.json", root=root) == {"a": 1}
    (root / "dir.json").mkdir()
    os.symlink("/dev/zero", root / "zero.json")
    os.symlink(root / "loop.json", root / "loop.json")
    os.mkfifo(root / "fifo.json")
    (tmp_path / "outside.json").write_text("{}")
    os.symlink(tmp_path / "outside.json", root / "out.json")
    (root / "big.json").write_bytes(b" " * 2048 + b"{}")
    (root / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    for name, fragment in [("dir.json", "not a regular file"), ("zero.json", "points outside"),
                           ("loop.json", "cannot be read"), ("fifo.json", "a FIFO"), ("out.json", "points outside"),
                           ("latin1.json", "not UTF-8"), ("deep.json", "nests too deeply")]:
        with pytest.raises(UserError, match=fragment):
            read_json(root / name, root=root)
    with pytest.raises(UserError, match="larger than"):
        read_json(root / "big.json", root=root, max_bytes=1024)
    with pytest.raises(FileNotFoundError):
        read_json(root / "missing.json", root=root)


def test_from_dict_checks_types_from_the_annotations():
    for values, fragment in [({"n_layer": "2"}, "n_layer must be an integer"), ({"n_layer": 2.5}, "an integer"),
                             ({"n_layer": True}, "an integer"), ({"bias": 1}, "true or false"),
                             ({"preset": 3}, "a string"), ({"dropout": "x"}, "a number")]:
        with pytest.raises(UserError, match=fragment):
            from_dict(ModelConfig, values, "model_config.json")
    assert from_dict(ModelConfig, {"dropout": 0, "preset": None}).dropout == 0.0  # an int is a number
    with pytest.raises(UserError, match=r"train.eval_tasks\[1\] must be a string"):
        from_dict(RunConfig, {"train": {"eval_tasks": ["hellaswag", 3]}})
    with pytest.raises(UserError, match="train.lr_decay_steps must be an integer"):
        from_dict(RunConfig, {"train": {"lr_decay_steps": "10"}})
    assert from_dict(RunConfig, {"train": {"lr_decay_steps": None}}).train.lr_decay_steps is None


def test_model_config_checks_positivity_before_dividing_and_refuses_absurd_sizes():
    from gptforge.config import MODEL_LIMITS

    with pytest.raises(UserError, match="n_head must be positive"):
        resolve_model_config(ModelConfig(n_head=0))
    for name, value in [("n_layer", 100_000), ("block_size", 10**12), ("n_embd", 10**12), ("vocab_size", 10**12)]:
        with pytest.raises(UserError, match=f"model.{name}={value} is beyond the largest supported"):
            ModelConfig(**{name: value, **({"n_head": 1} if name == "n_embd" else {})}).validate()
    with pytest.raises(UserError, match="parameters, beyond the largest supported"):  # each size allowed, not all
        ModelConfig(n_layer=MODEL_LIMITS["n_layer"], n_head=64, n_embd=MODEL_LIMITS["n_embd"]).validate()


def test_parameter_count_from_the_config_matches_the_model():
    from gptforge.model import GPT

    for bias, tie in [(True, True), (False, False)]:
        cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100, bias=bias, tie_embeddings=tie)
        assert cfg.parameter_count == sum(p.numel() for p in GPT(cfg).parameters())


@pytest.mark.parametrize("option, value, fragment", [("n_head", "0", "model.n_head must be positive"),
                                                     ("n_layer", "100000", "model.n_layer=100000 is beyond")])
def test_cli_model_options_that_cannot_be_built_are_one_line(work, tmp_path, option, value, fragment):
    result = run_cli("train", "--model.preset", "tiny", f"--model.{option}", value, "--data.dir", str(work / "data"),
                     "--train.run_dir", str(tmp_path / "run"), *hostile_files.TINY, timeout=120)
    assert one_line_refusal(result.returncode, result.stderr) and fragment in result.stderr, result.stderr
