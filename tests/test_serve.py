"""`gptforge serve`: the OpenAI-compatible API, driven by the official `openai` client and raw httpx against
real server subprocesses on loopback; plus the engine's continuous batching that the server relies on.

Three servers start once for the module, in parallel:
  main  - a tiny chat checkpoint, API key required, default limits
  slow  - no chat template, a long context (so a generation can run for seconds), max_concurrent 1,
          a 4 KiB body limit
  quick - like slow, with a 0.5 s request timeout
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from gptforge.checkpoint import load_model, save_checkpoint
from gptforge.config import ModelConfig, SampleConfig
from gptforge.engine import DecodeBatch, Engine, SamplingParams, process_logits
from gptforge.model import GPT
from gptforge.textgen import generate_text
from gptforge.tokenizer import build_tokenizer
from helpers import REPO

KEY = "sk-test-key"
GREEDY = dict(temperature=0)


# --- checkpoints and servers --------------------------------------------------------------------------------
def make_checkpoint(path: Path, chat: bool, seed: int = 0, never_ends: bool = False, **model) -> Path:
    """A tiny byte-level model whose weights are drawn with std 2/sqrt(fan_in): at GPT-2's 0.02 init it
    would mostly repeat one token, which would hide batching and logprob bugs. never_ends: the last
    hidden state is a constant pointing away from end-of-text's embedding, so the model never ends a
    text by itself (long generations really run long)."""
    tok = build_tokenizer("byte")
    if chat:
        tok.add_chat_tokens()
    torch.manual_seed(seed)
    fields = dict(n_layer=2, n_head=2, n_embd=32, block_size=64) | model
    gpt = GPT(ModelConfig(vocab_size=tok.vocab_size, **fields))
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 2.0 / math.sqrt(p.shape[1]))
        if never_ends:
            gpt.transformer.ln_f.weight.zero_()
            gpt.transformer.ln_f.bias.copy_(-10 * gpt.transformer.wte.weight[tok.eot_id])
    save_checkpoint(path, gpt, tok)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, log: Path, *options: str, **popen):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env.pop("GPTFORGE_API_KEY", None)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gptforge", "serve", str(checkpoint), "--port", str(self.port),
                 "--log_level", "warning", *options], env=env, stdout=out, stderr=subprocess.STDOUT, **popen)

    def wait_ready(self, timeout: float = 90) -> "Server":
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def client(self, key: str | None = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=60, **kw)

    def post(self, route: str, body, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, (bytes, str)):
            headers["Content-Type"] = "application/json"
            return httpx.post(f"{self.url}{route}", content=body, headers=headers, timeout=60, **kw)
        return httpx.post(f"{self.url}{route}", json=body, headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"chat": make_checkpoint(root / "chat", chat=True),
            "slow": make_checkpoint(root / "slow", chat=False, never_ends=True, n_layer=4, n_head=4, n_embd=128,
                                    block_size=4096)}


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "main": Server(checkpoints["chat"], logs / "main.log", "--api_key", KEY, "--max_batch_size", "16"),
        "slow": Server(checkpoints["slow"], logs / "slow.log", "--max_concurrent", "1", "--max_body_bytes", "4096"),
        "quick": Server(checkpoints["slow"], logs / "quick.log", "--request_timeout", "0.5"),
    }
    try:
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def main(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def local(checkpoints):
    """The main server's model, in this process: the reference its answers must equal."""
    torch.set_num_threads(1)
    model, tok, _ = load_model(checkpoints["chat"])
    return Engine(model), tok


def chat_reference(local, messages, max_tokens):
    engine, tok = local
    ids = tok.encode_chat(messages, add_generation_prompt=True)[0]
    params = SamplingParams(max_new_tokens=max_tokens, stop_token_ids=tok.chat_stop_ids, **GREEDY)
    return tok.decode(engine.generate([ids], params)[0])


def completion_reference(local, prompt, max_tokens, **sample):
    engine, tok = local
    return generate_text(engine, tok, [prompt], SampleConfig(max_new_tokens=max_tokens, temperature=0, **sample))[0]


# --- the OpenAI routes through the openai client ------------------------------------------------------------
def test_models_info_and_health(main, local):
    assert [m.id for m in main.client().models.list()] == ["chat"]
    info = httpx.get(f"{main.url}/v1/gptforge/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["context_length"] == 64 and info["vocab_size"] == local[1].vocab_size and info["chat"] is True
    assert info["tokenizer"] == local[1].describe() and info["dtype"] == "float32" and info["parameters"] > 0
    assert info["weights"] == "f32"  # --quantize auto on a CPU
    assert httpx.get(f"{main.url}/health").json()["status"] == "ok"  # no key needed
    page = httpx.get(f"{main.url}/")
    assert page.status_code == 200 and "html" in page.headers["content-type"]


def test_completion_matches_the_engine(main, local):
    client = main.client()
    out = client.completions.create(model="anything", prompt="Hello there", max_tokens=20, temperature=0)
    assert out.choices[0].text == completion_reference(local, "Hello there", 20)
    assert out.choices[0].finish_reason == "length" and out.object == "text_completion"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 20, 31)
    chunks = list(client.completions.create(model="m", prompt="Hello there", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    # token ids are a prompt too
    ids = list("Hello there".encode())
    assert client.completions.create(model="m", prompt=ids, max_tokens=20, temperature=0).choices[0].text \
        == out.choices[0].text


def test_chat_matches_the_engine(main, local):
    client = main.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! How are you?"}]
    out = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=25, temperature=0)
    expected = chat_reference(local, messages, 25)
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(local[1].encode_chat(messages, add_generation_prompt=True)[0])
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=25, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    # content as a list of text parts, and the developer role, as OpenAI accepts them
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hi! "}, {"type": "text", "text": "How are you?"}]}]
    assert client.chat.completions.create(model="m", messages=parts, max_tokens=25, temperature=0) \
        .choices[0].message.content == expected


def test_truncate_history_leaves_the_oldest_exchanges_out(main, local):
    tok = local[1]
    system = {"role": "system", "content": "Be brief."}
    turns = [m for i in range(4) for m in ({"role": "user", "content": f"question {i}?"},
                                           {"role": "assistant", "content": f"answer {i}."})]
    messages = [system, *turns, {"role": "user", "content": "and now?"}]
    body = {"messages": messages, "max_tokens": 8, "temperature": 0}
    assert_openai_error(main.post("/v1/chat/completions", body), 400, "messages", "context_length_exceeded")

    out = main.post("/v1/chat/completions", {**body, "truncate_history": True})
    assert out.status_code == 200, out.text
    dropped = int(out.headers["x-gptforge-dropped-messages"])
    assert out.json()["gptforge"] == {"dropped_messages": dropped}
    # the longest tail of whole exchanges that fits beside max_tokens, the system message kept
    kept = [system, *messages[1 + dropped:]]
    prompt = tok.encode_chat(kept, add_generation_prompt=True)[0]
    assert dropped > 0 and dropped % 2 == 0 and len(prompt) + 8 <= 64
    assert len(tok.encode_chat([system, *messages[dropped - 1:]], add_generation_prompt=True)[0]) + 8 > 64
    assert out.json()["usage"]["prompt_tokens"] == len(prompt)
    assert out.json()["choices"][0]["message"]["content"] == chat_reference(local, kept, 8)

    # through the openai client (extra_body), streaming: the header says it before the first chunk
    raw = main.client().chat.completions.with_raw_response.create(
        model="m", messages=messages, max_tokens=8, temperature=0, stream=True,
        extra_body={"truncate_history": True})
    assert raw.headers["x-gptforge-dropped-messages"] == str(dropped)
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse()) == chat_reference(local, kept, 8)
    # without max_tokens, half the window is kept for the reply
    half = main.post("/v1/chat/completions", {"messages": messages, "truncate_history": True, "temperature": 0})
    assert half.status_code == 200 and half.json()["usage"]["prompt_tokens"] <= 32

    # a conversation that fits loses nothing; without the field nothing is said
    short = {"messages": [system, turns[0]], "max_tokens": 8, "temperature": 0}
    fits = main.post("/v1/chat/completions", {**short, "truncate_history": True})
    assert fits.headers["x-gptforge-dropped-messages"] == "0" and fits.json()["gptforge"]["dropped_messages"] == 0
    plain = main.post("/v1/chat/completions", short)
    assert "x-gptforge-dropped-messages" not in plain.headers and "gptforge" not in plain.json()
    assert plain.json()["choices"][0]["message"]["content"] == fits.json()["choices"][0]["message"]["content"]
    # a newest message that cannot fit on its own is still too long
    alone = {"messages": [*turns, {"role": "user", "content": "x" * 60}], "max_tokens": 8, "truncate_history": True}
    assert_openai_error(main.post("/v1/chat/completions", alone), 400, "messages", "context_length_exceeded")


def test_logprobs_equal_the_engines(main, local):
    engine, tok = local
    prompt = "The king"
    steps = list(engine.stream([tok.encode(prompt)], SamplingParams(max_new_tokens=8, stop_token_ids={tok.eot_id},
                                                                    **GREEDY), logprobs=3))
    ref = [s.logprobs[0] for s in steps]
    ref_top = [s.top_logprobs[0] for s in steps]
    out = main.client().completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref, abs=1e-5)
    assert [len(t) for t in lp.top_logprobs] == [3] * 8
    assert all(max(top.values()) == pytest.approx(best[0][1], abs=1e-5) for top, best in zip(lp.top_logprobs, ref_top))
    assert lp.text_offset[0] == len(prompt) and lp.text_offset == sorted(lp.text_offset)
    # chat format: content entries with bytes and alternatives
    messages = [{"role": "user", "content": "hello"}]
    ids = tok.encode_chat(messages, add_generation_prompt=True)[0]
    steps = list(engine.stream([ids], SamplingParams(max_new_tokens=6, stop_token_ids=tok.chat_stop_ids, **GREEDY),
                               logprobs=2))
    chat = main.client().chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([s.logprobs[0] for s in steps if s.tokens[0] is not None],
                                                         abs=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(tok.decode_bytes([t]))
               for c, t in zip(content, [s.tokens[0] for s in steps]))
    # streamed logprobs carry the same values
    streamed = [c.choices[0].logprobs for c in main.client().completions.create(
        model="m", prompt=prompt, max_tokens=8, temperature=0, logprobs=3, stream=True) if c.choices[0].logprobs]
    assert [v for lp in streamed for v in lp.token_logprobs] == pytest.approx(ref, abs=1e-5)


def test_stop_strings(main, local):
    full = completion_reference(local, "Once upon", 40)
    stop = full[15:18]  # cut at its first occurrence, which may come earlier
    client = main.client()
    out = client.completions.create(model="m", prompt="Once upon", max_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert out.choices[0].text == full[:full.index(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="m", prompt="Once upon", max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.completions.create(model="m", prompt="x", max_tokens=3, stop=["a", "b", "c", "d", "e"])


def test_n_seed_and_prompt_lists(main):
    client = main.client()
    kw = dict(model="m", prompt="abc", max_tokens=12, temperature=1.0)
    first = client.completions.create(n=3, seed=7, **kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) == 3  # the samples of one request draw independently
    assert [c.text for c in client.completions.create(n=3, seed=7, **kw).choices] == texts
    assert [c.text for c in client.completions.create(n=3, seed=8, **kw).choices] != texts
    both = client.completions.create(model="m", prompt=["abc", "xyz"], n=2, max_tokens=5, temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text != both.choices[2].text == both.choices[3].text
    assert both.usage.prompt_tokens == 6 and both.usage.completion_tokens == 20


def test_penalties_change_greedy_output(main):
    client = main.client()
    kw = dict(model="m", prompt="aaaa", max_tokens=40, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    penalised = client.completions.create(frequency_penalty=2.0, presence_penalty=1.0, **kw).choices[0].text
    assert penalised != plain
    assert len(set(penalised)) >= len(set(plain))


def test_concurrent_streams_equal_single_requests(main):
    client = main.client()
    prompts = [f"prompt {i}: " + "ab" * i for i in range(10)]
    single = [client.completions.create(model="m", prompt=p, max_tokens=30, temperature=0).choices[0].text
              for p in prompts]

    def streamed(prompt):
        chunks = client.completions.create(model="m", prompt=prompt, max_tokens=30, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(streamed, prompts)) == single


# --- errors --------------------------------------------------------------------------------------------------
def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 and status != 429 else error["type"])
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def test_api_key(main):
    with pytest.raises(openai.AuthenticationError) as e:
        main.client(key="wrong").completions.create(model="m", prompt="x", max_tokens=2)
    assert e.value.status_code == 401
    assert_openai_error(main.post("/v1/completions", {"prompt": "x"}, key=None), 401, code="invalid_api_key")
    assert_openai_error(httpx.get(f"{main.url}/v1/models"), 401)


COMPLETION = {"prompt": "hi", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", b'{"prompt": "hi", ', None),  # malformed JSON
    ("/v1/completions", b'{"prompt": "\xff\xfe hi"}', None),  # not UTF-8
    ("/v1/completions", b"", None),
    ("/v1/completions", b'["prompt"]', None),  # not an object
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', None),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "n": True}, "n"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream"),
    ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "temperature": 5}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 100}, "n"),  # more rows than max_batch_size
    ("/v1/completions", {**COMPLETION, "logprobs": 50}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "seed": 2**70}, "seed"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {**COMPLETION, "stop": [1, 2]}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": ""}, "stop"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a", 1]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 99999]}, "prompt"),  # outside the vocabulary
    ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 4}', "prompt"),  # lone surrogate
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 70}, "prompt"),  # over the context window
    ("/v1/completions", {**COMPLETION, "echo": True}, "echo"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "truncate_history": "yes"}, "truncate_history"),
])
def test_bad_requests_are_400(main, route, body, param):
    assert_openai_error(main.post(route, body), 400, param)


def test_context_window_and_unknown_routes(main):
    with pytest.raises(openai.BadRequestError) as e:
        main.client().completions.create(model="m", prompt="x" * 60, max_tokens=10)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert "maximum context length is 64" in e.value.message
    keyed = {"Authorization": f"Bearer {KEY}"}
    assert_openai_error(httpx.get(f"{main.url}/v1/nothing", headers=keyed), 404)
    assert_openai_error(httpx.get(f"{main.url}/v1/completions", headers=keyed), 405)
    # unknown fields are ignored, as OpenAI does
    assert main.post("/v1/completions", {**COMPLETION, "frobnicate": 3, "user": "u"}).status_code == 200


def test_chat_needs_a_chat_template(servers):
    with pytest.raises(openai.BadRequestError, match="no chat template") as e:
        servers["slow"].client().chat.completions.create(model="m", messages=CHAT["messages"], max_tokens=2)
    assert e.value.code == "no_chat_template"


def test_body_limit_413(servers):
    slow = servers["slow"]
    assert_openai_error(slow.post("/v1/completions", {"prompt": "x" * 5000, "max_tokens": 2}), 413)
    assert slow.post("/v1/completions", {"prompt": "x" * 100, "max_tokens": 2}).status_code == 200


def test_busy_429_and_disconnect_frees_the_slot(servers):
    slow = servers["slow"]  # max_concurrent 1; 4000 tokens take seconds on this model
    body = {"prompt": "go", "max_tokens": 4000, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{slow.url}/v1/completions", json=body) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # kept: a dropped iterator closes the connection when collected
            assert next(lines).startswith("data: ")  # generation is under way
            with pytest.raises(openai.RateLimitError) as e:
                slow.client().completions.create(model="m", prompt="x", max_tokens=2)
            assert e.value.status_code == 429
        closed = time.time()  # leaving the block closed the connection mid-stream
    while httpx.get(f"{slow.url}/health").json()["requests"] and time.time() - closed < 2:
        time.sleep(0.02)
    health = httpx.get(f"{slow.url}/health").json()
    assert health["requests"] == 0 and health["running"] == 0, health
    out = slow.client().completions.create(model="m", prompt="x", max_tokens=2)
    assert out.choices[0].finish_reason == "length"


def test_timeout(servers):
    quick = servers["quick"]  # request_timeout 0.5 s
    assert_openai_error(quick.post("/v1/completions", {"prompt": "go", "max_tokens": 4000}), 504, code="timeout")
    streamed = httpx.post(f"{quick.url}/v1/completions", timeout=60,
                          json={"prompt": "go", "max_tokens": 4000, "stream": True})
    if streamed.status_code == 200:  # streaming had begun: the stream ends with an error event
        last = [line for line in streamed.text.splitlines() if line.startswith("data: ")][-1]
        assert json.loads(last[6:])["error"]["code"] == "timeout"
    else:  # the machine was too busy to produce a first token in 0.5 s
        assert_openai_error(streamed, 504, code="timeout")
    health = httpx.get(f"{quick.url}/health").json()
    assert health["requests"] == 0
    assert quick.post("/v1/completions", {"prompt": "go", "max_tokens": 2}).status_code == 200


# --- the engine's continuous batching, which the server is built on ------------------------------------
@pytest.fixture(scope="module")
def engine(checkpoints):
    torch.set_num_threads(1)
    return Engine(load_model(checkpoints["chat"])[0])


def test_requests_joining_a_running_batch_generate_what_they_would_alone(engine):
    rng = random.Random(0)
    vocab = engine.config.vocab_size
    for _ in range(8):
        # (prompt, max_new_tokens, step at which it joins); prompt + tokens fit the 64-token window
        requests = []
        for _ in range(rng.randint(2, 6)):
            n_prompt = rng.randint(1, 40)
            requests.append(([rng.randrange(vocab) for _ in range(n_prompt)], rng.randint(1, 64 - n_prompt),
                             rng.randint(0, 15)))
        alone = [engine.generate([p], SamplingParams(max_new_tokens=n, **GREEDY))[0] for p, n, _ in requests]
        batch, got, step = DecodeBatch(engine), {}, 0
        while len(got) < len(requests) or batch.groups:
            for i, (p, n, join) in enumerate(requests):
                if join == step:
                    got[batch.add([p], SamplingParams(max_new_tokens=n, **GREEDY))] = (i, [])
            for gid, out in batch.step().items():
                if out.tokens[0] is not None:
                    got[gid][1].append(out.tokens[0])
            step += 1
        assert [tokens for _, tokens in sorted(got.values())] == alone


def test_cancel_frees_rows_and_a_seeded_request_ignores_its_neighbours(engine):
    sampled = SamplingParams(max_new_tokens=20, temperature=1.0, seed=3)
    alone = engine.generate([[1, 2, 3]], sampled)[0]
    batch = DecodeBatch(engine)
    other = batch.add([[5, 6], [7, 8, 9, 10]], SamplingParams(max_new_tokens=40, temperature=1.0))
    batch.step()
    mine = batch.add([[1, 2, 3]], sampled)
    batch.step()
    batch.cancel(other)
    assert len(batch.running) == 1
    rest = [o.tokens[0] for o in batch.outputs_of(mine)]
    assert rest[-1] is not None and len(rest) == 19
    assert batch.k is None and batch.running == []  # idle: the buffers are given back
    batch2 = DecodeBatch(engine)
    batch2.add([[9] * 30], SamplingParams(max_new_tokens=30, temperature=1.0))
    g = batch2.add([[1, 2, 3]], sampled)
    assert [o.tokens[0] for o in batch2.outputs_of(g)] == alone


def test_presence_and_frequency_penalties():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([[0, 1, 3, 0, 0, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.float)
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    expected = logits - 0.5 * (counts > 0) - 0.25 * counts  # OpenAI's definition
    assert torch.allclose(process_logits(logits, params, counts=counts), expected)
    assert torch.equal(process_logits(logits, SamplingParams(temperature=0), counts=counts), logits)
    probs = F.softmax(process_logits(logits, SamplingParams(temperature=1.0, presence_penalty=-2.0), counts=counts), -1)
    assert probs[0, 2] > F.softmax(logits, -1)[0, 2]  # a negative penalty favours repeats


def test_engine_failures_reach_the_request_and_the_worker_goes_on(engine, monkeypatch):
    from gptforge.serve.worker import Done, Failed, GenerationWorker, Job

    worker = GenerationWorker(engine, build_tokenizer("byte"), max_batch_size=4)
    errors = [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), ValueError("boom")]
    real_step = DecodeBatch.step

    def failing_step(self):
        if errors:
            raise errors.pop(0)
        return real_step(self)

    monkeypatch.setattr(DecodeBatch, "step", failing_step)

    async def one_job():
        job = Job([[1, 2, 3]], SamplingParams(max_new_tokens=3, **GREEDY), [])
        worker.submit(job)
        events = []
        while not isinstance(events[-1:] and events[-1], (Done, Failed)):
            events.append(await asyncio.wait_for(job.events.get(), 30))
        return events

    async def three_jobs():
        worker.start()
        try:
            return [await one_job() for _ in range(3)]
        finally:
            worker.stop()

    out_of_memory, other, fine = asyncio.run(three_jobs())
    assert (out_of_memory[-1].status, out_of_memory[-1].code) == (503, "out_of_memory")
    assert other[-1].status == 500 and "boom" in other[-1].message
    assert isinstance(fine[-1], Done) and sum(len(u.tokens) for updates in fine[:-1] for u in updates) == 3
