"""The README's main job, shrunk to seconds: fetch the built-in corpus, prepare, train, sample."""

import json

import pytest

from gptforge.quickstart import quickstart


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "qs"
    quickstart(run_dir=run_dir, minutes=0.05, device="cpu")
    out = capsys.readouterr().out
    assert out.count("ROMEO:") >= 2  # two samples printed
    assert "best checkpoint: step" in out
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["source"] == "shakespeare" and manifest["tokenizer"]["kind"] == "char"
    assert manifest["splits"]["train"]["tokens"] > 4_000_000  # the 42 works, not a stub
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "checkpoints/best/model.safetensors",
                 "checkpoints/latest/trainer/state.json"):
        assert (run_dir / name).is_file(), name
    vals = [r["val_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r]
    # below uniform over ~85 characters (4.44): it learned something, even in the minimum of 50 steps
    assert vals and vals[-1] < 3.6
