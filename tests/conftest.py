"""Shared test fixtures.

No test needs ../shared/: real data comes from the small slices in tests/fixtures/ (see its README).
"""

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Keep tests from reading or writing the user's ~/.cache/gptforge, except the shakespeare download
    # cache, which tests share through GPTFORGE_TEST_CACHE to avoid fetching it more than once.
    shared_cache = os.environ.get("GPTFORGE_TEST_CACHE")
    monkeypatch.setenv("GPTFORGE_CACHE", shared_cache or str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_bpe_run(tmp_path_factory) -> Path:
    """A run directory of a tiny GPT trained here (block size 128, a 512-token BPE learned here too) on the
    committed WikiText slice: the trained model the export tests prove against llama.cpp and onnxruntime."""
    from gptforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from gptforge.train.pretrain import run_training

    root = tmp_path_factory.mktemp("tiny_bpe")
    data = DataConfig(source=str(Path(__file__).parent / "fixtures" / "wikitext2_valid_head.txt"),
                      dir=str(root / "data"), tokenizer="bpe", bpe_vocab_size=512, num_proc=1)
    train = TrainConfig(run_dir=str(root / "run"), device="cpu", progress=False, plot=False, max_steps=150,
                        micro_batch_size=16, lr=5e-3, warmup_steps=10, eval_every=0, eval_batches=2)
    run_training(RunConfig(model=ModelConfig(preset="tiny", block_size=128), data=data, train=train))
    return root / "run"
