"""A client for OpenAI-compatible chat endpoints (POST {endpoint}/chat/completions): Ollama
(http://localhost:11434/v1), vLLM, llama.cpp, OpenAI, or gptforge's own server. `gptforge judge` and
`gptforge synth` talk to their LLM through it.

It is the standard library's urllib, so talking to an LLM needs no extra dependency.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

from gptforge.common import UserError


class EndpointUnreachable(Exception):
    """Connection-level failure (refused, DNS, reset) that outlasted every retry."""


class RequestFailed(Exception):
    """One request failed for good (timeout, 5xx/429 after retries, a 4xx about this request)."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Answer a redirect with its HTTPError instead of following it: urllib's default handler would resend
    the Authorization header to whatever host Location names, as a GET whose reply could pass for a score."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


@dataclass
class ChatClient:
    """Minimal client for POST {endpoint}/chat/completions with retries and a per-request timeout.

    Retried, with exponential backoff (backoff * 2**attempt s, or the server's Retry-After if longer):
    connection errors, timeouts, 5xx and 429. Other 4xx are not retried: 401/403/404 mean every request
    would fail the same way (UserError at once); the rest fail only this request. A redirect is a UserError
    naming its target, never followed: the key is sent to this endpoint's origin only.
    timeout bounds each wait on the server (connecting, and every read): a server that stops answering is
    caught; one that keeps trickling bytes is not.
    """

    endpoint: str
    model: str
    api_key: Optional[str] = None
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0

    def __post_init__(self):
        self.endpoint = self.endpoint.rstrip("/")
        if not self.endpoint.startswith(("http://", "https://")):
            raise UserError(f"endpoint must be an http(s) URL like http://localhost:11434/v1, got {self.endpoint!r}")
        if not self.endpoint.endswith("/chat/completions"):
            self.endpoint += "/chat/completions"

    def complete(self, messages: list[dict], **params) -> str:
        """The assistant message's text for one chat request."""
        body = json.dumps({"model": self.model, "messages": messages, **params}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    return _message_text(response.read())
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    raise UserError(f"{self.endpoint} redirected (HTTP {e.code}) to {e.headers.get('Location')}; "
                                    "redirects are not followed, so the API key stays with this endpoint: "
                                    "give the final URL as --endpoint") from None
                detail = _error_detail(e)
                if e.code in (401, 403):
                    raise UserError(f"{self.endpoint} refused the request (HTTP {e.code}: {detail}); "
                                    "check --api_key") from None
                if e.code == 404:
                    raise UserError(f"{self.endpoint} answered 404 ({detail}); check the model name and that "
                                    "the endpoint is the API base, e.g. http://localhost:11434/v1") from None
                if e.code != 429 and e.code < 500:
                    raise RequestFailed(f"HTTP {e.code}: {detail}") from None
                if last:
                    raise RequestFailed(f"HTTP {e.code} after {self.retries + 1} attempts: {detail}") from None
                self._sleep(attempt, e.headers.get("Retry-After"))
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, refusals
                timed_out = isinstance(getattr(e, "reason", e), TimeoutError)  # connect timeouts come wrapped
                if last and timed_out:
                    raise RequestFailed(f"no answer within {self.timeout:g}s, {self.retries + 1} attempts") from None
                if last:
                    raise EndpointUnreachable(str(getattr(e, "reason", e))) from None
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, retry_after: Optional[str] = None) -> None:
        delay = self.backoff * 2 ** attempt
        if retry_after and retry_after.strip().isdigit():
            delay = max(delay, min(float(retry_after), 60.0))  # honour the server, within reason
        time.sleep(delay)


def _message_text(raw: bytes) -> str:
    try:
        return json.loads(raw)["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise RequestFailed(f"not an OpenAI chat completion response: {raw[:120]!r}") from None


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read().decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return (text or e.reason or "no detail")[:200].replace("\n", " ")
