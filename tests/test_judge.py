"""LLM judge against a stub OpenAI-compatible server on loopback: scores and summary, robust reply
parsing, retries with backoff, timeouts, unreachable endpoints and malformed input files."""

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptforge.common import UserError
from gptforge.apps.judge import format_report, judge_file, parse_score
from helpers import run_cli

FAST = dict(backoff=0.01, progress=False)  # retries in tests wait milliseconds, not seconds


class Stub:
    """A chat-completions server whose answer to each request is decided by `self.reply(body)`: a string
    (the judge's reply), an int (an HTTP error status), (status, url) (a redirect), or "hang" (never answer
    until the test ends). A GET (what a followed redirect turns a POST into) is recorded and answered "99"."""

    def __init__(self):
        self.requests: list[dict] = []  # {"body": ..., "headers": ...} per request received
        self.reply = lambda body: "50"
        self.release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                answer = stub.reply(body)
                if answer == "hang":
                    stub.release.wait(10)
                    return
                if isinstance(answer, int):
                    self._send(answer, {"error": {"message": f"stub status {answer}"}})
                    return
                if isinstance(answer, tuple):
                    self._send(answer[0], {}, location=answer[1])
                    return
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})

            def do_GET(self):
                stub.requests.append({"path": self.path, "method": "GET", "headers": dict(self.headers)})
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "99"}}]})

            def _send(self, status, payload, location=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # loopback must not go through a proxy
    s = Stub()
    yield s
    s.close()


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


ITEMS = [
    {"instruction": "Rewrite in passive voice.", "input": "The cat ate the fish.",
     "output": "The fish was eaten by the cat.", "response": "The fish was eaten by the cat."},
    {"instruction": "Name a primary colour.", "output": "Red.", "model_response": "Blue."},
    {"instruction": "What is 2+2?", "reference": "4", "response": "I like turtles."},
]


def prompt_of(body) -> str:
    return body["messages"][-1]["content"]


def test_scores_summary_and_output_file(stub, tmp_path):
    replies = {"The fish was eaten by the cat.": "85", "Blue.": "Score: 60/100", "I like turtles.": "no idea"}
    stub.reply = lambda body: next(r for k, r in replies.items() if f"response `{k}`" in prompt_of(body))
    out = tmp_path / "judged.jsonl"
    report = judge_file(write_jsonl(tmp_path / "r.jsonl", ITEMS), stub.url, "judge-model", out=out, **FAST)

    assert (report["total"], report["scored"], report["failed"]) == (3, 2, 1)
    assert report["mean"] == 72.5 and report["median"] == 72.5
    assert report["histogram"]["80-89"] == 1 and report["histogram"]["60-69"] == 1
    assert sum(report["histogram"].values()) == 2  # the unparseable reply is a failure, not a zero
    assert report["failures"] == [{"line": 3, "error": "no 0-100 score in reply"}]
    assert "mean score 72.5 over 2 of 3 items (1 failed)" in format_report(report)

    body = stub.requests[0]["body"]
    assert stub.requests[0]["path"] == "/v1/chat/completions"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert prompt_of(body) == (
        "Given the input `Rewrite in passive voice.\n\nInput: The cat ate the fish.` and correct output "
        "`The fish was eaten by the cat.`, score the model response `The fish was eaten by the cat.` on a scale "
        "from 0 to 100, where 100 is the best score. Respond with the integer number only.")
    assert "correct output `Red.`" in prompt_of(stub.requests[1]["body"])  # no input: no Input section
    assert "Input:" not in prompt_of(stub.requests[1]["body"])

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in rows] == [85, 60, None]
    assert rows[1]["model_response"] == "Blue." and rows[1]["judge_reply"] == "Score: 60/100"
    assert rows[2]["error"] == "no 0-100 score in reply"


@pytest.mark.parametrize("reply,score", [
    ("85", 85), ("85.", 85), ("Score: 85", 85), ("85/100", 85), ("**90**", 90), (" 100\n", 100), ("0", 0),
    ("I'd rate it 72 out of 100.", 72), ("On a scale from 0 to 100, I give this 40.", 40),
    ("Rating (0-100): 33", 33), ("72.6", 73), ("<think>maybe 10, maybe 20</think>\n55", 55),
    ("Step 1 looks fine. Score: 64/100", 64),
    ("", None), ("N/A", None), ("The response is excellent.", None), ("150", None), ("-5", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_retries_server_errors_then_succeeds(stub, tmp_path):
    statuses = iter([503, 429])
    stub.reply = lambda body: next(statuses, "77")
    report = judge_file(write_jsonl(tmp_path / "r.jsonl", ITEMS[:1]), stub.url, "m", retries=3, **FAST)
    assert report["scored"] == 1 and report["mean"] == 77
    assert len(stub.requests) == 3


def test_persistent_server_error_and_bad_request_fail_the_item_only(stub, tmp_path):
    stub.reply = lambda body: 500 if "passive" in prompt_of(body) else 400 if "colour" in prompt_of(body) else "10"
    report = judge_file(write_jsonl(tmp_path / "r.jsonl", ITEMS), stub.url, "m", retries=2, **FAST)
    assert (report["scored"], report["failed"], report["mean"]) == (1, 2, 10)
    errors = {f["line"]: f["error"] for f in report["failures"]}
    assert errors[1].startswith("HTTP 500 after 3 attempts") and errors[2].startswith("HTTP 400")
    assert len(stub.requests) == 3 + 1 + 1  # 500 retried, 400 not


def test_hanging_server_times_out_and_counts_as_failed(stub, tmp_path):
    stub.reply = lambda body: "hang" if "passive" in prompt_of(body) else "90"
    start = time.monotonic()
    report = judge_file(write_jsonl(tmp_path / "r.jsonl", ITEMS[:2]), stub.url, "m", timeout=0.3, retries=1, **FAST)
    assert time.monotonic() - start < 3
    assert (report["scored"], report["failed"]) == (1, 1)
    assert report["failures"][0]["line"] == 1 and "no answer within 0.3s" in report["failures"][0]["error"]


def test_unreachable_endpoint_is_a_user_error(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="cannot reach .* after 2 attempts; is the server running"):
        judge_file(write_jsonl(tmp_path / "r.jsonl", ITEMS), f"http://127.0.0.1:{port}/v1", "m", retries=1, **FAST)
    with pytest.raises(UserError, match="http"):
        judge_file(tmp_path / "r.jsonl", "localhost:11434/v1", "m", **FAST)


def test_malformed_input_names_the_line(stub, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ITEMS[0]) + "\n\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl line 3: not valid JSON"):
        judge_file(bad, stub.url, "m", **FAST)
    write_jsonl(bad, [ITEMS[0], {"instruction": "x", "output": "y"}])
    with pytest.raises(UserError, match=r"line 2: missing text field 'response' \(or 'model_response'\)"):
        judge_file(bad, stub.url, "m", **FAST)
    write_jsonl(bad, [[1, 2]])
    with pytest.raises(UserError, match="line 1: expected a JSON object"):
        judge_file(bad, stub.url, "m", **FAST)
    bad.write_text("\n")
    with pytest.raises(UserError, match="no items"):
        judge_file(bad, stub.url, "m", **FAST)
    with pytest.raises(UserError, match="cannot read"):
        judge_file(tmp_path / "missing.jsonl", stub.url, "m", **FAST)
    assert stub.requests == []  # nothing was sent for a bad file


def test_api_key_is_sent_as_bearer_and_rejection_is_clear(stub, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", ITEMS[:1])
    judge_file(path, stub.url, "m", api_key="sk-test", **FAST)
    assert stub.requests[0]["headers"]["Authorization"] == "Bearer sk-test"
    judge_file(path, stub.url, "m", **FAST)
    assert "Authorization" not in stub.requests[1]["headers"]
    stub.reply = lambda body: 401
    with pytest.raises(UserError, match="HTTP 401.*check --api_key"):
        judge_file(path, stub.url, "m", **FAST)
    stub.reply = lambda body: 404
    with pytest.raises(UserError, match="404.*API base"):
        judge_file(path, stub.url, "m", **FAST)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_error_and_the_key_never_leaves_the_endpoint(stub, tmp_path, status):
    elsewhere = Stub()  # another port: another origin, which answers anything it is sent with a score
    try:
        stub.reply = lambda body: (status, elsewhere.url + "/chat/completions")
        with pytest.raises(UserError, match=rf"redirected \(HTTP {status}\) to {re.escape(elsewhere.url)}"):
            judge_file(write_jsonl(tmp_path / "r.jsonl", ITEMS[:1]), stub.url, "m", api_key="sk-secret", retries=3,
                       **FAST)
        assert elsewhere.requests == []  # neither the key nor any request went there
        assert len(stub.requests) == 1  # not retried: every request would be redirected the same way
        assert stub.requests[0]["headers"]["Authorization"] == "Bearer sk-secret"
    finally:
        elsewhere.close()


def test_a_redirect_is_one_line_on_the_cli(stub, tmp_path):
    elsewhere = Stub()
    try:
        stub.reply = lambda body: (302, elsewhere.url + "/chat/completions")
        result = run_cli("judge", str(write_jsonl(tmp_path / "r.jsonl", ITEMS)), "--endpoint", stub.url,
                         "--model", "m", "--api_key", "sk-secret", timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == (  # after the progress bar
            f"gptforge: error: {stub.url}/chat/completions redirected (HTTP 302) to {elsewhere.url}/chat/completions; "
            "redirects are not followed, so the API key stays with this endpoint: give the final URL as --endpoint")
        assert elsewhere.requests == [] and "sk-secret" not in result.stderr + result.stdout
    finally:
        elsewhere.close()


def test_a_rejection_does_not_wait_for_requests_in_flight(stub, tmp_path):
    items = [{"instruction": f"item {i}", "output": "x", "response": "y"} for i in range(2)]
    stub.reply = lambda body: 401 if "`item 0`" in prompt_of(body) else "hang"
    start = time.monotonic()
    with pytest.raises(UserError, match="HTTP 401"):
        judge_file(write_jsonl(tmp_path / "r.jsonl", items), stub.url, "m", concurrency=2, timeout=5, retries=0,
                   **FAST)
    assert time.monotonic() - start < 3  # not the hanging request's 5 s timeout


def test_concurrent_requests_keep_input_order(stub, tmp_path):
    items = [{"instruction": f"item {i}", "output": "x", "response": "y"} for i in range(12)]

    def reply(body):
        i = int(prompt_of(body).split("`item ")[1].split("`")[0])
        time.sleep(0.05 * (i % 3))  # answers arrive out of order
        return str(i * 5)

    stub.reply = reply
    out = tmp_path / "judged.jsonl"
    report = judge_file(write_jsonl(tmp_path / "r.jsonl", items), stub.url, "m", concurrency=4, out=out, **FAST)
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [i * 5 for i in range(12)]
    assert report["mean"] == sum(i * 5 for i in range(12)) / 12
