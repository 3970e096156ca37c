"""Where a batch-1 decode step's time goes in gptforge with packed weights, GPT-2 124M shape: the blocks'
one-token steps in C (native/block.c: their weight products plus LayerNorm, attention over the cache and
GELU), the output head's product, and everything else (embeddings, final LayerNorm, Python).

    python bench/profile_decode_step.py [--quantize f32,int8] [--threads 1] [--steps 64]

PackedBlock and PackedLinear calls are timed with perf_counter around them (the kernels are synchronous),
summed over the decode steps of one greedy generation (the prompt's prefill excluded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gptforge.config import ModelConfig, resolve_model_config  # noqa: E402
from gptforge.model import GPT, KVCache  # noqa: E402
from gptforge.quantize import PackedBlock, PackedLinear, quantize_model  # noqa: E402


def timing(cls, spent: dict, key: str):
    """Wrap cls.forward to add its time to spent[key]."""
    forward = cls.forward

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = forward(self, *args, **kwargs)
        spent[key] += time.perf_counter() - t0
        return out

    cls.forward = timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", default="f32,int8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spent = {"blocks": 0.0, "products": 0.0}
    timing(PackedBlock, spent, "blocks")
    timing(PackedLinear, spent, "products")  # the head (and the blocks' products when they run in torch)
    torch.manual_seed(0)
    base = GPT(resolve_model_config(ModelConfig(preset="gpt2", vocab_size=50257))).eval()
    print(f"load average {os.getloadavg()[0]:.1f} at the start; {args.threads} thread(s)")
    for kind in args.quantize.split(","):
        model = GPT(base.config).eval()
        model.load_state_dict(base.state_dict())
        quantize_model(model, None if kind == "f32" else kind)
        for rep in range(2):  # the first pass warms up
            cache = KVCache(model.config, 1, 16 + args.steps + 1, torch.device("cpu"))
            with torch.inference_mode():
                logits, _ = model(torch.randint(0, 50257, (1, 16)), kv_cache=cache, last_only=True)
                spent.update(blocks=0.0, products=0.0)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    logits, _ = model(logits[:, -1].argmax(-1, keepdim=True), kv_cache=cache, last_only=True)
                total = time.perf_counter() - t0
        per = 1e3 / args.steps
        rest = total - spent["blocks"] - spent["products"]
        print(f"{kind}: {total * per:.2f} ms/step = blocks in C {spent['blocks'] * per:.2f} ms + head product "
              f"{spent['products'] * per:.2f} ms + the rest {rest * per:.2f} ms (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
