"""`gptforge export-gguf`, proven with llama.cpp itself (llama-cpp-python builds it from source).

Against a model trained here (tiny, BPE learned here) and a GPT-2 124M-shaped one (random weights, GPT-2's
tokenizer): the same token ids for every tokenizer kind, F32 logits, 64-token greedy continuations at F32
and F16, Q8_0 perplexity, a chat model answering through llama.cpp's chat completion, LoRA folding, and
the one-line refusals.

llama.cpp runs with an F32 key/value cache here (its default is F16, which rounds the cache), on one thread:
its threads wait for each other by spinning, which collapses on a busy 2-core machine (1 tok/s with 2).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptforge.apps.chat import ChatSession
from gptforge.checkpoint import load_model, save_checkpoint
from gptforge.cli import main
from gptforge.config import FinetuneConfig, LoRAConfig, ModelConfig, SampleConfig, TrainConfig
from gptforge.engine import Engine, SamplingParams
from gptforge.export.gguf import export_gguf
from gptforge.model import GPT, GPTClassifier
from gptforge.prompts import END_OF_TURN
from gptforge.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, GPT2Tokenizer, load_tokenizer
from gptforge.train.finetune import run_finetune
from helpers import cli_error

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

FIXTURES = Path(__file__).parent / "fixtures"
TEXTS = ["Hello, world! It's 3:14 o'clock.", "  leading spaces\tand\ttabs\n\nnew paragraphs\r\n",
         "unicode: naïve café, 東京, Ελληνικά, emoji 😀👍🏽", "trailing whitespace   \n", "x" * 40 + " 12345 67",
         "don't WON'T we'll I'd\n  \n", "typed <|endoftext|> and <|user|> stay text"]
PROMPTS = ["The quick brown fox", "Once upon a time", "In 1492 , Columbus", "The capital of France is",
           "import numpy as np\n", "Dear Sir or Madam ,", "The species is", "To be or not to be",
           "It was a dark and stormy night", "The results show that", "Q : What is 2 + 2 ?\nA :", "Breaking news :",
           "Ingredients : flour , sugar ,", "The theory of relativity", "She opened the door and",
           "def fibonacci ( n ) :", " = Chapter 1 = \n", "The stock market fell", "My favourite colour is",
           "The lobster is a"]
NEW_TOKENS = 64


# --- running llama.cpp -----------------------------------------------------------------------------------
@pytest.fixture
def llama():
    """Open GGUF files with llama.cpp (F32 key/value cache, every position's logits kept); closed after."""
    opened = []

    def open_gguf(path: Path, n_ctx: int = 0, **kw):  # 0: the context length in the file
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                              type_v=llama_cpp.GGML_TYPE_F32, n_threads=1, verbose=False, **kw)
        opened.append(llm)
        return llm

    yield open_gguf
    for llm in opened:
        llm.close()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])  # (T, vocab_size)


def llama_greedy(llm, prompt: list[int], stop_id: int, n: int = NEW_TOKENS) -> list[int]:
    """n greedy tokens from llama.cpp's own sampler, ending early at stop_id (not included), as gptforge's
    engine ends at <|endoftext|>."""
    out = []
    for token in llm.generate(prompt, temp=0.0, reset=True):
        if token == stop_id or len(out) == n:
            break
        out.append(token)
    return out


def gptforge_greedy(model: GPT, prompts: list[list[int]]) -> list[list[int]]:
    return Engine(model).generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0))


def agreement(llm, prompts: list[list[int]], reference: list[list[int]], stop_id: int) -> int:
    return sum(llama_greedy(llm, p, stop_id) == r for p, r in zip(prompts, reference))


def max_logit_diff(model: GPT, llm, ids: list[int]) -> float:
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    return float(np.abs(llama_logits(llm, ids) - ours).max())


class GGMLGelu(torch.nn.Module):
    """The tanh GELU as ggml's CPU backend computes it even in an F32 graph (GGML_GELU_FP16 in
    ggml-cpu/vec.h): the input rounded to float16 and looked up in a float16 table; beyond +-10 clamped."""

    def forward(self, x):
        table = F.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def max_logit_diffs(model: GPT, llm, ids: list[int]) -> tuple[float, float]:
    """Max |logit difference| against gptforge as it is, and against gptforge computing GELU as ggml does:
    the second isolates the export (everything but ggml's float16 GELU rounding) from the runtime."""
    exact = [block.mlp.gelu for block in model.transformer.h]
    try:
        for block in model.transformer.h:
            block.mlp.gelu = GGMLGelu()
        as_ggml = max_logit_diff(model, llm, ids)
    finally:
        for block, gelu in zip(model.transformer.h, exact):
            block.mlp.gelu = gelu
    return max_logit_diff(model, llm, ids), as_ggml


def perplexity(llm, ids: list[int], window: int) -> float:
    """exp(mean next-token loss) over non-overlapping windows, from the logits llama.cpp returns."""
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        logits = llama_logits(llm, chunk[:-1]).astype(np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        nll -= log_probs[np.arange(len(chunk) - 1), chunk[1:]].sum()
        n += len(chunk) - 1
    return math.exp(nll / n)


# --- models -------------------------------------------------------------------------------------------
def random_checkpoint(path: Path, tok, **overrides) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=64, tie_embeddings=False),
                         **overrides, "vocab_size": tok.vocab_size})
    save_checkpoint(path, GPT(cfg), tok)
    return path


@pytest.fixture(scope="module")
def trained(tiny_bpe_run, tmp_path_factory):
    """The trained tiny model exported at all three types."""
    root = tmp_path_factory.mktemp("gguf_trained")
    files = {t: export_gguf(tiny_bpe_run, root / f"{t}.gguf", weight_type=t) for t in ("f32", "f16", "q8_0")}
    model, tok, _ = load_model(tiny_bpe_run)
    return model, tok, files


@pytest.fixture(scope="module")
def chat_model(tiny_bpe_run, tmp_path_factory):
    """The trained model fine-tuned (chat mode) on short question/answer conversations, so its greedy
    replies end with <|end|>."""
    root = tmp_path_factory.mktemp("gguf_chat")
    facts = [("What colour is the sky?", "The sky is blue."), ("Where do lobsters live?", "In the sea."),
             ("What is two plus two?", "Four."), ("Who wrote Hamlet?", "Shakespeare wrote it."),
             ("Is ice cold?", "Yes, ice is cold."), ("Name a colour.", "Red.")]
    with open(root / "chat.jsonl", "w") as f:
        for i in range(60):
            q, a = facts[i % len(facts)]
            messages = ([{"role": "system", "content": "Answer briefly."}] if i % 2 else []) + \
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": messages}) + "\n")
    run_finetune("chat", str(tiny_bpe_run), FinetuneConfig(data=str(root / "chat.jsonl"), epochs=0),
                 TrainConfig(run_dir=str(root / "run"), device="cpu", progress=False, plot=False, max_steps=120,
                             micro_batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, eval_batches=1),
                 SampleConfig())
    return root / "run", facts


# --- tokenizers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "bpe", "byte", "char"])
def test_llama_cpp_tokenizes_to_our_ids(kind, tiny_bpe_run, tmp_path, llama):
    tok = {"gpt2": GPT2Tokenizer, "byte": ByteTokenizer, "char": lambda: CharTokenizer.train(TEXTS),
           "bpe": lambda: load_tokenizer(tiny_bpe_run / "checkpoints" / "latest" / "tokenizer")}[kind]()
    tok.add_chat_tokens()
    path = export_gguf(random_checkpoint(tmp_path / "ck", tok), tmp_path / "m.gguf")
    llm = llama(path, n_ctx=64, vocab_only=True)
    for text in TEXTS:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, (kind, text)
        assert llm.detokenize(ids) == text.encode()
    assert llm.token_eos() == tok.eot_id and llm.metadata["tokenizer.ggml.pre"] == "gpt-2"


# --- the trained model ----------------------------------------------------------------------------------
def test_trained_model_logits_and_greedy_continuations(trained, llama):
    model, tok, files = trained
    text = (FIXTURES / "wikitext2_valid_head.txt").read_text(encoding="utf-8")
    ids = tok.encode(text)[:32]
    f32, f16 = llama(files["f32"]), llama(files["f16"])
    diff, diff_ggml_gelu = max_logit_diffs(model, f32, ids)
    prompts = [tok.encode(p) for p in PROMPTS]
    reference = gptforge_greedy(model, prompts)
    same_f32, same_f16 = agreement(f32, prompts, reference, tok.eot_id), agreement(f16, prompts, reference, tok.eot_id)
    print(f"\nllama.cpp, trained tiny model: F32 max |logit diff| {diff:.2e} ({diff_ggml_gelu:.2e} against ggml's "
          f"GELU); greedy {NEW_TOKENS} tokens identical for {same_f32}/20 prompts at F32, {same_f16}/20 at F16")
    # ggml rounds GELU through a float16 table (see GGMLGelu): 9.7e-4 here; the export itself is exact
    assert diff <= 2e-3 and diff_ggml_gelu <= 1e-4
    assert same_f32 == 20 and same_f16 >= 19


def test_q8_0_perplexity_within_one_percent_of_f32(trained, llama):
    model, tok, files = trained
    ids = tok.encode((FIXTURES / "wikitext2_valid_head.txt").read_text(encoding="utf-8"))[:4096]
    window = model.config.block_size
    ppl = {t: perplexity(llama(files[t]), ids, window) for t in ("f32", "q8_0")}
    sizes = {t: files[t].stat().st_size for t in files}
    print(f"\nllama.cpp perplexity on {len(ids)} tokens: F32 {ppl['f32']:.3f}, Q8_0 {ppl['q8_0']:.3f}; "
          f"file sizes {sizes}")
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) <= 0.01
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_lora_checkpoint_is_folded_into_the_weights(tiny_bpe_run, tmp_path, llama):
    run_finetune("text", str(tiny_bpe_run), FinetuneConfig(data=str(FIXTURES / "wikitext2_valid_head.txt"),
                                                             epochs=0, lora=LoRAConfig(rank=4)),
                 TrainConfig(run_dir=str(tmp_path / "lora"), device="cpu", progress=False, plot=False, max_steps=20,
                             micro_batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0, eval_batches=1),
                 SampleConfig())
    lora_model, tok, meta = load_model(tmp_path / "lora")
    assert meta.get("lora")
    base, _, _ = load_model(tiny_bpe_run)
    path = export_gguf(tmp_path / "lora", tmp_path / "lora.gguf")
    ids = tok.encode("The lobster is a species of the sea")
    llm = llama(path)
    with torch.no_grad():
        moved = float((lora_model(torch.tensor([ids]))[0] - base(torch.tensor([ids]))[0]).abs().max())
    diff = max_logit_diff(lora_model, llm, ids)
    assert diff <= 1e-3 and moved > 0.05, (diff, moved)  # the adapters' change is in the file


# --- chat ---------------------------------------------------------------------------------------------
def test_chat_model_answers_through_llama_cpp_chat_completion(chat_model, tmp_path, llama):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    run, facts = chat_model
    model, tok, _ = load_model(run)
    path = export_gguf(run, tmp_path / "chat.gguf")
    llm = llama(path)
    sample = SampleConfig(max_new_tokens=24, temperature=0.0)
    ended_by_end_of_turn = 0
    for i, (question, _) in enumerate(facts):
        system = "Answer briefly." if i % 2 else None
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        # the template, rendered and tokenized as llama-cpp-python does it, gives encode_chat's ids
        template = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
        rendered = llm.tokenize(template(messages=messages).prompt.encode(), add_bos=False, special=True)
        expected = tok.encode_chat(messages, add_generation_prompt=True)[0]
        assert rendered == expected

        ours = "".join(ChatSession(model, tok, sample, "cpu", system=system).reply(question))
        answer = llm.create_chat_completion(messages, temperature=0.0, max_tokens=24)
        assert answer["usage"]["prompt_tokens"] == len(expected)
        assert answer["choices"][0]["message"]["content"] == ours, (question, ours)
        # did the reply end at <|end|> (rather than at max_tokens)? then llama.cpp stopped there too
        raw = Engine(model).generate([expected], SamplingParams(max_new_tokens=24, temperature=0.0,
                                                                stop_token_ids=set()))[0]
        if END_OF_TURN in (tok.decode([t]) for t in raw):
            ended_by_end_of_turn += 1
            assert answer["choices"][0]["finish_reason"] == "stop"
    assert ended_by_end_of_turn >= len(facts) // 2


# --- GPT-2 124M shape -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_124m(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_124m")
    tok = GPT2Tokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size)).eval()
    save_checkpoint(root / "ck", model, tok)
    files = {t: export_gguf(root / "ck", root / f"{t}.gguf", weight_type=t) for t in ("f32", "f16")}
    return model, tok, files


@pytest.mark.slow
def test_gpt2_124m_shape_logits_and_greedy_continuations(gpt2_124m, llama):
    """llama.cpp's float16 GELU table moves the F32 logits by ~1.3e-3 here (with the MLP's GELU out of the
    picture the same export agrees within 2e-6, measured): the bar is 2e-3 against gptforge as it is, and
    1e-3 against gptforge computing GELU as ggml does (12 layers of float16 rounding that a slightly
    different input can tip either way)."""
    model, tok, files = gpt2_124m
    f32, f16 = llama(files["f32"]), llama(files["f16"])
    ids = tok.encode((FIXTURES / "wikitext2_valid_head.txt").read_text(encoding="utf-8"))[:32]
    diff, diff_ggml_gelu = max_logit_diffs(model, f32, ids)
    prompts = [tok.encode(p) for p in PROMPTS]
    reference = gptforge_greedy(model, prompts)
    same_f32, same_f16 = agreement(f32, prompts, reference, tok.eot_id), agreement(f16, prompts, reference, tok.eot_id)
    print(f"\nllama.cpp, GPT-2 124M shape: F32 max |logit diff| {diff:.2e} ({diff_ggml_gelu:.2e} against ggml's "
          f"GELU); greedy {NEW_TOKENS} tokens identical for {same_f32}/20 prompts at F32, {same_f16}/20 at F16")
    assert diff <= 2e-3 and diff_ggml_gelu <= 1e-3
    assert same_f32 == 20 and same_f16 >= 19


# --- refusals -----------------------------------------------------------------------------------------
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    tok = ByteTokenizer()
    ck = random_checkpoint(tmp_path / "ck", tok, n_embd=48)
    out = tmp_path / "m.gguf"
    assert "q8_0" in cli_error(capsys, "export-gguf", str(ck), "--out", str(out), "--type", "q8_0")
    assert "unknown --type" in cli_error(capsys, "export-gguf", str(ck), "--out", str(out), "--type", "q4")
    assert not out.exists()
    main(["export-gguf", str(ck), "--out", str(out), "--type", "f16"])
    model, _, _ = load_model(ck)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e5  # beyond float16's 65504
    save_checkpoint(tmp_path / "huge", model, tok)
    err = cli_error(capsys, "export-gguf", str(tmp_path / "huge"), "--out", str(tmp_path / "h.gguf"), "--type", "f16")
    assert "blk.0.ffn_up.weight" in err and "float16" in err and not (tmp_path / "h.gguf").exists()
    assert "--force" in cli_error(capsys, "export-gguf", str(ck), "--out", str(out))
    assert "is a folder" in cli_error(capsys, "export-gguf", str(ck), "--out", str(tmp_path), "--force")

    torch.manual_seed(0)  # a classifier checkpoint: a GPT plus classifier.*, its labels in meta.json
    clf = GPTClassifier(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tok.vocab_size), 2)
    save_checkpoint(tmp_path / "clf", clf, tok, extra_meta={"classifier": {"labels": ["a", "b"]}})
    assert "classifier" in cli_error(capsys, "export-gguf", str(tmp_path / "clf"), "--out", str(tmp_path / "c.gguf"))

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    err = cli_error(capsys, "export-gguf", str(ck), "--out", str(tmp_path / "x.gguf"))
    assert 'pip install "gguf>=0.19"' in err and not (tmp_path / "x.gguf").exists()


def test_unsupported_tokenizers_are_refused_with_the_reason(tiny_bpe_run, tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer, normalizers, pre_tokenizers

    trained = load_tokenizer(tiny_bpe_run / "checkpoints" / "latest" / "tokenizer")
    core = HFTokenizer.from_str(trained.tk.to_str())
    core.normalizer = normalizers.Lowercase()
    err = cli_error(capsys, "export-gguf", str(random_checkpoint(tmp_path / "norm", BPETokenizer(core))),
                    "--out", str(tmp_path / "n.gguf"))
    assert "normalizes text" in err and "--data.tokenizer" in err
    core = HFTokenizer.from_str(trained.tk.to_str())
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    err = cli_error(capsys, "export-gguf", str(random_checkpoint(tmp_path / "split", BPETokenizer(core))),
                    "--out", str(tmp_path / "s.gguf"))
    assert "pre-tokenizes with Whitespace" in err
    assert not list(tmp_path.glob("*.gguf"))


def test_a_failed_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    import gguf

    ck = random_checkpoint(tmp_path / "ck", ByteTokenizer())
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an earlier export")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    err = cli_error(capsys, "export-gguf", str(ck), "--out", str(out), "--force")
    assert "No space left on device" in err
    assert out.read_bytes() == b"an earlier export" and sorted(os.listdir(tmp_path)) == ["ck", "m.gguf"]
