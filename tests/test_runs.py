"""Run management: `gptforge --version`, `gptforge runs` (listing what run directories hold, a broken run
as one line), shell completion, and the loss plot's title and score markers."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gptforge import __version__
from gptforge.cli import main
from gptforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from gptforge.train.metrics import loss_figure
from gptforge.train.pretrain import run_training
from gptforge.train.history import effective_config
from gptforge.train.notices import cpu_model_notice
from gptforge.train.runs import find_runs, summarize_run
from helpers import prepared_byte_corpus


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return prepared_byte_corpus(tmp_path_factory.mktemp("data"), n_lines=200)


def tiny_run(shards, run_dir, **train) -> RunConfig:
    """A seconds-long pretraining run's config: a 1-layer byte model, every step logged."""
    settings = dict(run_dir=str(run_dir), device="cpu", micro_batch_size=4, max_steps=6, eval_every=3, eval_batches=2,
                    log_every=1, progress=False, plot=False)
    settings.update(train)
    return RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32),
                     data=DataConfig(dir=str(shards)), train=TrainConfig(**settings))


@pytest.fixture(scope="module")
def runs_root(shards, tmp_path_factory):
    """A folder with one finished tiny pretraining run in it."""
    root = tmp_path_factory.mktemp("runs")
    run_training(tiny_run(shards, root / "tiny"))
    return root


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"gptforge {__version__}"


def test_runs_lists_what_the_run_directory_holds(runs_root, capsys):
    s = summarize_run(runs_root / "tiny")
    assert (s.kind, s.step, s.max_steps, s.problem) == ("pretrain", 6, 6, "")
    assert s.tokens == 6 * 4 * 32 and s.best_val_loss is not None and s.size_bytes > 10_000
    main(["runs", str(runs_root)])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("tiny"))
    assert "pretrain" in line and "6/6" in line and f"{s.best_val_loss:.4f}" in line and "768" in line
    main(["runs", str(runs_root / "tiny")])  # a run directory itself lists that run
    assert "6/6" in capsys.readouterr().out


def test_a_broken_run_is_one_line_not_a_traceback(runs_root, tmp_path, capsys):
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "tiny", root / "good")
    shutil.copytree(runs_root / "tiny", root / "bad-state")
    (root / "bad-state" / "checkpoints" / "latest" / "trainer" / "state.json").write_text("[1, 2]")
    (root / "bad-yaml").mkdir()
    (root / "bad-yaml" / "config.yaml").write_text("train: [unclosed")
    (root / "not-a-run").mkdir()
    assert [p.name for p in find_runs(root)] == ["bad-state", "bad-yaml", "good"]
    main(["runs", str(root)])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "corrupt" in lines["bad-state"] and "not valid YAML" in lines["bad-yaml"]
    assert "6/6" in lines["good"] and "Traceback" not in out
    with pytest.raises(SystemExit) as e:
        main(["runs", str(tmp_path / "missing")])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err


def test_bash_completion_completes_commands_and_options(capsys):
    main(["completion", "bash"])
    script = capsys.readouterr().out

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        probe = (f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _gptforge; '
                 'printf "%s\\n" "${COMPREPLY[@]}"')
        return subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60,
                              check=True).stdout.split()

    assert complete("gptforge", "tr") == ["train"]
    assert set(complete("gptforge", "ru")) == {"runs"}
    assert {"--version", "quickstart", "runs", "completion"} <= set(complete("gptforge", ""))
    assert complete("gptforge", "generate", "--stre") == ["--stream"]
    assert "--train.max_steps" in complete("gptforge", "train", "--train.max")
    main(["completion", "zsh"])
    zsh = capsys.readouterr().out
    assert zsh.startswith("#compdef gptforge") and "bashcompinit" in zsh and "_gptforge()" in zsh
    with pytest.raises(SystemExit):
        main(["completion", "fish"])
    assert "bash and zsh" in capsys.readouterr().err


def test_loss_plot_has_the_run_name_and_a_single_score_is_visible():
    import matplotlib.pyplot as plt

    records = [{"step": 1, "loss": 2.0}, {"step": 5, "loss": 1.0}, {"step": 5, "val_loss": 1.2},
               {"step": 5, "val/acc": 0.75}]
    fig = loss_figure(records, "my-run")
    try:
        assert fig._suptitle.get_text() == "my-run"
        scores = fig.axes[1]
        [line] = scores.get_lines()
        assert line.get_marker() == "o" and line.get_markersize() >= 5  # one point: a marker, not a line
        lo, hi = scores.get_ylim()
        assert lo <= 0.75 <= hi and hi - lo >= 0.5  # on a readable scale, not a degenerate range
        assert any("0.750" in t.get_text() for t in scores.texts)
    finally:
        plt.close(fig)


def test_gitignore_covers_the_readme_example_outputs_and_nothing_of_the_package():
    repo = Path(__file__).parent.parent
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    written = ["runs/quickstart/metrics.jsonl", "data/mytext/manifest.json", "ckpt/gpt2/model.safetensors",
               "export/quickstart/config.json", "quickstart.gguf", "quickstart-onnx/model.onnx"]
    ours = ["gptforge/data/prepare.py", "tests/fixtures/README.md", "bench/configs/shakespeare_char_cpu.yaml"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *written, *ours], cwd=repo, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.split() == written


# --- resuming: what changed is said and kept --------------------------------------------------------
def test_resume_with_changed_settings_says_so_and_keeps_the_history(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_training(tiny_run(shards, run_dir, max_steps=4, lr=1e-3))
    original = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    run_training(tiny_run(shards, run_dir, max_steps=6, lr=2e-3, eval_every=2))
    out = capsys.readouterr().out
    assert "resuming at step 4 with 3 changed settings" in out
    assert "train.lr: 0.001 -> 0.002  (changes training from here on)" in out
    assert "train.max_steps: 4 -> 6\n" in out and "train.eval_every: 3 -> 2\n" in out
    assert (run_dir / "config.yaml").read_text() == original  # the run's beginning stays on record
    [entry] = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert entry["step"] == 4 and entry["changes"] == {"train.lr": [1e-3, 2e-3], "train.max_steps": [4, 6],
                                                        "train.eval_every": [3, 2]}
    assert effective_config(run_dir)["train"]["lr"] == 2e-3
    assert summarize_run(run_dir).max_steps == 6  # `runs` reads the settings in force
    # the same settings again: nothing to say, nothing recorded
    run_training(tiny_run(shards, run_dir, max_steps=8, lr=2e-3, eval_every=2))
    out = capsys.readouterr().out
    assert "train.max_steps: 6 -> 8" in out and "train.lr" not in out
    assert len((run_dir / "config_history.jsonl").read_text().splitlines()) == 2


def test_ctrl_c_before_the_first_step_writes_no_checkpoint(shards, tmp_path, monkeypatch):
    from gptforge.data.loader import TokenLoader

    calls = {"n": 0}
    real = TokenLoader.next_batch

    def interrupted_at(n):
        def next_batch(self):
            calls["n"] += 1
            if calls["n"] > n:
                raise KeyboardInterrupt
            return real(self)
        return next_batch

    run_dir = tmp_path / "run"
    monkeypatch.setattr(TokenLoader, "next_batch", interrupted_at(0))
    with pytest.raises(KeyboardInterrupt, match="before a step was taken: nothing saved"):
        run_training(tiny_run(shards, run_dir))
    assert not (run_dir / "checkpoints" / "latest").exists()
    calls["n"] = 0
    monkeypatch.setattr(TokenLoader, "next_batch", interrupted_at(2))  # two steps, then Ctrl-C
    with pytest.raises(KeyboardInterrupt, match="at step 2; saved"):
        run_training(tiny_run(shards, run_dir))
    assert json.loads((run_dir / "checkpoints/latest/meta.json").read_text())["step"] == 2


def test_cpu_runs_say_what_is_built_and_how_long_a_step_takes(shards, tmp_path, capsys, monkeypatch):
    assert "--model.preset small-cpu" in cpu_model_notice(124_000_000, "cpu")
    assert cpu_model_notice(124_000_000, "cuda") is None and cpu_model_notice(800_000, "cpu") is None
    monkeypatch.setattr("gptforge.train.notices.CPU_COMFORTABLE_PARAMETERS", 1000)  # the tiny model is "large"
    run_training(tiny_run(shards, tmp_path / "run"))
    out = capsys.readouterr().out
    assert "note: training 0M parameters on a CPU" in out
    assert re.search(r"first step took \d+\.\d\d s: about \d+ s for the remaining 5 steps", out)
    assert out.index("note: training") < out.index("first step took")


def test_kept_checkpoints_hold_weights_only(shards, tmp_path):
    """keep_checkpoints (fine-tuning's per-epoch copies): no optimizer state; only latest resumes."""
    from gptforge.checkpoint import load_model

    run_dir = tmp_path / "run"
    run_training(tiny_run(shards, run_dir, checkpoint_every=3, keep_checkpoints=True))
    for step in (3, 6):
        kept = run_dir / "checkpoints" / f"step_{step:07d}"
        assert not (kept / "trainer").exists() and (kept / "model.safetensors").is_file()
        meta = json.loads((kept / "meta.json").read_text())
        assert meta["step"] == step and meta["resumable"] is False
        load_model(kept)
    assert (run_dir / "checkpoints/latest/trainer/optimizer.safetensors").is_file()


def test_the_loop_logs_to_tensorboard_what_it_writes_to_metrics_jsonl(shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_training(tiny_run(shards, run_dir, loggers=["jsonl", "tensorboard"]))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for key in ("loss", "val_loss", "lr"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(key)] == expected, key
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.lr"].number_value == TrainConfig().lr and hparams["model.n_layer"].number_value == 1
