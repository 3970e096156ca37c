"""The server's request and reply steps on their own, without a server: plan_request (limits, context
window, vocabulary, n), the truncate_history extension's chat_prompt, and respond() over a scripted
worker (JSON, stream, engine failure, busy, timeout, a client gone)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gptforge.serve import ServeConfig
from gptforge.serve.app import DROPPED_HEADER, AppState, ServerInfo, Slots, respond
from gptforge.serve.replies import APIError, ChatReply, CompletionReply, TokenText
from gptforge.serve.requests import (ChatRequest, CompletionRequest, RequestLimits, chat_prompt, parse_request,
                                     plan_request)
from gptforge.serve.worker import Done, Failed, RowUpdate
from gptforge.tokenizer import ByteTokenizer

LIMITS = RequestLimits(context_length=32, vocab_size=300, max_tokens=20, max_batch_size=4)


def completion(**fields) -> CompletionRequest:
    return parse_request(CompletionRequest, {"prompt": "unused", **fields})


def plan(req, prompts, max_tokens=4, limits=LIMITS, **kw):
    return plan_request(req, prompts, limits, max_tokens, {0}, None, "prompt", **kw)


def refused(call, status=400) -> APIError:
    with pytest.raises(APIError) as e:
        call()
    assert e.value.status == status
    return e.value


# --- plan_request --------------------------------------------------------------------------------------------
def test_plan_rows_params_and_offsets():
    p = plan(completion(n=2, temperature=0, top_k=0, top_p=1, stop="\n"), [[1, 2, 3], [4]], max_tokens=5,
             chars=[10, 20])
    assert p.rows == [[1, 2, 3], [1, 2, 3], [4], [4]]  # n rows per prompt, prompt-major
    assert p.prompt_tokens == 4 and p.prompt_chars == [10, 10, 20, 20] and p.stops == ["\n"]
    assert p.params.max_new_tokens == 5 and p.params.top_k is None and p.params.top_p is None
    assert p.params.stop_token_ids == frozenset({0}) and p.logprobs is None
    assert plan(completion(), [[1]]).params.temperature == 1.0  # OpenAI's default, not the CLI's


def test_plan_limits_max_tokens_and_rows():
    assert plan(completion(), [[1]], max_tokens=20).params.max_new_tokens == 20
    e = refused(lambda: plan(completion(), [[1]], max_tokens=21))
    assert e.param == "max_tokens" and "(20)" in e.message
    chat = parse_request(ChatRequest, {"messages": [], "max_completion_tokens": 21})
    assert refused(lambda: plan(chat, [[1]], max_tokens=21)).param == "max_completion_tokens"
    assert len(plan(completion(n=2), [[1], [2]]).rows) == 4  # exactly max_batch_size
    e = refused(lambda: plan(completion(n=3), [[1], [2]]))
    assert e.param == "n" and "max_batch_size of 4" in e.message


def test_plan_context_window_and_vocabulary():
    assert plan(completion(), [[1] * 28], max_tokens=4).rows == [[1] * 28]  # 28 + 4 fills the window exactly
    e = refused(lambda: plan(completion(), [[1], [1] * 29], max_tokens=4))
    assert (e.param, e.code) == ("prompt", "context_length_exceeded") and "requested 33 tokens" in e.message
    for bad in (300, -1):
        e = refused(lambda: plan(completion(), [[1, bad]]))
        assert e.param == "prompt" and f"token id {bad}" in e.message


def test_chat_prompt_truncates_history_only_when_asked():
    tok = ByteTokenizer()
    tok.add_chat_tokens()
    limits = RequestLimits(context_length=40, vocab_size=tok.vocab_size, max_tokens=40, max_batch_size=4)
    messages = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 10},
                {"role": "user", "content": "c" * 10}]
    full = tok.encode_chat(messages, add_generation_prompt=True)[0]  # 12 + 12 + 13 tokens
    req = parse_request(ChatRequest, {"messages": messages, "max_tokens": 10})
    assert chat_prompt(tok, req, limits) == (full, None)
    req = parse_request(ChatRequest, {"messages": messages, "max_tokens": 10, "truncate_history": True})
    assert chat_prompt(tok, req, limits) == (tok.encode_chat(messages[2:], add_generation_prompt=True)[0], 2)
    req = parse_request(ChatRequest, {"messages": messages, "max_tokens": 3, "truncate_history": True})
    assert chat_prompt(tok, req, limits) == (full, 0)
    # no max_tokens: half the window is kept for the reply
    req = parse_request(ChatRequest, {"messages": messages[:1], "truncate_history": True})
    assert chat_prompt(tok, req, limits)[1] == 0
    bad = parse_request(ChatRequest, {"messages": [{"role": "wizard", "content": "x"}], "truncate_history": True})
    assert refused(lambda: chat_prompt(tok, bad, limits)).param == "messages"


# --- respond ------------------------------------------------------------------------------------------------
class ScriptedWorker:
    """Answers each job with the given events (none: the job never ends); records cancellations."""

    def __init__(self, events=(Done(),)):
        self.tokenizer = ByteTokenizer()
        self.events, self.jobs, self.cancelled = list(events), [], []

    def submit(self, job) -> None:
        self.jobs.append(job)
        for event in self.events:
            job.events.put_nowait(event)

    def cancel(self, job) -> None:
        self.cancelled.append(job)


class Client:
    """A request whose client stays (receive never returns) or has gone (http.disconnect)."""

    def __init__(self, gone: bool = False):
        self.gone = gone

    async def receive(self):
        if self.gone:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()


def app_state(worker, max_concurrent=2, request_timeout=60.0) -> AppState:
    info = ServerInfo("m", "ckpt", 1, 32, 300, "byte", "cpu", "float32", chat=True)
    config = ServeConfig(max_concurrent=max_concurrent, request_timeout=request_timeout)
    return AppState(worker, info, config, LIMITS, Slots(max_concurrent), TokenText(worker.tokenizer))


def run(state, body: dict, client=None, cls=CompletionReply, headers=None):
    async def go():
        req = completion(**body)
        p = plan(req, [[104, 105]])
        response = await respond(state, client or Client(), req, p, cls("id", "m", state.names, p), headers)
        if not req.stream:
            return response
        return response, [chunk async for chunk in response.body_iterator]

    return asyncio.run(go())


HI = [RowUpdate(0, "h", [104], finish_reason=None), RowUpdate(0, "i", [105], finish_reason="length")]


def test_respond_with_json_frees_its_slot():
    worker = ScriptedWorker([HI[:1], HI[1:], Done()])
    state = app_state(worker)
    response = run(state, {})
    body = json.loads(response.body)
    assert body["choices"][0]["text"] == "hi" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert state.slots.in_use == 0 and worker.cancelled == worker.jobs  # a no-op on a finished job


def test_respond_with_a_stream():
    state = app_state(ScriptedWorker([HI, Done()]))
    response, chunks = run(state, {"stream": True}, cls=ChatReply, headers={DROPPED_HEADER: "2"})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers[DROPPED_HEADER] == "2"
    assert chunks[-1] == "data: [DONE]\n\n"
    data = [json.loads(c[6:]) for c in chunks[:-1]]
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in data) == "hi"
    assert state.slots.in_use == 1  # the stream's slot is released when the response is closed


def test_respond_errors_keep_their_status_and_free_the_slot():
    state = app_state(ScriptedWorker([Failed(503, "out of memory", "out_of_memory")]))
    e = refused(lambda: run(state, {}), 503)
    assert e.code == "out_of_memory" and state.slots.in_use == 0
    # a client gone before any answer: 499, and its job is cancelled
    worker = ScriptedWorker([])
    state = app_state(worker)
    assert refused(lambda: run(state, {}, Client(gone=True)), 499).code == "client_closed_request"
    assert worker.cancelled == worker.jobs and state.slots.in_use == 0
    # a job that never ends meets the request timeout
    state = app_state(ScriptedWorker([]), request_timeout=0.05)
    assert refused(lambda: run(state, {}), 504).code == "timeout"


def test_respond_refuses_at_once_when_busy():
    worker = ScriptedWorker()
    state = app_state(worker, max_concurrent=1)
    state.slots.take()
    assert refused(lambda: run(state, {}), 429).code == "rate_limit_exceeded"
    assert worker.jobs == []
