"""Decoding speed side by side on the same weights: gptforge (float32, bf16 or int8 weights), llama.cpp (F32
and Q8_0 GGUF from `gptforge export-gguf`, through llama-cpp-python), onnxruntime (fp32 and int8 from
`gptforge export-onnx`) and transformers' GPT2LMHeadModel.generate.

GPT-2 124M architecture, random seeded weights, a 16-token prompt, 128 new tokens, greedy, KV cache
everywhere (llama.cpp with its default F16 cache: a few MB here, next to 500 MB of weights). The exports are
made once into --workdir and reused.

    python bench/bench_decode.py                                  # everything installed, 1 thread and all
    python bench/bench_decode.py --engines gptforge,llama.cpp --threads 2 --repeats 7
    python bench/bench_decode.py --batch 8 --engines gptforge,transformers,onnxruntime

What bounds it: at batch 1 every step reads every weight once (~500 MB in float32, ~130 MB in int8), so on
a CPU the step time is about bytes / memory bandwidth, plus each engine's overhead.

How it is measured on a shared machine: each repeat runs every contender once, in a fixed order (ABAB...),
so a busy neighbour slows all of them alike instead of whichever ran during the spike; reported are the
median tokens/s, the range over the repeats, ratios against llama.cpp at the same thread count, and the
load average. Tokens are compared with gptforge float32's (random weights have small logit margins, so
quantized engines may differ after a while; quality is measured on a trained model by
bench/bench_quantize.py). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import benchutil  # noqa: E402
from gptforge import native  # noqa: E402
from gptforge.config import ModelConfig, resolve_model_config  # noqa: E402
from gptforge.engine import Engine, SamplingParams  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.quantize import quantize_model  # noqa: E402

ENGINES = ("gptforge", "llama.cpp", "onnxruntime", "transformers")
WEIGHTS = {"gptforge": ("torch", "f32", "bf16", "int8"), "llama.cpp": ("F32", "Q8_0"),
           "onnxruntime": ("fp32", "int8"), "transformers": ("fp32",)}


def hf_copy(model: GPT):
    """A transformers GPT2LMHeadModel holding exactly our model's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                        tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to wte on both sides
        if name == "transformer.wte.weight":
            tensor = tensor[: cfg.vocab_size]  # drop our padding rows
        elif name.endswith(conv1d):
            tensor = tensor.t()  # nn.Linear (out, in) -> Conv1D (in, out)
        state[name] = tensor.contiguous()
    for name, tensor in hf.state_dict().items():  # a model without biases: GPT-2's zero biases compute the same
        if name.endswith(".bias") and name not in state and not name.endswith(".attn.bias"):
            state[name] = torch.zeros_like(tensor)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith((".attn.bias", ".masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {missing}, unexpected {unexpected}")
    return hf


def exports(model: GPT, workdir: Path, engines: set[str]) -> dict[str, Path]:
    """The model's checkpoint, GGUF and ONNX files under workdir, made once per preset and seed."""
    from gptforge.checkpoint import is_checkpoint, save_checkpoint
    from gptforge.tokenizer import GPT2Tokenizer

    ckpt = workdir / "checkpoint"
    if not is_checkpoint(ckpt):
        save_checkpoint(ckpt, model, GPT2Tokenizer())
    files = {}
    if "llama.cpp" in engines:
        from gptforge.export import export_gguf

        for t in ("f32", "q8_0"):
            files[t] = workdir / f"model-{t}.gguf"
            if not files[t].exists():
                print(f"exporting {files[t].name} ...", flush=True)
                export_gguf(ckpt, files[t], weight_type=t)
    if "onnxruntime" in engines:
        from gptforge.export import export_onnx

        for name, int8 in (("onnx-fp32", False), ("onnx-int8", True)):
            files[name] = workdir / name
            if not (files[name] / "model.onnx").exists():
                print(f"exporting {name} ...", flush=True)
                export_onnx(ckpt, files[name], int8=int8, force=True)
    return files


# --- contenders: each a function returning the generated ids (batch, n) -----------------------------------
def gptforge_run(model: GPT, prompt: torch.Tensor, n: int):
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=n, temperature=0.0)
    return lambda: engine.generate(prompt.tolist(), params)


def llama_run(path: Path, threads: int, prompt: torch.Tensor, n: int):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=prompt.size(1) + n + 8, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    ids = prompt[0].tolist()

    def run():
        out = []
        for token in llm.generate(ids, temp=0.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return [out]
    return run


def onnx_run(folder: Path, threads: int, prompt: torch.Tensor, n: int):
    """A cached greedy loop with onnxruntime alone (the README's example, batched)."""
    import json

    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    d = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    names = [d["inputs"]["past_key_names"] % i for i in range(d["num_hidden_layers"])], \
        [d["inputs"]["past_value_names"] % i for i in range(d["num_hidden_layers"])]
    B = prompt.size(0)

    def run():
        empty = np.zeros((B, d["num_key_value_heads"], 0, d["head_size"]), np.float32)
        past = {name: empty for pair in zip(*names) for name in pair}
        new, length, out = prompt.numpy(), prompt.size(1), []
        for _ in range(n):
            logits, *present = session.run(None, {"input_ids": new, "attention_mask": np.ones((B, length), np.int64),
                                                  **past})
            new = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            out.append(new[:, 0])
            past, length = dict(zip(past, present)), length + 1
        return np.stack(out, 1).tolist()
    return run


def hf_run(hf, prompt: torch.Tensor, n: int):
    def run():
        with torch.inference_mode():
            # eos disabled (eos_token_id=None) so every engine writes exactly n tokens
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                              max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        return out[:, prompt.size(1):].tolist()
    return run


def contenders(args, model: GPT, prompt: torch.Tensor) -> list[tuple[str, str, int, object]]:
    """(engine, weights, threads, run) in the order each repeat runs them."""
    engines = set(args.engines)
    files = exports(model, Path(args.workdir), engines & {"llama.cpp", "onnxruntime"})
    n, out = args.new_tokens, []
    ours = {w: model if w == "torch" else _packed_copy(model, w) for w in args.quantize} if "gptforge" in engines else {}
    hf = hf_copy(model) if "transformers" in engines else None
    for threads in args.threads:
        for w in args.quantize if "gptforge" in engines else ():
            out.append(("gptforge", w, threads, gptforge_run(ours[w], prompt, n)))
        if "llama.cpp" in engines and args.batch == 1:
            out += [("llama.cpp", "F32", threads, llama_run(files["f32"], threads, prompt, n)),
                    ("llama.cpp", "Q8_0", threads, llama_run(files["q8_0"], threads, prompt, n))]
        if "onnxruntime" in engines:
            out += [("onnxruntime", "fp32", threads, onnx_run(files["onnx-fp32"], threads, prompt, n)),
                    ("onnxruntime", "int8", threads, onnx_run(files["onnx-int8"], threads, prompt, n))]
        if hf is not None:
            out.append(("transformers", "fp32", threads, hf_run(hf, prompt, n)))
    return out


def _packed_copy(model: GPT, weights: str) -> GPT:
    """A second model with the same weights, packed (the plain one stays for the torch column)."""
    copy = GPT(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return quantize_model(copy, None if weights == "f32" else weights)


def measure(runs: list[tuple[str, str, int, object]], repeats: int) -> list[dict]:
    """Every contender once per repeat, in order; torch's thread count set to each one's before it runs."""
    results = [{"engine": e, "weights": w, "threads": t, "times": [], "tokens": None} for e, w, t, _ in runs]
    for rep in range(repeats + 1):  # the first round warms up (allocators, lazy initialisation) and is dropped
        for r, (_, _, threads, run) in zip(results, runs):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            tokens = run()
            if rep:
                r["times"].append(time.perf_counter() - t0)
            r["tokens"] = tokens
        print(f"repeat {rep}/{repeats} done (load {benchutil.load_average():.1f})", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=",".join(e for e in ENGINES if e == "gptforge" or _installed(e)),
                    help="comma-separated: " + ", ".join(ENGINES) + " (default: those installed)")
    ap.add_argument("--quantize", default="torch,f32,int8",
                    help="gptforge's weights, comma-separated: torch (plain nn.Linear, no packing), f32, bf16, int8")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (llama.cpp: batch 1 only)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "gptforge" / "bench_decode"),
                    help="where the checkpoint and its exports are kept between runs")
    args = ap.parse_args()
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.quantize = [w.strip() for w in args.quantize.split(",") if w.strip()]
    args.threads = sorted({int(t) for t in args.threads.split(",")})
    bad = [e for e in args.engines if e not in ENGINES] + [w for w in args.quantize if w not in WEIGHTS["gptforge"]]
    if bad:
        raise SystemExit(f"unknown engine or weight type: {', '.join(bad)}")

    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset=args.preset, vocab_size=50257))).eval()
    args.workdir = str(Path(args.workdir) / f"{args.preset}-seed0")
    prompt = torch.randint(0, 50257, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    results = measure(contenders(args, model, prompt), args.repeats)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    report(args, results, load_start, load_end)


def report(args, results: list[dict], load_start, load_end) -> None:
    ntok = args.batch * args.new_tokens
    for r in results:
        rates = sorted(ntok / t for t in r["times"])
        r["median"], r["low"], r["high"] = statistics.median(rates), rates[0], rates[-1]
    by = {(r["engine"], r["weights"], r["threads"]): r for r in results}
    reference = {t: by.get(("gptforge", "torch", t)) or by.get(("gptforge", "f32", t)) for t in args.threads}
    print(f"\n{datetime.date.today()}, {benchutil.cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}"
          f"{_versions()}; gptforge products: {native.status()}")
    print(f"GPT-2 {args.preset} shape, batch {args.batch}, {args.prompt_tokens}-token prompt + {args.new_tokens} new "
          f"tokens, greedy; median of {args.repeats} interleaved repeats (range); load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load_start)} at the start, {'/'.join(f'{x:.1f}' for x in load_end)} at the end")
    print(f"`{benchutil.command_line()}`\n")
    print("| engine | weights | threads | tok/s (median) | range | / llama.cpp F32 | / llama.cpp Q8_0 | "
          "tokens = gptforge fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        f32, q8 = by.get(("llama.cpp", "F32", r["threads"])), by.get(("llama.cpp", "Q8_0", r["threads"]))
        ref = reference[r["threads"]]
        same = "-" if ref is None or ref is r else ("yes" if r["tokens"] == ref["tokens"] else
                                                    f"first {_agreeing_prefix(r['tokens'], ref['tokens'])}")
        print(f"| {r['engine']} | {r['weights']} | {r['threads']} | **{r['median']:.1f}** | "
              f"{r['low']:.1f}-{r['high']:.1f} | {_ratio(r, f32)} | {_ratio(r, q8)} | {same} |")


def _ratio(r: dict, base) -> str:
    return "-" if base is None or base is r else f"{r['median'] / base['median']:.2f}x"


def _agreeing_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens generated alike before the first difference (the least over the batch's rows)."""
    return min(next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra)) for ra, rb in zip(a, b))


def _installed(engine: str) -> bool:
    module = {"llama.cpp": "llama_cpp", "onnxruntime": "onnxruntime", "transformers": "transformers"}[engine]
    return importlib.util.find_spec(module) is not None


def _versions() -> str:
    out = []
    for label, module in (("llama-cpp-python", "llama_cpp"), ("onnxruntime", "onnxruntime"),
                          ("transformers", "transformers")):
        if importlib.util.find_spec(module) is not None:
            out.append(f"{label} {__import__(module).__version__}")
    return (", " + ", ".join(out)) if out else ""


if __name__ == "__main__":
    main()
