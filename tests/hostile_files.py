"""Malformed checkpoints, model folders, run folders and data folders, derived from good ones, driven
through the command line.

    python tests/hostile_files.py WORKDIR [--isolate] [--only NAME ...]

builds good inputs in WORKDIR (a short real training run, a LoRA adapter, a classifier, a Hugging Face
export and a sharded copy of it), derives every malformed variant from a fresh copy, runs each through
`gptforge.cli.main` and prints one JSON line per case: {"case", "code", "stderr", "timed_out"}.
By default the cases share this process (imports are paid once), each under an alarm that turns a hang
into a timeout. With --isolate each case runs in a subprocess of its own under a wall-clock limit, for
code that may hang or exhaust memory (the code before the hardening). A memory limit (RLIMIT_AS) keeps a
case that allocates by an untrusted number from taking the machine with it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO, write_corpus  # noqa: E402

CASE_TIMEOUT_S = 60
MEMORY_LIMIT = 6 << 30  # bytes of address space per case process

TINY = ["--train.device", "cpu", "--train.progress", "false", "--train.micro_batch_size", "2",
        "--train.eval_every", "0", "--train.eval_batches", "1", "--train.plot", "false",
        "--train.warmup_steps", "1", "--train.checkpoint_every", "1"]


# --- good inputs ------------------------------------------------------------------------------------------
def build_inputs(work: Path) -> None:
    """work/{corpus.txt, data, run, ckpt, lora, classifier, hf, hf_sharded}, made once."""
    if (work / "ready").exists():
        return
    import dataclasses

    import torch
    from safetensors.torch import load_file, save_file

    from gptforge.checkpoint import load_model, save_checkpoint
    from gptforge.cli import main
    from gptforge.interop import export_hf
    from gptforge.lora import LoRAConfig, apply_lora
    from gptforge.model import GPTClassifier

    work.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(work / "corpus.txt", 300)
    with contextlib.redirect_stdout(io.StringIO()):
        main(["train", "--data.source", str(corpus), "--data.tokenizer", "byte", "--data.dir", str(work / "data"),
              "--model.preset", "tiny", "--train.run_dir", str(work / "run"), "--train.max_steps", "2", *TINY])
    shutil.copytree(work / "run" / "checkpoints" / "latest", work / "ckpt")
    model, tok, _ = load_model(work / "ckpt")
    lora = LoRAConfig(rank=2)
    apply_lora(model, lora)
    save_checkpoint(work / "lora", model, tok, extra_meta={"lora": dataclasses.asdict(lora), "base": str(work / "ckpt")})
    base, _, _ = load_model(work / "ckpt")
    classifier = GPTClassifier(base.config, 2)
    classifier.load_state_dict(base.state_dict(), strict=False)
    save_checkpoint(work / "classifier", classifier, tok, extra_meta={"classifier": {"labels": ["neg", "pos"]}})
    export_hf(work / "ckpt", work / "hf")
    sharded = work / "hf_sharded"
    shutil.copytree(work / "hf", sharded)
    state = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, str(sharded / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    del torch
    (work / "ready").write_text("")


# --- mutations --------------------------------------------------------------------------------------------
Mutation = Callable[[Path], None]


def edit_json(rel: str, change: Callable[[object], object]) -> Mutation:
    def mutate(root: Path) -> None:
        path = root / rel
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return mutate


def set_keys(rel: str, **values) -> Mutation:
    return edit_json(rel, lambda d: {**d, **values})


def write(rel: str, content: bytes | str) -> Mutation:
    def mutate(root: Path) -> None:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return mutate


def sparse(rel: str, size: int) -> Mutation:
    """rel as a file of `size` zero bytes that takes no disk space."""
    def mutate(root: Path) -> None:
        with open(root / rel, "wb") as f:
            f.truncate(size)
    return mutate


def remove(rel: str) -> Mutation:
    def mutate(root: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return mutate


def link(rel: str, target: str) -> Mutation:
    """Replace rel by a symlink to target ('LOOP' makes a link to itself)."""
    def mutate(root: Path) -> None:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.symlink(path if target == "LOOP" else target, path)
    return mutate


def make_dir(rel: str) -> Mutation:
    def mutate(root: Path) -> None:
        (root / rel).unlink()
        (root / rel).mkdir()
    return mutate


def make_fifo(rel: str) -> Mutation:
    def mutate(root: Path) -> None:
        (root / rel).unlink()
        os.mkfifo(root / rel)
    return mutate


def edit_tensors(rel: str, change: Callable[[dict], dict]) -> Mutation:
    def mutate(root: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = root / rel
        state = change(load_file(str(path)))
        path.unlink()
        save_file(state, str(path))
    return mutate


def drop(name: str) -> Callable[[dict], dict]:
    return lambda s: {k: v for k, v in s.items() if k != name}


def reshape_first(s: dict) -> dict:
    name = "transformer.ln_f.weight"
    return {**s, name: s[name][:-1].clone()}


def as_int64(s: dict) -> dict:
    return {k: (v.long() if k == "transformer.ln_f.weight" else v) for k, v in s.items()}


def add_extra(s: dict) -> dict:
    import torch

    return {**s, "transformer.h.9.ln_1.weight": torch.zeros(32)}


def safetensors_header(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def both(*mutations: Mutation) -> Mutation:
    def mutate(root: Path) -> None:
        for m in mutations:
            m(root)
    return mutate


def corrupt_shard_same_size(root: Path) -> None:
    """Out-of-range ids (0xFFFF) in the middle of the first train shard, its size unchanged."""
    shard = root / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    data[100:108] = b"\xff" * 8
    shard.write_bytes(bytes(data))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- the cases ----------------------------------------------------------------------------------------------
MC, META, W, TOK = "model_config.json", "meta.json", "model.safetensors", "tokenizer/tokenizer.json"
STATE, OPT_JSON, OPT_W = "trainer/state.json", "trainer/optimizer.json", "trainer/optimizer.safetensors"
LOADERS = ("generate", "eval", "export", "init_from", "finetune", "serve")  # a checkpoint case rotates over these


def cases() -> list[tuple[str, str, Mutation, str]]:
    """(name, good input it starts from, mutation, command)."""
    ckpt: list[tuple[str, Mutation]] = [
        ("config n_head 0", set_keys(MC, n_head=0)),
        ("config n_layer '2'", set_keys(MC, n_layer="2")),
        ("config n_layer 2.5", set_keys(MC, n_layer=2.5)),
        ("config n_layer 1e5", set_keys(MC, n_layer=100_000)),
        ("config block_size 1e12", set_keys(MC, block_size=10**12)),
        ("config n_embd 1e12", set_keys(MC, n_embd=10**12, n_head=1)),
        ("config vocab_size 1e12", set_keys(MC, vocab_size=10**12)),
        ("config n_layer -1", set_keys(MC, n_layer=-1)),
        ("config vocab_multiple 0", set_keys(MC, vocab_multiple=0)),
        ("config dropout 1.5", set_keys(MC, dropout=1.5)),
        ("config dropout 'x'", set_keys(MC, dropout="x")),
        ("config bias 'yes'", set_keys(MC, bias="yes")),
        ("config bias 1", set_keys(MC, bias=1)),
        ("config n_layer true", set_keys(MC, n_layer=True)),
        ("config unknown key", set_keys(MC, attention="flash")),
        ("config is a list", write(MC, "[1, 2]")),
        ("config not JSON", write(MC, "{n_layer: 2")),
        ("config empty", write(MC, "")),
        ("config not UTF-8", write(MC, b'{"n_layer": "\xff\xfe"}')),
        ("config 5000-digit int", write(MC, '{"n_layer": ' + "9" * 5000 + "}")),
        ("config 1e400", write(MC, '{"n_layer": 1e400}')),
        ("config NaN dropout", write(MC, '{"dropout": NaN}')),
        ("config nested 100k", write(MC, nested(100_000))),
        ("config 40 MB", sparse(MC, 40 << 20)),
        ("config more layers than weights", set_keys(MC, n_layer=3)),
        ("config other width than weights", set_keys(MC, n_embd=64)),
        ("config untied, no lm_head", set_keys(MC, tie_embeddings=False)),
        ("config vocab_multiple changed", set_keys(MC, vocab_multiple=7)),
        ("config block_size changed", set_keys(MC, block_size=128)),
        ("config symlink to /etc/passwd", link(MC, "/etc/passwd")),
        ("meta is a list", write(META, "[]")),
        ("meta is a directory", make_dir(META)),
        ("meta symlink loop", link(META, "LOOP")),
        ("meta link to /dev/zero", link(META, "/dev/zero")),
        ("meta is a FIFO", make_fifo(META)),
        ("meta not JSON", write(META, "{")),
        ("meta not UTF-8", write(META, b"{\"step\": 1, \"x\": \"\xc3\x28\"}")),
        ("meta missing", remove(META)),
        ("meta classifier.labels 5", set_keys(META, classifier={"labels": 5})),
        ("meta classifier is a string", set_keys(META, classifier="yes")),
        ("meta classifier labels, no head", set_keys(META, classifier={"labels": ["a", "b"]})),
        ("meta lora unknown key", set_keys(META, lora={"rank": 2, "bogus": 1}, base="/nowhere")),
        ("meta lora is a number", set_keys(META, lora=5)),
        ("meta lora rank '2'", set_keys(META, lora={"rank": "2"}, base="/nowhere")),
        ("meta base is a number", set_keys(META, lora={"rank": 2}, base=7)),
        ("meta step 'x'", set_keys(META, step="x")),
        ("meta format 99", set_keys(META, format=99)),
        ("tokenizer not JSON", write(TOK, "nope")),
        ("tokenizer link to /dev/zero", link(TOK, "/dev/zero")),
        ("tokenizer 300 MB", sparse(TOK, 300 << 20)),
        ("tokenizer not UTF-8", write(TOK, b"\xff\xff")),
        ("tokenizer special ids", edit_json(TOK, lambda d: {**d, "special_tokens": {"<|endoftext|>": 7}})),
        ("tokenizer special_tokens list", edit_json(TOK, lambda d: {**d, "special_tokens": [1]})),
        ("tokenizer kind 5", edit_json(TOK, lambda d: {**d, "kind": 5})),
        ("tokenizer folder missing", remove("tokenizer")),
        ("weights missing", remove(W)),
        ("weights garbage", write(W, b"\x00garbage" * 10)),
        ("weights header length 2^60", write(W, struct.pack("<Q", 1 << 60) + b"{}")),
        ("weights header not JSON", write(W, struct.pack("<Q", 8) + b"{notjson")),
        ("weights header shape 1e12", write(W, safetensors_header(
            {"transformer.wte.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, b"0" * 16))),
        ("weights truncated", lambda root: (root / W).write_bytes((root / W).read_bytes()[:-100])),
        ("weights extra tensor", edit_tensors(W, add_extra)),
        ("weights missing tensor", edit_tensors(W, drop("transformer.ln_f.bias"))),
        ("weights wrong shape", edit_tensors(W, reshape_first)),
        ("weights int64 tensor", edit_tensors(W, as_int64)),
        ("weights link to /dev/zero", link(W, "/dev/zero")),
        ("weights is a directory", make_dir(W)),
        ("weights is a FIFO", make_fifo(W)),
        ("weights link outside the folder", lambda root: (shutil.copy(root / W, root.parent / "outside.safetensors"),
                                                          link(W, str(root.parent / "outside.safetensors"))(root))),
    ]
    out = [(name, "ckpt", m, LOADERS[i % len(LOADERS)]) for i, (name, m) in enumerate(ckpt)]
    out += [
        ("lora: base missing", "lora", set_keys(META, base="/nonexistent/base"), "generate"),
        ("lora: base is itself", "lora", lambda root: set_keys(META, base=str(root))(root), "generate"),
        ("lora: rank differs from weights", "lora", edit_json(META, lambda d: {**d, "lora": {**d["lora"], "rank": 3}}), "merge"),
        ("lora: targets unknown", "lora", edit_json(META, lambda d: {**d, "lora": {**d["lora"], "targets": ["ffn"]}}), "merge"),
        ("lora: vocab 1e9", "lora", set_keys(MC, vocab_size=10**9), "merge"),
        ("classifier: labels not strings", "classifier", set_keys(META, classifier={"labels": [1, 2]}), "classify"),
        ("classifier: 3 labels, 2-row head", "classifier", set_keys(META, classifier={"labels": ["a", "b", "c"]}), "classify"),
        ("classifier: labels empty", "classifier", set_keys(META, classifier={"labels": []}), "classify"),
        ("classifier: head missing", "classifier", edit_tensors(W, drop("classifier.weight")), "classify"),
    ]
    index = "model.safetensors.index.json"
    out += [(f"hf: {name}", "hf_sharded", m, "import") for name, m in [
        ("index weight_map numbers", edit_json(index, lambda d: {**d, "weight_map": {k: 1 for k in d["weight_map"]}})),
        ("index weight_map lists", edit_json(index, lambda d: {**d, "weight_map": {k: [v] for k, v in d["weight_map"].items()}})),
        ("index points to /etc/passwd", edit_json(index, lambda d: {**d, "weight_map": {**d["weight_map"], "wte.weight": "/etc/passwd"}})),
        ("index points to ../", edit_json(index, lambda d: {**d, "weight_map": {**d["weight_map"], "wte.weight": "../../../hf/model.safetensors"}})),
        ("index weight_map missing", write(index, "{}")),
        ("index is a list", write(index, "[]")),
        ("index link to /dev/zero", link(index, "/dev/zero")),
        ("index not UTF-8", write(index, b"\xff")),
        ("shard missing", remove("model-00002-of-00002.safetensors")),
        ("shard corrupt", write("model-00002-of-00002.safetensors", b"\x01" * 64)),
        ("config.json list", write("config.json", "[]")),
        ("config.json n_layer 'x'", set_keys("config.json", n_layer="x")),
        ("config.json n_layer 1e5", set_keys("config.json", n_layer=100_000)),
        ("config.json link to /dev/zero", link("config.json", "/dev/zero")),
    ]]
    latest = "checkpoints/latest/"
    out += [(f"resume: {name}", "run", m, "resume") for name, m in [
        ("state step 'x'", set_keys(latest + STATE, step="x")),
        ("state is a list", write(latest + STATE, "[]")),
        ("state link to /dev/zero", link(latest + STATE, "/dev/zero")),
        ("state rng truncated", edit_json(latest + STATE, lambda d: {**d, "rng": {**d["rng"], "torch": [1, 2, 3]}})),
        ("state python rng garbage", edit_json(latest + STATE, lambda d: {**d, "rng": {**d["rng"], "python": [3, [1], None]}})),
        ("state train_batches garbage", set_keys(latest + STATE, train_batches=[])),
        ("state best_val_loss 'x'", set_keys(latest + STATE, best_val_loss="x")),
        ("optimizer layout not JSON", write(latest + OPT_JSON, "{")),
        ("optimizer param group lr 'x'", edit_json(latest + OPT_JSON, lambda d: {
            **d, "param_groups": [{**g, "lr": "x"} for g in d["param_groups"]]})),
        ("optimizer one group missing", edit_json(latest + OPT_JSON, lambda d: {**d, "param_groups": d["param_groups"][:1]})),
        ("optimizer tensor missing", edit_tensors(latest + OPT_W, lambda s: dict(list(s.items())[1:]))),
        ("optimizer tensor wrong shape", edit_tensors(latest + OPT_W, lambda s: {
            k: (v[:1].clone() if v.dim() > 0 and i == 1 else v) for i, (k, v) in enumerate(s.items())})),
        ("optimizer weights link to /dev/zero", link(latest + OPT_W, "/dev/zero")),
    ]]
    out += [(f"data: {name}", "data", m, "data") for name, m in [
        ("manifest is a list", write("manifest.json", "[]")),
        ("manifest link to /dev/zero", link("manifest.json", "/dev/zero")),
        ("manifest shard file ../", edit_json("manifest.json", lambda d: _shard_file(d, "../corpus.txt"))),
        ("manifest shard file /etc/passwd", edit_json("manifest.json", lambda d: _shard_file(d, "/etc/passwd"))),
        ("manifest shard tokens 'x'", edit_json("manifest.json", lambda d: _shard_field(d, "tokens", "x"))),
        ("manifest dtype object", set_keys("manifest.json", dtype="object")),
        ("manifest version 'x'", set_keys("manifest.json", version="x")),
        ("manifest vocab_size 'x'", edit_json("manifest.json", lambda d: {**d, "tokenizer": {**d["tokenizer"], "vocab_size": "x"}})),
        ("shard out-of-range ids, same size", corrupt_shard_same_size),
        ("shard link to /dev/zero", link("train_000000.bin", "/dev/zero")),
        ("shard is a FIFO", make_fifo("train_000000.bin")),
    ]]
    return out


def _shard_file(manifest: dict, file: str) -> dict:
    return _shard_field(manifest, "file", file)


def _shard_field(manifest: dict, key: str, value) -> dict:
    shards = manifest["splits"]["train"]["shards"]
    shards[0] = {**shards[0], key: value}
    return manifest


def command(kind: str, path: Path, work: Path, scratch: Path) -> list[str]:
    out = str(scratch / "out")
    data = str(work / "data")
    fresh = ["--model.preset", "tiny", "--data.dir", data, "--train.run_dir", str(scratch / "newrun"),
             "--train.max_steps", "3", *TINY]
    return {
        "generate": ["generate", str(path), "--device", "cpu", "--sample.max_new_tokens", "2", "--prompt", "a"],
        "eval": ["eval", str(path), "--task", "loss", "--data", str(work / "corpus.txt"), "--device", "cpu",
                 "--limit", "300"],
        "export": ["export-hf", str(path), "--out", out],
        "init_from": ["train", *fresh, "--train.init_from", str(path)],
        "finetune": ["finetune", "text", "--from", str(path), "--data", str(work / "corpus.txt"),
                     "--finetune.epochs", "0", *fresh[4:]],
        # an unbindable host: fails after loading; the key keeps off the start-up warning for a public bind
        "serve": ["serve", str(path), "--device", "cpu", "--host", "203.0.113.1", "--api_key", "fuzz-key"],
        "merge": ["merge-lora", str(path), "--out", out],
        "classify": ["classify", str(path), "--text", "hello", "--device", "cpu"],
        "import": ["import-gpt2", str(path), "--out", out, "--tokenizer", "byte"],
        "resume": ["train", "--model.preset", "tiny", "--data.dir", data, "--train.run_dir", str(path),
                   "--train.max_steps", "3", *TINY],
        "data": ["train", "--model.preset", "tiny", "--data.dir", str(path), "--train.run_dir",
                 str(scratch / "newrun"), "--train.max_steps", "2", *TINY],
    }[kind]


# --- running ------------------------------------------------------------------------------------------------
class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def materialize(work: Path, index: int) -> tuple[Path, list[str]]:
    """Case `index` laid out in work/cases/NNN (a fresh copy of its good input, mutated): (that folder, the
    command line that reads it)."""
    _, base, mutate, kind = cases()[index]
    scratch = work / "cases" / f"{index:03d}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    target = scratch / base
    shutil.copytree(work / base, target, symlinks=True)
    mutate(target)
    return scratch, command(kind, target, work, scratch)


def run_case(work: Path, name: str, kind: str, index: int) -> dict:
    from gptforge.cli import main

    scratch, argv = materialize(work, index)
    err, code, timed_out, start = io.StringIO(), None, False, time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except CaseTimeout:
        timed_out = True
    except BaseException:  # what the CLI would have printed as a traceback
        import traceback

        err.write(traceback.format_exc())
        code = 1
    finally:
        signal.alarm(0)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"case": name, "command": kind, "code": code, "stderr": err.getvalue()[-2000:], "timed_out": timed_out,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str]) -> None:
    work = Path(argv[0]).resolve()
    isolate = "--isolate" in argv
    only = set(argv[argv.index("--only") + 1:]) if "--only" in argv else None
    build_inputs(work)
    for index, (name, _, _, kind) in enumerate(cases()):
        if only is not None and name not in only:
            continue
        result = _isolated(work, name) if isolate else run_case(work, name, kind, index)
        print(json.dumps(result), flush=True)


def _isolated(work: Path, name: str) -> dict:
    cmd = [sys.executable, __file__, str(work), "--only", name]
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S + 30, env=env)
    except subprocess.TimeoutExpired:
        return {"case": name, "code": None, "stderr": "", "timed_out": True}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:  # the case process itself died (memory limit, a signal)
        return {"case": name, "code": done.returncode, "stderr": done.stderr[-2000:], "timed_out": False}
    return json.loads(lines[-1])


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    main(sys.argv[1:])
