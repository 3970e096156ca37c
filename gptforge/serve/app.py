"""The HTTP side: FastAPI routes speaking OpenAI's API over one GenerationWorker, plus the web app.

    GET  /                       the web app (static/index.html), /static/... its files
    GET  /health                 liveness, with queue figures (no API key needed)
    GET  /v1/models              the one model
    GET  /v1/gptforge/info       what the web app shows: size, context, tokenizer, device, chat or not
    POST /v1/completions         text completion (prompt: string, strings, token ids)
    POST /v1/chat/completions    chat, through the tokenizer's chat template (`truncate_history: true`:
                                 the oldest turns are left out to fit, see requests.py)
Both POST routes stream with `stream: true` (server-sent events ending with `data: [DONE]`). Each route is
a module-level function over the app's AppState: the request side (body, validation, limits: a Plan) is
requests.py, the reply side (JSON shapes) replies.py; respond() runs a plan on the worker.

Every error, expected or not, is OpenAI's JSON ({"error": {...}}) with a 4xx/5xx status; a request the
server cannot take now (max_concurrent) is a 429 at once. A client that goes away (stream closed, or a
non-streaming request abandoned, or a body never finished) cancels its generation before the engine's
next step, and is no error in the log. Host, API key and security headers: guard.py; connection limits
and timeouts: http.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptforge.common import UserError
from gptforge.serve import ServeConfig, ServeOptions
from gptforge.serve.guard import Guard, allowed_hosts, api_key, is_loopback
from gptforge.serve.http import Limits, QuietRepeats, RateLimit, connection_room, protocol_class, quiet_accept_errors
from gptforge.serve.replies import APIError, ChatReply, CompletionReply, Reply, TokenText, error_body, new_id
from gptforge.serve.requests import (ChatRequest, CompletionRequest, Plan, RequestLimits, chat_prompt,
                                     completion_prompts, parse_request, plan_request, prompt_list, read_json)
from gptforge.serve.worker import Done, Failed, GenerationWorker, Job, RowUpdate

STATIC = Path(__file__).resolve().parent / "static"
DROPPED_HEADER = "X-Gptforge-Dropped-Messages"  # truncate_history: how many messages were left out
log = logging.getLogger("gptforge.serve")


@dataclass
class ServerInfo:
    """What the server knows about its model, for /v1/models and /v1/gptforge/info."""

    model: str
    checkpoint: str
    parameters: int
    context_length: int
    vocab_size: int
    tokenizer: str
    device: str
    dtype: str
    chat: bool
    weights: str = "none"  # what the model's products compute with: --quantize's f32, int8, bf16 or none


@dataclass
class AppState:
    """What the routes share, one per app (at app.state.gptforge): the engine's worker, the model, the
    server's options, what one request may ask, and the requests in flight."""

    worker: GenerationWorker
    info: ServerInfo
    config: ServeConfig
    limits: RequestLimits
    slots: "Slots"
    names: TokenText  # how logprobs show tokens (cached)

    @classmethod
    def build(cls, worker: GenerationWorker, info: ServerInfo, config: ServeConfig) -> "AppState":
        max_tokens = min(config.max_tokens or info.context_length, info.context_length)
        limits = RequestLimits(info.context_length, info.vocab_size, max_tokens, config.max_batch_size)
        return cls(worker, info, config, limits, Slots(config.max_concurrent), TokenText(worker.tokenizer))

    @property
    def tokenizer(self):
        return self.worker.tokenizer


def create_app(worker: GenerationWorker, info: ServerInfo, config: ServeConfig,
               rate: Optional[RateLimit] = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        quiet_accept_errors(asyncio.get_running_loop(), rate or RateLimit())
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="gptforge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gptforge = AppState.build(worker, info, config)
    app.add_middleware(Guard, api_key=api_key(config), hosts=allowed_hosts(config))
    _add_error_handlers(app)
    app.get("/", include_in_schema=False)(index)
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.get("/v1/gptforge/info")(server_info)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat_completions)
    return app


def _state(request: Request) -> AppState:
    return request.app.state.gptforge


# --- pages and metadata ----------------------------------------------------------------------------------
async def index(request: Request):
    page = STATIC / "index.html"
    if page.is_file():
        return FileResponse(page)
    return HTMLResponse(f"<!doctype html><title>gptforge</title><h1>gptforge: {_state(request).info.model}</h1>"
                        "<p>The web app is not installed; the API is at <code>/v1</code>.</p>")


async def health(request: Request):
    s = _state(request)
    return {"status": "ok", "model": s.info.model, "running": s.worker.running, "queued": s.worker.queued,
            "requests": s.slots.in_use}


async def models(request: Request):
    return {"object": "list", "data": [{"id": _state(request).info.model, "object": "model", "created": 0,
                                        "owned_by": "gptforge"}]}


async def server_info(request: Request):
    s = _state(request)
    limits = {"max_tokens": s.limits.max_tokens, "max_batch_size": s.config.max_batch_size,
              "max_concurrent": s.config.max_concurrent}
    return {**dataclasses.asdict(s.info), "limits": limits}


# --- generation ------------------------------------------------------------------------------------------
async def completions(request: Request):
    s = _state(request)
    req = parse_request(CompletionRequest, await read_json(request, s.config.max_body_bytes))
    ids, chars = completion_prompts(s.tokenizer, prompt_list(req.prompt), req.logprobs is not None)
    plan = plan_request(req, ids, s.limits, req.max_tokens or 16, {s.tokenizer.eot_id}, req.logprobs, "prompt",
                        chars)
    return await respond(s, request, req, plan, CompletionReply(new_id("cmpl"), s.info.model, s.names, plan))


async def chat_completions(request: Request):
    s = _state(request)
    req = parse_request(ChatRequest, await read_json(request, s.config.max_body_bytes))
    if not s.info.chat:
        raise APIError(400, "this checkpoint has no chat template; fine-tune it with `gptforge finetune "
                            "chat` or use /v1/completions", "messages", "no_chat_template")
    ids, dropped = chat_prompt(s.tokenizer, req, s.limits)
    room = max(1, min(s.limits.max_tokens, s.limits.context_length - len(ids)))  # default: what fits
    n_top = (req.top_logprobs or 0) if req.logprobs else None
    plan = plan_request(req, [ids], s.limits, req.max_completion_tokens or req.max_tokens or room,
                        set(s.tokenizer.chat_stop_ids), n_top, "messages")
    reply = ChatReply(new_id("chatcmpl"), s.info.model, s.names, plan)
    if dropped is None:
        return await respond(s, request, req, plan, reply)
    reply.extension = {"dropped_messages": dropped}
    return await respond(s, request, req, plan, reply, {DROPPED_HEADER: str(dropped)})


async def respond(state: AppState, request: Request, req, plan: Plan, reply: Reply,
                  headers: Optional[dict[str, str]] = None):
    """Run the plan as a job: a JSON response, or an event stream once the first tokens are there (so
    an error before them still gets its proper status)."""
    slot = state.slots.take()
    job = Job(plan.rows, plan.params, plan.stops, plan.logprobs)
    state.worker.submit(job)
    timeout = state.config.request_timeout
    deadline = asyncio.get_running_loop().time() + timeout
    streaming = False
    try:
        async with _DisconnectWatch(request) as watch:
            event = await _next_event(job, deadline, timeout, watch)
            if not req.stream:
                while event is not None:
                    reply.add(event)
                    event = await _next_event(job, deadline, timeout, watch)
                return JSONResponse(reply.response(), headers=headers)
        streaming = True
        return _SSEResponse(_sse(job, reply, event, deadline, timeout, req.include_usage), headers,
                            on_close=lambda: (state.worker.cancel(job), slot.release()))
    finally:
        if not streaming:
            state.worker.cancel(job)  # a no-op for a finished job
            slot.release()


# --- streaming -------------------------------------------------------------------------------------------
async def _sse(job: Job, reply: "Reply", first, deadline: float, timeout: float,
               include_usage: bool) -> AsyncIterator[str]:
    event = first
    for chunk in reply.opening_chunks():
        yield _data(chunk, include_usage)
    try:
        while event is not None:
            for chunk in reply.chunks(event):
                yield _data(chunk, include_usage)
            event = await _next_event(job, deadline, timeout)
    except APIError as e:  # headers are sent: OpenAI reports mid-stream errors as an error event
        yield _data(e.body(), False)
        return
    if include_usage:
        yield _data(reply.usage_chunk(), False)
    yield "data: [DONE]\n\n"


def _data(chunk: dict, include_usage: bool) -> str:
    if include_usage:
        chunk["usage"] = None  # as OpenAI: every chunk but the last has usage null
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


class _SSEResponse(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (finished, client gone, error)."""

    def __init__(self, content, headers: Optional[dict[str, str]], on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _next_event(job: Job, deadline: float, timeout: float,
                      watch: Optional["_DisconnectWatch"] = None) -> Optional[list[RowUpdate]]:
    """The job's next updates; None once it is done. Raises APIError for a failed or timed-out job, or for
    a client that has gone away (with `watch`; the answer goes nowhere, but ends the handler quietly)."""
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining > 0 and not job.events.empty():  # the common case while tokens flow: no task, no timer
        return _unpack(job.events.get_nowait())
    getter = asyncio.ensure_future(job.events.get())
    waits = {getter} | ({watch.task} if watch else set())
    try:
        done, _ = await asyncio.wait(waits, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this task is cancelled (a stream whose client left): no orphaned getter task
        if not getter.done():
            getter.cancel()
    if getter not in done:
        if watch and watch.task in done:
            raise APIError(499, "the client closed the connection", None, "client_closed_request")
        raise APIError(504, f"the request did not finish within the server's timeout of {timeout:g} s; ask "
                            "for fewer tokens or retry later", None, "timeout")
    return _unpack(getter.result())


def _unpack(event) -> Optional[list[RowUpdate]]:
    if isinstance(event, Done):
        return None
    if isinstance(event, Failed):
        raise APIError(event.status, event.message, None, event.code)
    return event


class _DisconnectWatch:
    """Notices a client that goes away while the handler is still waiting (before any response)."""

    def __init__(self, request: Request):
        self.request = request
        self.task: Optional[asyncio.Future] = None

    async def __aenter__(self):
        self.task = asyncio.ensure_future(self._wait())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()  # StreamingResponse listens for the disconnect itself from here on
        try:
            await self.task
        except asyncio.CancelledError:
            pass

    async def _wait(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass


class Slots:
    """Requests in flight (queued or running), capped at max_concurrent: more get a 429 at once."""

    def __init__(self, limit: int):
        self.limit, self.in_use = limit, 0

    def take(self) -> "_Slot":
        if self.in_use >= self.limit:
            raise APIError(429, f"the server is busy ({self.limit} requests in flight); retry shortly", None,
                           "rate_limit_exceeded")
        self.in_use += 1
        return _Slot(self)


class _Slot:
    def __init__(self, slots: Slots):
        self.slots, self.held = slots, True

    def release(self) -> None:
        if self.held:  # idempotent: both the stream's end and its on_close may call it
            self.held = False
            self.slots.in_use -= 1


# --- errors ----------------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        message = {404: "Unknown URL; the API is under /v1 (see /v1/models)",
                   405: "Method not allowed on this URL"}.get(exc.status_code, str(exc.detail))
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(exc.status_code, message, None, code), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return JSONResponse(error_body(400, f"invalid request: {exc.errors()[:1]}"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):  # the traceback is logged once, by uvicorn
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}", None,
                                       "internal_error"), status_code=500)


# --- running it ------------------------------------------------------------------------------------------
def serve(config: ServeOptions) -> None:
    """Load a checkpoint (or a run's best/latest) and serve it until interrupted (`gptforge serve`)."""
    import torch
    import uvicorn

    from gptforge.checkpoint import load_for_inference, resolve_checkpoint
    from gptforge.common import human_count
    from gptforge.engine import Engine
    from gptforge.model import count_parameters

    check_config(config)
    if not is_loopback(config.host) and api_key(config) is None:
        print(f"gptforge: warning: serving on {config.host} without an API key: anyone who can reach this port "
              "can use the model; set --api_key (or GPTFORGE_API_KEY)", file=sys.stderr, flush=True)
    max_connections, backlog = connection_room(config.max_connections)
    limits = Limits(config.header_timeout, config.body_timeout, config.write_timeout, max_connections)
    if config.threads:
        torch.set_num_threads(config.threads)
    path = resolve_checkpoint(Path(config.checkpoint))
    runtime = config.runtime()
    model, tokenizer, _ = load_for_inference(path, runtime)
    engine = Engine(model, runtime)
    info = ServerInfo(
        model=config.model_name or default_model_name(path), checkpoint=str(path),
        parameters=count_parameters(model), context_length=model.config.block_size,
        vocab_size=model.config.vocab_size, tokenizer=tokenizer.describe(), device=str(runtime.device),
        dtype=str(runtime.dtype).removeprefix("torch."), chat=bool(getattr(tokenizer, "has_chat_template", False)),
        weights=runtime.weights or "none")
    rate = RateLimit()
    _log_like_uvicorn(config.log_level, rate)
    app = create_app(GenerationWorker(engine, tokenizer, config.max_batch_size), info, config, rate)
    print(f"gptforge: serving {info.model} ({human_count(info.parameters)} parameters, context "
          f"{info.context_length}{', chat' if info.chat else ''}, {info.weights} weights) on "
          f"http://{config.host}:{config.port} "
          "(web app at /, OpenAI API at /v1)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=5,
                http=protocol_class(limits, rate), ws="none", backlog=backlog)


def _log_like_uvicorn(level: str, rate: RateLimit) -> None:
    """Our lines (gptforge.serve) at --log_level, formatted as uvicorn's; uvicorn's warnings about bad
    clients rate-limited."""
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    log.handlers = [handler]
    log.propagate = False
    log.setLevel(LOG_LEVELS[level])
    logging.getLogger("uvicorn.error").addFilter(QuietRepeats(rate))


LOG_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
              "info": logging.INFO, "debug": logging.DEBUG, "trace": 5}


def check_config(config: ServeConfig) -> None:
    for name in ("max_batch_size", "max_concurrent", "max_body_bytes"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(config, name)}")
    for name in ("max_tokens", "threads", "max_connections"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(config, name)}")
    for name in ("request_timeout", "header_timeout", "body_timeout", "write_timeout"):
        if not 0 < getattr(config, name) < math.inf:
            raise UserError(f"--{name} must be a number of seconds > 0, got {getattr(config, name)}")
    if not 0 <= config.port < 65536:
        raise UserError(f"--port must be between 0 and 65535, got {config.port}")
    if config.log_level not in LOG_LEVELS:
        raise UserError(f"--log_level must be one of {', '.join(LOG_LEVELS)}, got {config.log_level!r}")
    api_key(config)
    allowed_hosts(config)


def default_model_name(path: Path) -> str:
    """A checkpoint's folder name, or its run's name for runs/NAME/checkpoints/{best,latest,step_N}."""
    path = Path(path).resolve()
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name

