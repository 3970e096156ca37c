"""The README's main job, shrunk to seconds: fetch the built-in corpus, prepare, train, sample. The run is
a fixed number of steps, so the result does not depend on how fast the machine is; sizing a run to a time
budget is tested on its own, with a clock the test controls."""

import json

import pytest

from gptforge.common import setup_runtime
from gptforge.config import ModelConfig
from gptforge.apps.quickstart import quickstart, seconds_per_step, steps_for_budget


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys, monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("a fixed step count must not time the machine")

    monkeypatch.setattr("gptforge.apps.quickstart.seconds_per_step", no_timing)
    run_dir = tmp_path / "qs"
    quickstart(run_dir=run_dir, steps=50, device="cpu")
    out = capsys.readouterr().out
    assert "training 50 steps" in out
    assert out.count("ROMEO:") >= 2  # two samples printed
    assert "best checkpoint: step" in out
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


def test_the_run_is_sized_to_the_budget_by_the_measured_step_time():
    # start/end readings of four timed steps: the first (one-off allocations) is ignored, the fastest counts
    ticks = iter([0.0, 9.0, 10.0, 10.5, 11.0, 11.25, 12.0, 12.5])
    model = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)
    step_s = seconds_per_step(model, 2, setup_runtime("cpu", "float32"), clock=lambda: next(ticks))
    assert step_s == 0.25
    assert steps_for_budget(step_s, minutes=1) == 216  # 90% of 60 s at 0.25 s per step
    assert steps_for_budget(step_s, minutes=3) == 648
    assert steps_for_budget(10.0, minutes=1) == 50  # never fewer than 50 steps
