"""Run management: `gptforge --version`, `gptforge runs` (listing what run directories hold, a broken run
as one line), shell completion, and the loss plot's title and score markers."""

import shutil
import subprocess
from pathlib import Path

import pytest

from gptforge import __version__
from gptforge.cli import main
from gptforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from gptforge.data.prepare import prepare
from gptforge.train.metrics import loss_figure
from gptforge.train.pretrain import run_training
from gptforge.train.runs import find_runs, summarize_run
from helpers import write_corpus


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """A folder with one finished tiny pretraining run in it."""
    root = tmp_path_factory.mktemp("runs")
    cfg = DataConfig(source=str(write_corpus(root.parent / "corpus.txt", n_lines=200)), tokenizer="byte",
                     num_proc=1)
    prepare(cfg, root.parent / "shards", progress=False)
    run_training(RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32),
                           data=DataConfig(dir=str(root.parent / "shards")),
                           train=TrainConfig(run_dir=str(root / "tiny"), device="cpu", micro_batch_size=4,
                                             max_steps=6, eval_every=3, eval_batches=2, log_every=1,
                                             progress=False, plot=False)))
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
