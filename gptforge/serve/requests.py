"""From a request to a Plan: the body read as JSON, validated against OpenAI's rules, encoded, and checked
against the server's limits.

Requests follow OpenAI's rules: unknown fields are ignored; a field of the wrong type or out of range is
a 400 naming it; features this server does not have (echo, suffix, logit_bias, tools, best_of > 1,
non-text message parts) are a 400 saying so rather than being silently dropped. Two extensions that
vLLM also accepts: `top_k` and `repetition_penalty`. One of gptforge's own, on /v1/chat/completions:
`truncate_history: true` leaves the oldest turns out when the conversation does not fit the context
window beside the reply's max_tokens (half the window when no max_tokens is given), by the rule the
chat CLI follows (prompts.history_start: system messages and the newest message stay, whole exchanges go
oldest first); the response says how many messages went, in the `X-Gptforge-Dropped-Messages` header
and, when not streaming, in `gptforge.dropped_messages`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from gptforge.common import UserError
from gptforge.engine import LIMITS, InvalidParam, SamplingParams
from gptforge.prompts import history_start, reply_room
from gptforge.serve.replies import APIError
from gptforge.textgen import encode_prompts
from gptforge.tokenizer import Tokenizer

log = logging.getLogger("gptforge.serve")

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # OpenAI allows 5 (completions) and 20 (chat); both accept up to 20 here


# --- the body --------------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing bodies over `limit` bytes (413) before reading them whole, and bodies not
    sent as JSON (415; a cross-origin page may send text/plain without a preflight)."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise APIError(415, "send the request body as JSON, with 'Content-Type: application/json' (got "
                            f"{kind[:60] or 'no content type'!r})", None, "unsupported_media_type")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {int(declared)} bytes; this server accepts at most {limit}",
                       None, "request_too_large")
    return _parse_json(await _read_body(request, limit))


async def _read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is over {limit} bytes, the most this server accepts",
                               None, "request_too_large")
    except ClientDisconnect:  # normal: the answer goes nowhere, and it is no error of the server's
        log.debug("a client closed its connection while sending a request body")
        raise APIError(499, "the client closed the connection", None, "client_closed_request") from None
    return bytes(body)


def _parse_json(body: bytes) -> Any:
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


# --- the request models ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: Optional[bool] = None


class _GenerationRequest(BaseModel):
    """Fields both routes share. strict: a string is not a number and a number is not a bool, as in
    OpenAI's API (JSON integers are still accepted where a float is expected)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=128)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Any = None  # str or list of str: checked by stop_strings() for a clearer message
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    top_k: Optional[int] = Field(None, ge=-1)  # extension; -1 or 0 = off
    repetition_penalty: Optional[float] = Field(None, ge=LIMITS["repetition_penalty"][0], le=10)  # extension; 1 = off

    def unsupported(self) -> None:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", "logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: Any = None  # str, list of str, list of token ids, or list of lists of ids: see prompt_list()
    max_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported by this server; the prompt is not returned", "echo")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this server", "suffix")
        if self.best_of not in (None, 1) and self.best_of != (self.n or 1):
            raise APIError(400, "best_of is not supported by this server; use n and pick yourself", "best_of")


class ChatRequest(_GenerationRequest):
    messages: Any = None  # list of {role, content}: see message_list()
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list] = None
    functions: Optional[list] = None
    response_format: Optional[dict[str, Any]] = None
    truncate_history: Optional[bool] = None  # extension: leave the oldest turns out to fit (module docstring)

    def unsupported(self) -> None:
        super().unsupported()
        if self.tools or self.functions:
            raise APIError(400, "tools and function calling are not supported by this server",
                           "tools" if self.tools else "functions")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(400, "only response_format {'type': 'text'} is supported by this server",
                           "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "Invalid value for 'top_logprobs': 'logprobs' must be set to true if "
                                "'top_logprobs' is used.", "top_logprobs")


def parse_request(cls: type[_GenerationRequest], data: Any) -> Any:
    """Validated request, or a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"Invalid value for '{param}': {first['msg']}", param) from None
    request.unsupported()
    return request


def stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "Invalid value for 'stop': expected a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"Invalid value for 'stop': at most {MAX_STOP_STRINGS} stop strings, got "
                            f"{len(stops)}", "stop")
    if any(not s for s in stops):
        raise APIError(400, "Invalid value for 'stop': stop strings must not be empty", "stop")
    for s in stops:
        check_text(s, "stop")
    return stops


def prompt_list(value: Any) -> list[Any]:
    """The prompts of a completion request: each a string or a list of token ids."""
    if value is None:
        raise APIError(400, "Missing required parameter: 'prompt'", "prompt")
    if isinstance(value, str):
        return [check_text(value, "prompt")]
    if isinstance(value, list) and value:
        if all(_is_int(t) for t in value):
            return [value]
        if all(isinstance(p, str) for p in value):
            return [check_text(p, "prompt") for p in value]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
            return value
    raise APIError(400, "Invalid value for 'prompt': expected a string, a list of strings, a non-empty list "
                        "of token ids, or a list of such lists", "prompt")


def message_list(value: Any) -> list[dict[str, str]]:
    """Chat messages as {role, content} with text content; the tokenizer checks the roles."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "Invalid value for 'messages': expected a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise APIError(400, f"Invalid value for '{where}': expected an object with role and content", where)
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if not isinstance(role, str):
            raise APIError(400, f"Invalid value for '{where}.role': expected a string", f"{where}.role")
        out.append({"role": role, "content": _content_text(content, f"{where}.content")})
    return out


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return check_text(content, where)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"Invalid value for '{where}': only text parts ({{'type': 'text', "
                                    "'text': ...}}) are supported by this server", where)
            texts.append(check_text(part["text"], where))
        return "".join(texts)
    raise APIError(400, f"Invalid value for '{where}': expected a string or a list of text parts", where)


def check_text(text: str, param: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that are not valid Unicode text: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"Invalid value for '{param}': the text holds invalid Unicode (a lone surrogate)",
                       param) from None
    return text


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --- encoding and limits ---------------------------------------------------------------------------------
def encoded(encode: Callable[[], Any], param: str) -> Any:
    """Run a tokenizer call, turning its complaints (unknown characters, bad roles) into a 400."""
    try:
        return encode()
    except UserError as e:
        raise APIError(400, f"Invalid value for '{param}': {e}", param) from None


def completion_prompts(tokenizer: Tokenizer, prompts: list[Any],
                       with_chars: bool) -> tuple[list[list[int]], list[int]]:
    """Each prompt's ids (a string through the tokenizer, ids as they are), and its length in characters:
    legacy logprobs count text_offset from the start of the prompt's text (0s unless `with_chars`)."""
    ids = encoded(lambda: [encode_prompts(tokenizer, [p])[0] if isinstance(p, str) else p for p in prompts],
                  "prompt")
    if not with_chars:
        return ids, [0] * len(prompts)
    return ids, encoded(lambda: [len(p) if isinstance(p, str) else len(tokenizer.decode(p)) for p in prompts],
                        "prompt")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of this server."""

    context_length: int
    vocab_size: int
    max_tokens: int  # the largest max_tokens (at most the context window)
    max_batch_size: int  # rows (prompts x n) in one request


def chat_prompt(tokenizer: Tokenizer, req: ChatRequest, limits: RequestLimits) -> tuple[list[int], Optional[int]]:
    """The conversation's prompt ids, and with `truncate_history` how many of its oldest messages were left
    out to fit the window (None without it)."""
    messages, dropped = message_list(req.messages), None
    if req.truncate_history:
        reserve = req.max_completion_tokens or req.max_tokens or reply_room(limits.max_tokens,
                                                                            limits.context_length)
        messages, dropped = fit_history(tokenizer, messages, limits.context_length - reserve)
    return encoded(lambda: tokenizer.encode_chat(messages, add_generation_prompt=True)[0], "messages"), dropped


def fit_history(tokenizer: Tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], int]:
    """The messages that fit in `budget` tokens by the library's rule (prompts.history_start), and how many
    were left out. A newest message that cannot fit stays: the context check then says so."""
    last = len(messages) - 1
    lengths = encoded(lambda: [len(tokenizer.encode_chat([m], add_generation_prompt=i == last)[0])
                               for i, m in enumerate(messages)], "messages")
    start = history_start([m["role"] for m in messages], lengths, budget)
    kept = [m for i, m in enumerate(messages) if i >= start or m["role"] == "system"]
    return kept, len(messages) - len(kept)


# --- the plan --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A validated request, ready for the engine."""

    rows: list[list[int]]  # prompt ids, n rows per prompt (prompt-major)
    params: SamplingParams
    stops: list[str]
    logprobs: Optional[int]  # top alternatives per token; None: no logprobs
    prompt_tokens: int
    prompt_chars: list[int]  # per row: where text_offset starts (legacy logprobs)


def plan_request(req: _GenerationRequest, prompts: list[list[int]], limits: RequestLimits, max_tokens: int,
                 stop_ids: set[int], n_top: Optional[int], prompt_param: str,
                 chars: Optional[list[int]] = None) -> Plan:
    """Check the request against the limits and the context window; build its rows (n per prompt) and
    sampling params. A 400 naming the field for anything wrong."""
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    n = req.n or 1
    check_size(prompts, n, max_tokens, limits, param, prompt_param)
    params = sampling_params(req, max_tokens, stop_ids, param)
    rows = [list(p) for p in prompts for _ in range(n)]
    chars = chars or [0] * len(prompts)
    return Plan(rows, params, stop_strings(req.stop), n_top, sum(map(len, prompts)),
                [c for c in chars for _ in range(n)])


def check_size(prompts: list[list[int]], n: int, max_tokens: int, limits: RequestLimits, param: str,
               prompt_param: str) -> None:
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"Invalid value for '{param}': {max_tokens} is more than this server allows "
                            f"({limits.max_tokens})", param)
    if n * len(prompts) > limits.max_batch_size:
        raise APIError(400, f"Invalid value for 'n': {n} choices for {len(prompts)} prompt(s) is more than "
                            f"the server's max_batch_size of {limits.max_batch_size}", "n")
    for p in prompts:
        if len(p) + max_tokens > limits.context_length:
            raise APIError(400, f"This model's maximum context length is {limits.context_length} tokens. "
                                f"However, you requested {len(p) + max_tokens} tokens ({len(p)} in the "
                                f"prompt, {max_tokens} for the completion). Please reduce the length of "
                                f"the prompt or the completion.", prompt_param, "context_length_exceeded")
        bad = next((t for t in p if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"Invalid value for 'prompt': token id {bad} is outside the vocabulary "
                                f"(0..{limits.vocab_size - 1})", prompt_param)


def sampling_params(req: _GenerationRequest, max_tokens: int, stop_ids: set[int], param: str) -> SamplingParams:
    """The engine's params from OpenAI's fields (their defaults: temperature 1, every filter off)."""
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k if req.top_k and req.top_k > 0 else None,
            top_p=None if req.top_p in (None, 1) else req.top_p,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            stop_token_ids=frozenset(stop_ids), seed=req.seed)
    except InvalidParam as e:
        name = param if e.name == "max_new_tokens" else e.name
        raise APIError(400, f"Invalid value for '{name}': {e}", name) from None
