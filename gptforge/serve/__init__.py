"""`gptforge serve`: an OpenAI-compatible HTTP API (and the web app in static/) over one engine.

    app.py      FastAPI app factory and routes over one AppState: request -> plan -> engine job -> JSON or
                SSE (respond); serve()
    requests.py the request side: body -> JSON -> validated OpenAI fields -> ids -> a Plan within the limits
                (and the truncate_history extension)
    replies.py  the reply side: job updates -> OpenAI's responses, stream chunks, logprobs; error bodies
    guard.py    who may ask what: Host allow-list, API key scope, security headers (an ASGI middleware)
    http.py     the connections under it: read/write timeouts, a connection cap, rate-limited logging
    worker.py   the engine's thread: a queue of jobs, continuous batching, cancellation
    static/     the web app: index.html, style.css and native ES modules (app.js imports the rest)

A leaf: only the CLI imports it. This module imports nothing heavy (no fastapi, no torch), so the CLI
can build its options from ServeOptions at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gptforge.options import InferenceOptions


@dataclass(kw_only=True)
class ServeConfig(InferenceOptions):
    """How the server runs; --device, --dtype and --quantize come from InferenceOptions, as in every command
    that runs a model."""

    host: str = "127.0.0.1"
    """Interface to listen on: 127.0.0.1 serves this machine only, 0.0.0.0 every interface."""
    port: int = 8000
    """TCP port."""
    api_key: Optional[str] = None
    """Require `Authorization: Bearer KEY` on every route but /health and the web app's files. Default: the
    GPTFORGE_API_KEY environment variable if set, else no key (an empty key is an error)."""
    allowed_hosts: Optional[str] = None
    """Host names (comma-separated, * for any) that requests may be addressed to, whatever the port.
    Default: localhost, 127.0.0.1 and [::1] on a loopback --host (so web pages cannot reach the server
    through DNS rebinding), else any."""
    model_name: Optional[str] = None
    """Model id reported by /v1/models and in responses. Default: the checkpoint's (or run's) folder name.
    Requests may name any model: this server has one."""
    threads: Optional[int] = None
    """CPU threads for the model's math (default: torch's choice, one per core). Small models on a
    shared machine often run faster with 1."""
    max_batch_size: int = 32
    """Rows decoded together (each choice of each request is a row); further requests wait in the queue."""
    max_concurrent: int = 64
    """Requests running or queued at once; more are answered 429 at once."""
    max_tokens: Optional[int] = None
    """Largest max_tokens a request may ask for. Default: the model's context window."""
    max_body_bytes: int = 1_048_576
    """Largest request body accepted; larger ones are answered 413."""
    max_connections: Optional[int] = None
    """Open connections at most; more are answered 503 and closed at once. Default: what the open-file
    limit (ulimit -n) leaves room for, at most 1024."""
    header_timeout: float = 10.0
    """Seconds a client may take to send a request's headers; then a 408 and the connection closes."""
    body_timeout: float = 30.0
    """Seconds a client may take to send a request's body once its headers are in; then a 408."""
    write_timeout: float = 60.0
    """Seconds a response may wait for a client that does not read it; then the connection is dropped."""
    request_timeout: float = 600.0
    """Seconds a request may take, queueing included; then its generation stops and it gets a 504 (or,
    streaming, an error event)."""
    log_level: str = "info"
    """uvicorn's log level: critical, error, warning, info, debug."""


@dataclass
class ServeOptions(ServeConfig):
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with a web app at /."""

    checkpoint: str
    """Checkpoint directory, or a run directory (uses best, else latest)."""
