"""Generation engine and text layer: fast paths against reference paths, on tiny seeded models."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.common import UserError, inference_runtime
from gptforge.config import ModelConfig, SampleConfig, resolve_model_config
from gptforge.engine import (WINDOW_KEEP_FRACTION, Engine, ModelRunner, SamplingParams, presence_mask, process_logits,
                             sample_next)
from gptforge.engine.batch import DecodeBatch
from gptforge.model import GPT, GPTClassifier
from gptforge.textgen import generate_text, stream_text
from gptforge.tokenizer import build_tokenizer

VOCAB = 257  # byte tokenizer: 256 bytes + <|endoftext|>
GREEDY = dict(temperature=0.0)


def tiny_model(seed: int, gain: float = 2.0, **overrides) -> GPT:
    """A tiny GPT whose matrices are re-drawn with std gain/sqrt(fan_in). At GPT-2's 0.02 init a random
    model mostly repeats its last token, which would hide cache bugs; gain 2 makes attention matter."""
    torch.manual_seed(seed)
    fields = {"vocab_size": VOCAB, **overrides}
    model = GPT(resolve_model_config(ModelConfig(preset="tiny", **fields)))
    if gain:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, gain / math.sqrt(p.shape[1]))
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine waiting for the second
    # thread made these tests ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPTS = [[1, 2, 3, 4, 5], [9, 9, 9, 9, 9, 9, 9, 4, 5], [7], [200, 100, 50, 25]]


# --- cached vs uncached, batch vs alone --------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_matches_uncached(seed, attention):
    model = tiny_model(seed)
    model.set_attention(attention)
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=40, **GREEDY)
    single = engine.generate(PROMPTS[:1], params)
    assert single == engine.generate(PROMPTS[:1], params, use_cache=False)
    batch = engine.generate(PROMPTS, params)  # left-padded to 9 tokens
    assert batch == engine.generate(PROMPTS, params, use_cache=False)
    assert all(len(row) == 40 for row in batch)
    assert len({t for row in batch for t in row}) > 10  # the model does not just repeat one token


@pytest.mark.parametrize("seed", [0, 3])
def test_batch_equals_each_prompt_alone(seed):
    engine = Engine(tiny_model(seed))
    params = SamplingParams(max_new_tokens=30, **GREEDY)
    assert engine.generate(PROMPTS, params) == [engine.generate([p], params)[0] for p in PROMPTS]


# --- logits processing ----------------------------------------------------------------------------------
def test_top_k_keeps_exactly_the_k_best():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    out = process_logits(logits, SamplingParams(temperature=0.7, top_k=10))
    for row, kept in zip(logits, out):
        top = set(row.topk(10).indices.tolist())
        allowed = set(torch.isfinite(kept).nonzero().flatten().tolist())
        assert allowed == top
    assert torch.allclose(out[torch.isfinite(out)], (logits / 0.7)[torch.isfinite(out)])


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p):
    logits = 3 * torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    out = process_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    for row, kept in zip(logits, out):
        probs = F.softmax(row.double(), dim=-1)
        order = probs.argsort(descending=True)
        cum = probs[order].cumsum(0)
        n = int((cum < top_p).sum()) + 1  # smallest prefix whose mass reaches p
        assert set(torch.isfinite(kept).nonzero().flatten().tolist()) == set(order[:n].tolist())


def test_top_p_always_keeps_one_token():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    out = process_logits(logits, SamplingParams(temperature=1.0, top_p=1e-6))
    assert torch.isfinite(out).sum() == 1 and torch.isfinite(out[0, 0])


def test_sampled_tokens_stay_in_allowed_set():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=1.5, top_k=20, top_p=0.6)
    allowed = torch.isfinite(process_logits(logits, params))
    drawn = set()
    for seed in range(300):
        tokens = sample_next(logits, params, generator=torch.Generator().manual_seed(seed))
        assert allowed[torch.arange(2), tokens].all()
        drawn.update(tokens.tolist())
    assert len(drawn) > 4  # really sampling, not always the argmax


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    seen_ids = [int(logits.argmax()), int(logits.argmin()), 5, 17, 100]
    seen = presence_mask([seen_ids], VOCAB)
    before = F.softmax(logits, -1)[0]
    after = F.softmax(process_logits(logits, SamplingParams(temperature=1.0, repetition_penalty=1.5), seen), -1)[0]
    assert (after[seen_ids] < before[seen_ids]).all()
    unseen = ~seen[0]
    assert (after[unseen] >= before[unseen]).all()
    # and in generation: a strong penalty makes greedy output repeat itself less
    engine = Engine(tiny_model(0))
    plain = engine.generate(PROMPTS, SamplingParams(max_new_tokens=40, **GREEDY))
    penalised = engine.generate(PROMPTS, SamplingParams(max_new_tokens=40, repetition_penalty=3.0, **GREEDY))
    assert sum(len(set(r)) for r in penalised) > sum(len(set(r)) for r in plain)


# --- seeds, stop tokens, logprobs ------------------------------------------------------------------------
def test_seeds_reproduce_and_differ():
    engine = Engine(tiny_model(0, gain=0))  # GPT-2 init: a flat-ish next-token distribution
    params = lambda seed: SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50, seed=seed)  # noqa: E731
    first = engine.generate(PROMPTS, params(123))
    assert first == engine.generate(PROMPTS, params(123))
    assert first != engine.generate(PROMPTS, params(124))
    assert first[0] != first[1] or first[0] != first[2]  # rows of one batch draw independently


def test_stop_token_ends_row_and_is_not_returned():
    engine = Engine(tiny_model(1))
    full = engine.generate(PROMPTS, SamplingParams(max_new_tokens=30, **GREEDY))
    stop = full[0][6]
    params = SamplingParams(max_new_tokens=30, stop_token_ids={stop}, **GREEDY)
    steps = list(engine.stream(PROMPTS, params))
    out = engine.generate(PROMPTS, params)
    for row, ref in zip(out, full):
        assert stop not in row
        assert row == (ref[:ref.index(stop)] if stop in ref else ref)
    assert steps[-1].finished[0] == "stop"
    assert {why for why in steps[-1].finished} <= {"stop", "length"}


def test_logprobs_are_the_models_raw_distribution():
    model = tiny_model(0)
    engine = Engine(model)
    prompt = [3, 1, 4, 1, 5]
    step = next(engine.stream([prompt], SamplingParams(max_new_tokens=1, **GREEDY), logprobs=3))
    expected = F.log_softmax(model(torch.tensor([prompt]))[0][0, -1], -1)
    assert step.top_logprobs[0][0][0] == step.tokens[0]
    assert step.logprobs[0] == pytest.approx(expected.max().item(), abs=1e-5)
    assert [t for t, _ in step.top_logprobs[0]] == expected.topk(3).indices.tolist()


def test_bfloat16_autocast_runs():
    engine = Engine(tiny_model(0), inference_runtime("cpu", "bfloat16"))
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, **GREEDY))
    assert [len(r) for r in out] == [8] * len(PROMPTS)


def test_forward_passes_run_under_the_runtimes_autocast(monkeypatch):
    """The engine takes device and dtype from the Runtime it is given and computes under its autocast (the
    one autocast in the package); a bare device means no autocast."""
    seen = []
    model = tiny_model(0)
    forward = type(model).forward

    def spy(self, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    params = SamplingParams(max_new_tokens=3, **GREEDY)
    engine = Engine(model, inference_runtime("cpu", "bfloat16"))
    assert engine.runtime.dtype == engine.cache_dtype == torch.bfloat16
    engine.generate(PROMPTS[:1], params)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    Engine(model, "cpu").generate(PROMPTS[:1], params)
    assert seen and set(seen) == {None}


def test_decode_batch_runs_on_a_model_runner_alone():
    """DecodeBatch needs only the model side (ModelRunner): the Engine drives it, never the other way."""
    model = tiny_model(0)
    params = SamplingParams(max_new_tokens=6, **GREEDY)
    batch = DecodeBatch(ModelRunner(model))
    gid = batch.add(PROMPTS, params)
    rows = [[] for _ in PROMPTS]
    for step in batch.outputs_of(gid):
        for row, tok in zip(rows, step.tokens):
            if tok is not None:
                row.append(tok)
    assert rows == Engine(model).generate(PROMPTS, params)


# --- context window -------------------------------------------------------------------------------------
def sliding_reference(model, prompt, n, block):
    """Greedy decoding that restarts from the last block*WINDOW_KEEP_FRACTION tokens when the window is
    full, written as plain full forwards: what the cached path must reproduce."""
    row, start, keep = list(prompt), 0, int(block * WINDOW_KEEP_FRACTION)
    with torch.no_grad():
        for _ in range(n):
            if len(row) - start > block:
                start = len(row) - keep
            row.append(int(model(torch.tensor([row[start:]]))[0][0, -1].argmax()))
    return row[len(prompt):]


def test_generation_slides_past_block_size():
    model = tiny_model(4)  # block_size 64
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=150, **GREEDY)
    cached = engine.generate([PROMPTS[1]], params)[0]
    uncached = engine.generate([PROMPTS[1]], params, use_cache=False)[0]
    assert len(cached) == len(uncached) == 150
    first_shift = 64 - len(PROMPTS[1]) + 1  # tokens produced before the window is full
    assert cached[:first_shift] == uncached[:first_shift]
    assert cached == sliding_reference(model, PROMPTS[1], 150, 64)
    assert [len(r) for r in engine.generate(PROMPTS, params)] == [150] * len(PROMPTS)


def test_prompt_longer_than_block_size():
    engine = Engine(tiny_model(0))
    long_prompt = list(range(100))
    params = SamplingParams(max_new_tokens=5, **GREEDY)
    with pytest.raises(UserError, match="prompt has 100 tokens but the model's context window is 64"):
        engine.generate([long_prompt], params)
    assert engine.generate([long_prompt], params, truncate="left") == engine.generate([long_prompt[-64:]], params)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=-1), dict(repetition_penalty=0),
                                 dict(temperature=float("nan"))])
def test_invalid_sampling_params(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)


def test_bad_prompts():
    engine = Engine(tiny_model(0))
    params = SamplingParams(max_new_tokens=2)
    for prompts, message in [([[]], "empty"), ([[1, VOCAB]], "outside"), ([[1]], None)]:
        if message is None:
            engine.generate(prompts, params, truncate="left")
            with pytest.raises(UserError, match="truncate"):
                engine.generate(prompts, params, truncate="right")
        else:
            with pytest.raises(UserError, match=message):
                engine.generate(prompts, params)


# --- text layer ---------------------------------------------------------------------------------------
class ScriptedModel(nn.Module):
    """Predicts script[p] at position p (counted from each row's first real token), then end-of-text:
    text tests choose exactly which bytes come out. Honours KVCache pos/pad_lens like GPT."""

    def __init__(self, script: bytes, eot: int = 256):
        super().__init__()
        self.config = resolve_model_config(ModelConfig(preset="tiny", vocab_size=VOCAB))
        self.script = torch.tensor(list(script) + [eot])
        self.unused = nn.Parameter(torch.zeros(1))  # so the engine can find a device

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        pos = torch.arange(start, start + T).expand(B, T)
        if kv_cache is not None:
            if kv_cache.pad_lens is not None:
                pos = pos - kv_cache.pad_lens[:, None]
            kv_cache.pos += T
        nxt = self.script[pos.clamp(0, len(self.script) - 1)]  # (B, T)
        return torch.zeros(B, T, VOCAB).scatter(-1, nxt[..., None], 10.0), None


def collect(stream, n_rows):
    texts, deltas = [""] * n_rows, [[] for _ in range(n_rows)]
    for row, delta in stream:
        texts[row] += delta
        deltas[row].append(delta)
    return texts, deltas


def test_stop_strings_cut_text_and_never_stream():
    tok = build_tokenizer("byte")
    model = ScriptedModel("Hello ENTER the ENDgame END".encode())
    sample = SampleConfig(max_new_tokens=100, temperature=0, stop=["END", "xyz"])
    assert generate_text(model, tok, [""], sample) == ["Hello ENTER the "]
    texts, deltas = collect(stream_text(model, tok, [""], sample), 1)
    assert texts == ["Hello ENTER the "]
    assert len(deltas[0]) > 5  # streamed piece by piece, not in one chunk at the end
    # without stop strings the script runs to its end-of-text, which is not shown
    assert generate_text(model, tok, [""], SampleConfig(max_new_tokens=100, temperature=0)) == [
        "Hello ENTER the ENDgame END"]


def test_streaming_concatenates_to_generate_text_on_a_real_model():
    tok = build_tokenizer("byte")
    model = tiny_model(2)
    base = SampleConfig(max_new_tokens=60, temperature=0)
    full = generate_text(model, tok, ["abc", ""], base)[0]
    stop = full[20:23]
    sample = SampleConfig(max_new_tokens=60, temperature=0, stop=[stop])
    cut = generate_text(model, tok, ["abc", ""], sample)
    assert cut[0] == full[:full.index(stop)]
    texts, deltas = collect(stream_text(model, tok, ["abc", ""], sample), 2)
    assert texts == cut
    assert all(stop not in t for t in texts)
    sampled = SampleConfig(max_new_tokens=40, temperature=1.0, seed=7, num_samples=3)
    texts, _ = collect(stream_text(model, tok, ["abc", "xy"], sampled), 6)
    assert texts == generate_text(model, tok, ["abc", "xy"], sampled)
    assert len(set(texts)) == 6


def test_utf8_split_across_byte_tokens_streams_intact():
    tok = build_tokenizer("byte")
    text = "héllo wörld ✓ 🙂 ok"
    model = ScriptedModel(text.encode())
    sample = SampleConfig(max_new_tokens=100, temperature=0)
    texts, deltas = collect(stream_text(model, tok, [""], sample), 1)
    assert texts == [text] == generate_text(model, tok, [""], sample)
    assert "🙂" in deltas[0] and "\ufffd" not in "".join(deltas[0])
    # a stop string made of a multi-byte character
    stopped = SampleConfig(max_new_tokens=100, temperature=0, stop=["✓"])
    assert collect(stream_text(model, tok, [""], stopped), 1)[0] == ["héllo wörld "]


def test_text_layer_checks():
    tok = build_tokenizer("byte")
    with pytest.raises(UserError, match="model vocab 300 != tokenizer vocab 257"):
        generate_text(tiny_model(0, vocab_size=300), tok, ["a"], SampleConfig())
    with pytest.raises(UserError, match="context window"):
        stream_text(tiny_model(0), tok, ["x" * 100], SampleConfig(max_new_tokens=3))
    out = generate_text(tiny_model(0), tok, ["x" * 100], SampleConfig(max_new_tokens=3, seed=0), truncate="left")
    assert len(out) == 1


# --- row cap (max_batch_rows), classifier checkpoints ------------------------------------------------------
MANY = [[(7 * i + j) % 250 + 1 for j in range(1 + (3 * i) % 11)] for i in range(10)]  # 1..11 tokens each


def rows_held(monkeypatch):
    """Spy on DecodeBatch: the rows running and the buffer rows allocated at every sampling step."""
    seen = {"running": 0, "buffer": 0, "steps": 0}
    sample = DecodeBatch._sample

    def spy(self, rows, logits):
        seen["running"] = max(seen["running"], len(self.running))
        seen["buffer"] = max(seen["buffer"], self.k.shape[1] if self.k is not None else 0)
        seen["steps"] += 1
        return sample(self, rows, logits)

    monkeypatch.setattr(DecodeBatch, "_sample", spy)
    return seen


@pytest.mark.parametrize("use_cache", [True, False])
def test_row_cap_admits_rows_as_others_end_and_changes_no_greedy_output(monkeypatch, use_cache):
    model = tiny_model(5)  # block_size 64: 11 + 30 tokens fit, so no row ever slides
    uncapped = Engine(model, max_batch_rows=None).generate(MANY, SamplingParams(max_new_tokens=30, **GREEDY))
    stop = uncapped[4][9]  # rows end at different steps: finished rows free their place for waiting ones
    params = SamplingParams(max_new_tokens=30, stop_token_ids={stop}, **GREEDY)
    reference = Engine(model, max_batch_rows=None).generate(MANY, params, use_cache=use_cache)
    assert len({len(r) for r in reference}) > 2
    held = rows_held(monkeypatch)
    capped = Engine(model, max_batch_rows=3)
    assert capped.generate(MANY, params, use_cache=use_cache) == reference  # in prompt order
    assert held["running"] == 3 and held["buffer"] <= 3
    assert held["steps"] > 30  # rows ran one after another, not all at once
    steps = list(capped.stream(MANY, params, use_cache=use_cache))
    assert all(len(s.tokens) == len(MANY) and sum(t is not None for t in s.tokens) <= 3 for s in steps)
    assert all(why is not None for why in steps[-1].finished)


def test_row_cap_with_seeded_samples(monkeypatch):
    engine = Engine(tiny_model(0, gain=0))  # GPT-2 init: a flat-ish next-token distribution
    rows = [p for p in MANY[:4] for _ in range(3)]  # 3 samples of each prompt, as textgen's num_samples
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)
    # Under the default cap (64) nothing changes: the same rows, the same one generator, the same draws.
    assert engine.generate(rows, params) == Engine(engine.model, max_batch_rows=None).generate(rows, params)
    # Over the cap the call still draws from one generator seeded once: reproducible, and the samples of
    # one prompt stay different (no per-chunk generator restarting from the same seed).
    held = rows_held(monkeypatch)
    capped = Engine(engine.model, max_batch_rows=3)
    first = capped.generate(rows, params)
    assert held["running"] == 3
    assert first == capped.generate(rows, params)
    assert all(len(r) == 20 for r in first)
    for i in range(4):
        assert len({tuple(r) for r in first[3 * i:3 * i + 3]}) == 3


def test_cancel_drops_started_and_waiting_rows():
    engine = Engine(tiny_model(0))
    batch = DecodeBatch(engine, max_rows=2)
    gid = batch.add(MANY[:5], SamplingParams(max_new_tokens=10, **GREEDY))
    out = batch.step()[gid]
    assert len(batch.running) == 2 and batch.n_rows == 5 and out.tokens[2:] == [None] * 3
    batch.cancel(gid)
    assert batch.n_rows == 0 and batch.k is None and not batch.is_running(gid)
    with pytest.raises(UserError, match="max_batch_rows"):
        Engine(engine.model, max_batch_rows=0)


def test_classifier_checkpoint_is_refused_by_the_engine():
    classifier = GPTClassifier(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50), 2)
    with pytest.raises(UserError, match="classifier.*gptforge classify"):
        Engine(classifier)

