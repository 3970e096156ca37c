"""The README's main job, shrunk to seconds: fetch the built-in corpus, prepare, train, sample. The run is
a fixed recipe with a fixed number of steps, so the result does not depend on how fast or busy the
machine is; a finished run is not trained again."""

import json
from pathlib import Path

import pytest
import yaml

from gptforge.apps.quickstart import QUICKSTART_MODEL, QUICKSTART_STEPS, quickstart, quickstart_train_config

BENCH = Path(__file__).parent.parent / "bench" / "configs" / "shakespeare_char_cpu.yaml"


def test_the_recipe_is_the_benchmarked_one_and_fixed():
    """The quickstart trains bench/configs/shakespeare_char_cpu.yaml's tuned recipe (docs/benchmarks.md),
    for a step count that nothing measured on this machine changes."""
    bench = yaml.safe_load(BENCH.read_text())
    tc = quickstart_train_config(Path("r"), "cpu", "auto", QUICKSTART_STEPS)
    for key, value in bench["model"].items():
        assert getattr(QUICKSTART_MODEL, key) == value, key
    for key in ("micro_batch_size", "lr", "warmup_steps", "min_lr_ratio", "beta2", "weight_decay",
                "eval_every", "eval_batches"):
        assert getattr(tc, key) == bench["train"][key], key
    # longer than the benchmark's 2000 steps, whose end measured val 1.913 once issue 12 changed the data order:
    # 3000 measured 1.844 (docs/runs.md), a margin under the promised 1.90
    assert tc.max_steps == QUICKSTART_STEPS == 3000 > bench["train"]["max_steps"]
    assert tc.time_limit_s is None  # time never cuts the run short


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "qs"
    quickstart(run_dir=run_dir, steps=50, device="cpu")
    out = capsys.readouterr().out
    assert "training 50 steps" in out
    assert out.count("ROMEO:") >= 2  # two samples printed
    assert "best checkpoint: step" in out
    assert f"gptforge serve {run_dir}" in out and "web app" in out
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["source"] == "shakespeare" and manifest["tokenizer"]["kind"] == "char"
    assert manifest["splits"]["train"]["tokens"] > 4_000_000  # the 42 works, not a stub
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "checkpoints/best/model.safetensors",
                 "checkpoints/latest/trainer/state.json"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 50
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    # below uniform over ~85 characters (4.44): it learned something in 50 steps
    assert vals and vals[-1] < 3.6

    # run again: the finished run is reported (and still sampled and pointed at), not trained again
    def no_training(*args, **kwargs):
        raise AssertionError("a finished quickstart run must not train again")

    monkeypatch.setattr("gptforge.train.pretrain.run_training", no_training)
    before = (run_dir / "metrics.jsonl").read_text()
    quickstart(run_dir=run_dir, steps=50, device="cpu")
    out = capsys.readouterr().out
    assert "already holds a finished run (step 50 of 50)" in out and "--run_dir" in out
    assert "best checkpoint: step" in out and f"gptforge serve {run_dir}" in out
    assert (run_dir / "metrics.jsonl").read_text() == before
