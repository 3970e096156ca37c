"""`gptforge serve` under abuse (issue 10): unsamplable values, slow, vanishing and too many clients, hostile
JSON, browser-origin requests, and a fuzz run of malformed requests, against real servers on loopback.

Servers (started once for the module, in parallel):
  keyed  - the tiny chat checkpoint with an API key and 1 s header/body timeouts, so slow clients fail fast
  slow   - a long-context model that never ends a text (a generation runs for seconds), a 1 s write timeout,
           an open-file limit of 128 (ulimit -n) and at most 8 connections
The CLI cases run `gptforge.cli.main` in this process (no interpreter start-up per case).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import torch

from gptforge.checkpoint import load_model
from gptforge.config import SampleConfig
from gptforge.engine import GREEDY_BELOW, Engine, InvalidParam, SamplingParams, process_logits, sample_next
from gptforge.serve.http import RateLimit, quiet_accept_errors
from gptforge.serve.worker import Done, Failed, GenerationWorker, Job
from gptforge.textgen import generate_text
from gptforge.cli import main as cli_main
from test_serve import KEY, Server, make_checkpoint

CAP = 8  # the slow server's --max_connections
HANG_GUARD = 30.0  # seconds a raw request may take before it counts as a hang (the timeouts here are 1 s)
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    return {"chat": make_checkpoint(root / "chat", chat=True),
            "slow": make_checkpoint(root / "slow", chat=False, never_ends=True, n_layer=4, n_head=4, n_embd=128,
                                    block_size=4096)}


def _low_file_limit():
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "keyed": Server(checkpoints["chat"], logs / "keyed.log", "--api_key", KEY, "--max_batch_size", "16",
                        "--header_timeout", "1", "--body_timeout", "1"),
        "slow": Server(checkpoints["slow"], logs / "slow.log", "--write_timeout", "1", "--header_timeout", "60",
                       "--max_connections", str(CAP), preexec_fn=_low_file_limit),
    }
    try:
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def keyed(servers):
    return servers["keyed"]


@pytest.fixture(scope="module")
def local(checkpoints):
    torch.set_num_threads(1)
    model, tok, _ = load_model(checkpoints["chat"])
    return Engine(model), tok


def greedy_text(local, prompt: str, max_tokens: int) -> str:
    engine, tok = local
    return generate_text(engine, tok, [prompt], SampleConfig(max_new_tokens=max_tokens, temperature=0))[0]


def server_log(server: Server) -> str:
    return server.log.read_text(errors="replace")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`gptforge ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        cli_main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# --- raw HTTP ----------------------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int | None  # None: closed without an answer
    head: bytes
    body: bytes
    hung: bool  # nothing more came for HANG_GUARD seconds, and the connection stayed open


def raw(port: int, data: bytes, guard: float = HANG_GUARD) -> Reply:
    """Send bytes on a fresh connection and read the answer: to the end of one response, or until the
    server closes the connection."""
    got, hung = b"", False
    with socket.create_connection(("127.0.0.1", port), timeout=guard) as s:
        try:
            s.sendall(data)
        except OSError:  # the server closed early (a refused body): read what it said
            pass
        try:
            while not _complete(got):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except socket.timeout:
            hung = True
        except OSError:
            pass
    head, _, body = got.partition(b"\r\n\r\n")
    status = int(head[9:12]) if head.startswith(b"HTTP/1.") and head[9:12].isdigit() else None
    return Reply(status, head, body, hung)


def _complete(got: bytes) -> bool:
    head, sep, body = got.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
        if name == b"transfer-encoding" and b"chunked" in value:
            return body.endswith(b"0\r\n\r\n")
    return False


def request(port: int, method: str = "POST", path: str = "/v1/completions", body: bytes = b"",
            content_type: str | None = "application/json", key: str | None = KEY, host: str | bool | None = None,
            extra: tuple[str, ...] = (), length: int | None = None, version: str = "HTTP/1.1") -> bytes:
    """A request's bytes; length overrides Content-Length (a body that never arrives in full); host False
    sends no Host header."""
    lines = [f"{method} {path} {version}"]
    if host is not False:
        lines.append(f"Host: {f'127.0.0.1:{port}' if host is None else host}")
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if body or length is not None or method == "POST":
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines += [*extra, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- 1. values that cannot be sampled; one failing request fails alone ------------------------------------
def test_sampling_params_refuse_or_handle_unsamplable_values():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 10
    for tiny in (1e-300, 5e-324, GREEDY_BELOW / 2):
        params = SamplingParams(temperature=tiny)
        assert params.greedy
        assert torch.equal(sample_next(logits, params), logits.argmax(-1))
    # a p that is 0 in float32 keeps the most likely token: never an empty set
    kept = torch.isfinite(process_logits(logits, SamplingParams(temperature=1.0, top_p=1e-300)))
    assert kept.sum(-1).tolist() == [1, 1, 1] and torch.equal(kept.float().argmax(-1), logits.argmax(-1))
    assert torch.isfinite(process_logits(logits, SamplingParams(temperature=1.0, top_k=10**30))).all()
    for field, value in [("repetition_penalty", 1e-45), ("repetition_penalty", 1e45), ("presence_penalty", 1e300),
                         ("frequency_penalty", float("-inf")), ("temperature", float("inf")),
                         ("temperature", float("nan")), ("temperature", -1e-300), ("top_p", 0.0),
                         ("top_p", float("nan")), ("seed", 2**64), ("top_k", True), ("max_new_tokens", 1.5)]:
        with pytest.raises(InvalidParam, match=field) as e:
            SamplingParams(**{field: value})
        assert e.value.name == field
    # at the edges of the ranges every row still has a distribution to sample from
    seen = torch.ones_like(logits, dtype=torch.bool)
    counts = torch.full_like(logits, 4096.0)
    for params in (SamplingParams(temperature=1.0, repetition_penalty=0.01, presence_penalty=100.0),
                   SamplingParams(temperature=GREEDY_BELOW, repetition_penalty=100.0, frequency_penalty=-100.0)):
        probs = torch.softmax(process_logits(logits * 1000, params, seen, counts), -1)
        assert torch.isfinite(probs).all() and (probs.sum(-1) > 0.99).all()


def test_a_job_that_fails_in_the_engine_fails_alone(local, monkeypatch):
    from gptforge.engine import batch

    engine, tok = local
    poison = 666
    real_pick = batch._Group.pick

    def pick(group, logits, rows):
        if group.params.seed == poison:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real_pick(group, logits, rows)

    monkeypatch.setattr(batch._Group, "pick", pick)
    prompts = [[1 + i, 2, 3] for i in range(12)]
    expected = [engine.generate([p], SamplingParams(max_new_tokens=10, temperature=0))[0] for p in prompts]

    async def collect(job):
        events = []
        while not isinstance(events[-1:] and events[-1], (Done, Failed)):
            events.append(await asyncio.wait_for(job.events.get(), 60))
        return events

    async def run():
        worker = GenerationWorker(engine, tok, max_batch_size=16)
        jobs = [Job([p], SamplingParams(max_new_tokens=10, temperature=0), []) for p in prompts]
        jobs.insert(5, Job([[7, 8, 9], [9, 8]], SamplingParams(max_new_tokens=10, temperature=1.0, seed=poison), []))
        for job in jobs:  # all queued before the thread starts: they share the batch from the first step
            worker.submit(job)
        worker.start()
        try:
            return [await collect(job) for job in jobs]
        finally:
            worker.stop()

    results = asyncio.run(run())
    failed = results.pop(5)
    assert isinstance(failed[-1], Failed) and failed[-1].status == 500 and "nan" in failed[-1].message
    for events, want in zip(results, expected):
        assert isinstance(events[-1], Done)
        assert [t for updates in events[:-1] for u in updates for t in u.tokens] == want


POISONS = [  # (body fields, expected status, param named by the 400)
    ({"temperature": 1e-300}, 200, None), ({"temperature": 5e-324}, 200, None),
    ({"temperature": 1.0, "top_p": 1e-300}, 200, None), ({"temperature": 1.0, "top_k": 10**30}, 200, None),
    ({"repetition_penalty": 1e-45}, 400, "repetition_penalty"), ({"repetition_penalty": 5e-324}, 400, None),
    ({"presence_penalty": 1e300}, 400, "presence_penalty"), ({"frequency_penalty": -1e300}, 400, None),
    ({"temperature": 1e300}, 400, "temperature"), ({"top_p": 5e-324, "temperature": 2}, 200, None),
]


def test_unsamplable_values_among_concurrent_requests(keyed, local):
    normal = [{"prompt": f"row {i}: ", "max_tokens": 12, "temperature": 0} for i in range(12)]
    poisoned = [{"prompt": "poison", "max_tokens": 12, **fields} for fields, _, _ in POISONS]
    bodies = normal[:6] + poisoned + normal[6:]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: keyed.post("/v1/completions", body), bodies))
    for body, reply in zip(bodies, replies):
        if body in normal:
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == greedy_text(local, body["prompt"], 12)
    for (fields, status, param), reply in zip(POISONS, replies[6:6 + len(POISONS)]):
        assert reply.status_code == status, (fields, reply.text)
        if param:
            assert reply.json()["error"]["param"] == param
    # a temperature under GREEDY_BELOW is greedy
    assert replies[6].json()["choices"][0]["text"] == greedy_text(local, "poison", 12)
    assert "Traceback" not in server_log(keyed)


def test_generate_cli_takes_or_refuses_unsamplable_values(checkpoints, local, capsys):
    base = ["generate", str(checkpoints["chat"]), "--prompt", "ab", "--device", "cpu", "--sample.max_new_tokens", "8"]
    greedy = "ab" + greedy_text(local, "ab", 8) + "\n"
    for args in (["--sample.temperature", "1e-300"], ["--sample.temperature", "5e-324"],
                 ["--sample.temperature", "1", "--sample.top_p", "1e-300"]):
        assert cli(capsys, *base, *args) == (0, greedy, ""), args  # greedy: the argmax every step
    code, out, err = cli(capsys, *base, "--sample.repetition_penalty", "1e-45")
    assert code == 2 and out == "" and err.count("\n") == 1 and "repetition_penalty must be between" in err


# --- 2. slow clients, too many clients, a bounded log -----------------------------------------------------
def test_slow_clients_are_answered_408_and_dropped(keyed):
    port = keyed.port
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    slow = {"nothing sent": b"",
            "half a request line": b"POST /v1/compl",
            "headers never end": request(port, body=body)[:60],
            "Content-Length 100, 10 bytes sent": request(port, length=100) + body[:10],
            "a chunked body that never ends": request(port, extra=("Transfer-Encoding: chunked",))
            .replace(b"Content-Length: 0\r\n", b"") + b"5\r\n{\"pro\r\n"}
    with ThreadPoolExecutor(len(slow)) as pool:
        replies = dict(zip(slow, pool.map(lambda data: raw(port, data), slow.values())))
    for name, reply in replies.items():
        assert not reply.hung and reply.status == 408, (name, reply)
        assert json.loads(reply.body)["error"]["code"] == "request_timeout"
    # a kept-alive connection that starts a second request and stalls is dropped too
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: localhost:{port}\r\n\r\nGET /health HT".encode())
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in got
    assert keyed.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_connection_cap_keeps_the_server_below_its_file_limit(servers):
    capped = servers["slow"]  # ulimit -n 128, at most 8 connections
    port, idle = capped.port, []
    try:
        for _ in range(CAP):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD))
        # the cap is reached: more clients get a 503 at once rather than waiting for ever, and their
        # connections are closed, however many come (more than the open-file limit here)
        for _ in range(150):
            reply = raw(port, request(port, "GET", "/health", key=None))
            assert reply.status == 503 and json.loads(reply.body)["error"]["code"] == "too_many_connections"
        # a burst, as fast as connections can be made
        burst = [socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) for _ in range(60)]
        assert all(s.recv(100).startswith(b"HTTP/1.1 503") for s in burst)
        for s in burst:
            s.close()
    finally:
        for s in idle:
            s.close()
    deadline = time.time() + HANG_GUARD  # the server notices the closed connections
    while time.time() < deadline and raw(port, request(port, "GET", "/health", key=None)).status != 200:
        time.sleep(0.05)
    assert httpx.get(f"{capped.url}/health", timeout=HANG_GUARD).status_code == 200
    log = server_log(capped)
    assert "Too many open files" not in log and "Traceback" not in log, log[-3000:]
    assert 1 <= log.count("refused a connection") <= 10  # rate-limited: not one line per refusal


def test_serve_options_checked_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-such-checkpoint")
    for args, message in ((["--api_key", ""], "--api_key is empty"), (["--api_key", " padded"], "printable ASCII"),
                          (["--body_timeout", "0"], "--body_timeout must be"),
                          (["--allowed_hosts", " , "], "--allowed_hosts is empty"),
                          (["--log_level", "loud"], "--log_level must be")):
        code, out, err = cli(capsys, "serve", missing, *args)
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        code, out, err = cli(capsys, "serve", missing, "--max_connections", str(soft))
        assert code == 2 and err.count("\n") == 1 and "open-file limit" in err, err
    code, out, err = cli(capsys, "serve", missing, "--host", "0.0.0.0")
    warning, error = err.splitlines()
    assert code == 2 and "0.0.0.0 without an API key" in warning and "no-such-checkpoint" in error


def test_rate_limit_counts_what_it_holds_back():
    now = [0.0]
    rate = RateLimit(every=10, clock=lambda: now[0])
    assert rate.suffix("refused") == "" and rate.suffix("timeout") == ""
    assert [rate.suffix("refused") for _ in range(99)] == [None] * 99
    now[0] = 10.0
    assert rate.suffix("refused") == " (99 more like this since the last such line)"
    assert rate.suffix("refused") is None


def test_failed_accepts_log_one_line_at_a_time(caplog):
    import errno

    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(loop, RateLimit(every=3600))
        with caplog.at_level(logging.WARNING, logger="gptforge.serve"):
            for _ in range(100):  # as asyncio reports an accept() that failed for want of descriptors
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(errno.EMFILE, "Too many open files")})
    finally:
        loop.close()
    assert [r.getMessage() for r in caplog.records] == [
        "cannot accept connections: Too many open files; lower --max_connections or raise the open-file limit "
        "(ulimit -n)"]
    assert not any(r.exc_info for r in caplog.records)


def test_a_client_that_does_not_read_its_stream_is_dropped(servers):
    slow = servers["slow"]  # write_timeout 1 s; the model never ends a text
    # 16 rows with 20 alternatives per token: megabytes within seconds, more than the kernel's buffers hold
    body = json.dumps({"prompt": "go", "max_tokens": 4000, "n": 16, "stream": True, "logprobs": 20}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills the server's buffers soon
    try:
        s.connect(("127.0.0.1", slow.port))
        s.sendall(request(slow.port, body=body, key=None))
        deadline = time.time() + HANG_GUARD  # never reading: the server must give up on us
        while time.time() < deadline and httpx.get(f"{slow.url}/health").json()["requests"]:
            time.sleep(0.2)
        assert httpx.get(f"{slow.url}/health").json()["requests"] == 0
    finally:
        s.close()
    assert "Traceback" not in server_log(slow)


# --- 3, 4. clients that vanish, JSON that nests ------------------------------------------------------------
def test_a_client_gone_mid_upload_is_no_error(keyed):
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", keyed.port)) as s:
            s.sendall(request(keyed.port, length=len(body) + 50) + body)
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    log = server_log(keyed)
    assert "Traceback" not in log and "ClientDisconnect" not in log and " 500" not in log, log[-3000:]


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                                  b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b', "max_tokens": 2}',
                                  b'{"prompt": "x", "stop": ' + b"[" * 900 + b"]" * 900 + b"}",
                                  b'{"prompt": "x", "logit_bias": {"1": ' + b"[" * 900 + b"]" * 900 + b"}}"])
def test_deeply_nested_json_is_400(keyed, body):
    reply = keyed.post("/v1/completions", body)
    assert reply.status_code == 400, reply.text


# --- 5, 6. browser-origin abuse; HEAD ----------------------------------------------------------------------
def test_json_bodies_need_a_json_content_type(keyed):
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for kind in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/jsonx", "text/json"):
        reply = raw(keyed.port, request(keyed.port, body=body, content_type=kind))
        assert reply.status == 415, (kind, reply)
    for kind in ("application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json"):
        assert raw(keyed.port, request(keyed.port, body=body, content_type=kind)).status == 200, kind


def test_host_header_allow_list(keyed):
    port = keyed.port
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]:80", "LOCALHOST."):
        assert raw(port, request(port, "GET", "/health", host=host)).status == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost:x", "[::1", ""):
        reply = raw(port, request(port, "GET", "/health", host=host))
        assert reply.status in (400, 421), (host, reply)
    reply = raw(port, request(port, "GET", "/health", host=False, version="HTTP/1.0"))
    assert reply.status == 421 and json.loads(reply.body)["error"]["code"] == "invalid_host"


def test_allowed_hosts_option():
    from gptforge.common import UserError
    from gptforge.serve import ServeConfig
    from gptforge.serve.guard import allowed_hosts

    assert allowed_hosts(ServeConfig(allowed_hosts="Example.com:8000, ::1, [fe80::1]:80, proxy.")) == \
        {"example.com", "::1", "fe80::1", "proxy"}
    assert allowed_hosts(ServeConfig(allowed_hosts="a.example,*")) is None
    assert allowed_hosts(ServeConfig(host="0.0.0.0")) is None  # any name can reach an open bind
    assert allowed_hosts(ServeConfig(host="::1")) == {"localhost", "127.0.0.1", "::1"}
    with pytest.raises(UserError, match="not a host name"):
        allowed_hosts(ServeConfig(allowed_hosts="a.example:port"))


def test_a_keyed_server_guards_every_route_but_health_and_the_web_app(keyed):
    for path in ("/openapi.json", "/v1/gptforge/info", "/v1/models", "/docs", "/redoc", "/v1/nothing", "/x"):
        assert httpx.get(f"{keyed.url}{path}").status_code == 401, path
    assert httpx.get(f"{keyed.url}/openapi.json", headers=AUTH).status_code == 200
    for path in ("/health", "/", "/static/app.js", "/static/style.css"):
        assert httpx.get(f"{keyed.url}{path}").status_code == 200, path


def test_web_app_security_headers_and_head(keyed):
    page = httpx.get(f"{keyed.url}/")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "default-src 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    for path, headers in (("/", {}), ("/v1/models", AUTH), ("/health", {}), ("/static/app.js", {})):
        head = httpx.head(f"{keyed.url}{path}", headers=headers)
        assert head.status_code == 200 and head.content == b"", path
    assert httpx.head(f"{keyed.url}/v1/models").status_code == 401


def test_streams_cut_short_leave_no_pending_tasks(servers):
    slow = servers["slow"]
    body = json.dumps({"prompt": "go", "max_tokens": 3000, "stream": True}).encode()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", slow.port), timeout=HANG_GUARD) as s:
            s.sendall(request(slow.port, body=body, key=None))
            assert s.recv(100).startswith(b"HTTP/1.1 200")  # streaming has begun
    for _ in range(10):  # work for the garbage collector, which is what reports a destroyed pending task
        assert slow.post("/v1/completions", {"prompt": "go", "max_tokens": 50}, key=None).status_code == 200
    log = server_log(slow)
    assert "Task was destroyed" not in log and "Traceback" not in log, log[-3000:]


# --- 7. fuzz ----------------------------------------------------------------------------------------------
BAD_VALUES = [None, True, False, "x", "", -1, 0, 1, 2**64, -(2**64), 10**30, 1e308, -1e308, 1e-300, 5e-324, -1e-300,
              1e-45, 3.5, [], [1], {}, {"a": 1}, [[1, 2]], ["a", 1], "\u0000", "\ud800", "x" * 5000]
COMPLETION_FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "presence_penalty",
                     "frequency_penalty", "logit_bias", "top_k", "repetition_penalty", "logprobs", "echo", "best_of",
                     "suffix", "stream_options", "user", "model"]
CHAT_FIELDS = ["messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "response_format",
               "temperature", "top_p", "n", "stop", "seed", "stream", "top_k", "repetition_penalty"]


def fuzz_cases(port: int, key: str = KEY, seed: int = 10) -> list[tuple[str, bytes]]:
    """Malformed requests, generated with a seeded RNG: (name, bytes to send on a fresh connection)."""
    rng = random.Random(seed)
    post = lambda body, **kw: request(port, body=body, key=key, **kw)  # noqa: E731
    cases = []
    for route, base, fields in (("/v1/completions", {"prompt": "hi", "max_tokens": 4}, COMPLETION_FIELDS),
                                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 4}, CHAT_FIELDS)):
        for i in range(35):  # wrong types, huge, tiny, negative numbers in one to three fields
            body = dict(base)
            for field in rng.sample(fields, rng.randint(1, 3)):
                body[field] = rng.choice(BAD_VALUES)
            cases.append((f"{route} #{i} {sorted(body)}", post(json.dumps(body).encode(), path=route)))
    for text in [b'{"prompt": "hi", ', b"{", b"}", b"null", b"1", b'"x"', b"[]", b"\xff\xfe\x00", b"\xef\xbb\xbf{}",
                 b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "temperature": Infinity}',
                 b'{"prompt": "hi", "temperature": 1e999}', b'{"prompt": "hi", "max_tokens": 1e999}',
                 b'{"prompt": "hi", "seed": -1e400}', b'{"prompt": "\\ud800\\udc00\\ud800"}', b"   ",
                 b'{"prompt": "hi", "prompt": 5}', b'{"prompt": [1, 2, -5]}', b'{"prompt": [[]]}',
                 bytes(rng.randrange(256) for _ in range(300))]:
        cases.append((f"bad JSON #{len(cases)} {text[:30]!r}", post(text)))
    for depth in (100_000, 5_000, 990):
        cases.append((f"nested [ {depth}", post(b"[" * depth + b"]" * depth)))
        cases.append((f"nested prompt {depth}", post(b'{"prompt":' + b"[" * depth + b"]" * depth + b"}")))
    cases.append(("nested objects", post(b'{"a":' * 50_000 + b"1" + b"}" * 50_000)))
    for kind in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml",
                 "application/json-patch", "json", "application/merge-patch+json", "application/json; charset=latin-1",
                 "\x7f\x00"):
        cases.append((f"content type {kind!r}", post(b'{"prompt": "hi", "max_tokens": 2}', content_type=kind)))
    ok = b'{"prompt": "hi", "max_tokens": 2}'
    for name, extra in [("bad content-length", ("Content-Length: abc",)),
                        ("two content-lengths", ("Content-Length: 5",)),
                        ("negative content-length", ("Content-Length: -1",)),
                        ("TE and CL", ("Transfer-Encoding: chunked",)), ("header without colon", ("NoColonHere",)),
                        ("space in header name", ("Bad Name: x",)), ("huge header", ("X-Big: " + "a" * 20_000,)),
                        ("many headers", tuple(f"X-H{i}: {i}" for i in range(500))),
                        ("non-ascii header", ("X-Thing: caf\xe9",)), ("bad authorization", ("Authorization: Bearer",)),
                        ("expect 100-continue", ("Expect: 100-continue",)),
                        ("upgrade to websocket", ("Upgrade: websocket", "Connection: Upgrade",
                                                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                                                  "Sec-WebSocket-Version: 13"))]:
        cases.append((f"header: {name}", post(ok, extra=extra)))
    for name, data in [("no key", request(port, body=ok, key=None)), ("wrong key", request(port, body=ok, key="nope")),
                       ("key with non-ascii", request(port, body=ok, key="s\xe9cret")),
                       ("evil host", request(port, body=ok, key=key, host="evil.example")),
                       ("no host", request(port, body=ok, key=key, host=False)),
                       ("HTTP/1.0 without host", request(port, "GET", "/health", host=False, version="HTTP/1.0")),
                       ("HTTP/2.0 text", request(port, "GET", "/health", version="HTTP/2.0")),
                       ("HTTP/9", request(port, "GET", "/health", version="HTTP/9.9")),
                       ("garbage line", b"\x00\x01\x02 garbage\r\n\r\n"), ("lone CRLFs", b"\r\n" * 10),
                       ("TLS hello", bytes.fromhex("16030100a5010000a10303") + bytes(160)),
                       ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
                       ("long URL", request(port, "GET", "/v1/" + "a" * 20_000)),
                       ("absolute URL", request(port, "GET", "http://evil.example/health")),
                       ("asterisk", request(port, "OPTIONS", "*"))]:
        cases.append((name, data))
    for method, path in [("GET", "/v1/completions"), ("PUT", "/v1/completions"), ("DELETE", "/v1/models"),
                         ("OPTIONS", "/v1/chat/completions"), ("PATCH", "/"), ("TRACE", "/"), ("BREW", "/"),
                         ("GET", "/v1/../../etc/passwd"), ("GET", "/static/../../../etc/passwd"),
                         ("GET", "/static/%2e%2e/%2e%2e/etc/passwd"), ("GET", "/static/..%2f..%2fapp.py"),
                         ("GET", "//v1//models"), ("GET", "/v1/models?x=%ff%fe&&=="), ("GET", "/%00"),
                         ("GET", "/static/"), ("GET", "/static/nope.js"), ("POST", "/health"), ("GET", "/v2")]:
        cases.append((f"{method} {path}", request(port, method, path, body=b"{}" if method != "GET" else b"")))
    big = b'{"prompt": "' + b"x" * 1_100_000 + b'"}'
    cases += [("declared 2 MiB", post(b"{}", length=2 * 1024 * 1024)), ("1.1 MB body", post(big)),
              ("1.1 MB chunked", post(b"", extra=("Transfer-Encoding: chunked",)).replace(b"Content-Length: 0\r\n", b"")
               + b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 60_000]), big[i:i + 60_000])
                          for i in range(0, len(big), 60_000)) + b"0\r\n\r\n")]
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    cases += [("partial body", post(b"", length=100) + body[:10]), ("partial headers", post(body)[:50]),
              ("silent client", b""), ("bad chunk size", post(b"", extra=("Transfer-Encoding: chunked",))
                                       .replace(b"Content-Length: 0\r\n", b"") + b"zz\r\n{}\r\n0\r\n\r\n"),
              ("unfinished chunks", post(b"", extra=("Transfer-Encoding: chunked",))
               .replace(b"Content-Length: 0\r\n", b"") + b"4\r\n{\"pr\r\n")]
    return cases


def run_fuzz(port: int, cases: list[tuple[str, bytes]], guard: float = HANG_GUARD) -> dict[str, Reply]:
    with ThreadPoolExecutor(16) as pool:
        return dict(zip([name for name, _ in cases], pool.map(lambda case: raw(port, case[1], guard), cases)))


def test_fuzz_malformed_requests(keyed):
    cases = fuzz_cases(keyed.port)
    assert len(cases) >= 100 and len({name for name, _ in cases}) == len(cases)
    replies = run_fuzz(keyed.port, cases)
    hung = [name for name, r in replies.items() if r.hung]
    server_errors = [(name, r.status) for name, r in replies.items() if r.status is not None and r.status >= 500]
    unanswered = [name for name, r in replies.items() if r.status is None]
    assert not hung and not server_errors and not unanswered, (hung, server_errors, unanswered)
    assert httpx.get(f"{keyed.url}/health").json()["status"] == "ok"
    assert keyed.post("/v1/completions", {"prompt": "still here", "max_tokens": 4}).status_code == 200
    log = server_log(keyed)
    assert "Traceback" not in log and "Task was destroyed" not in log, log[-3000:]
    assert log.count("Invalid HTTP request received") <= 10  # rate-limited: many such cases, few lines
