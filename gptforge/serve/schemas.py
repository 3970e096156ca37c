"""Request validation and the JSON shapes of OpenAI's API: responses, stream chunks, logprobs, errors.

Requests follow OpenAI's rules: unknown fields are ignored; a field of the wrong type or out of range is
a 400 naming it; features this server does not have (echo, suffix, logit_bias, tools, best_of > 1,
non-text message parts) are a 400 saying so rather than being silently dropped. Two extensions that
vLLM also accepts: `top_k` and `repetition_penalty`.
"""

from __future__ import annotations

import codecs
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gptforge.engine import LIMITS, SamplingParams
from gptforge.serve.worker import RowUpdate

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # OpenAI allows 5 (completions) and 20 (chat); both accept up to 20 here


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    kind = ("server_error" if status >= 500 else "rate_limit_error" if status == 429
            else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- requests ----------------------------------------------------------------------------------------
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


# --- responses ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A validated request, ready for the engine."""

    rows: list[list[int]]  # prompt ids, n rows per prompt (prompt-major)
    params: SamplingParams
    stops: list[str]
    logprobs: Optional[int]  # top alternatives per token; None: no logprobs
    prompt_tokens: int
    prompt_chars: list[int]  # per row: where text_offset starts (legacy logprobs)


@dataclass
class Choice:
    """What one choice (row) has produced so far, for a non-streaming response."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: Optional[str] = None


class TokenText:
    """How a token is shown in logprobs: its text and its bytes. A token that is not valid UTF-8 by itself
    (part of a character) is written as OpenAI does, "bytes:\\xe2\\x80", so distinct tokens stay distinct
    (the legacy format keys alternatives by this text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        if token not in self.cache:
            raw = self.tokenizer.decode_bytes([token])
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self.cache[token] = (text, raw)
        return self.cache[token]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, obj: str, model: str, created: Optional[int] = None) -> dict:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model,
            "system_fingerprint": None}


def completion_logprobs(names: TokenText, tokens, logprobs, tops, offsets: list[int]) -> dict:
    """Legacy format: parallel lists; `text_offset` is where each token's text starts, in characters from
    the start of the prompt."""
    top = [{names(t)[0]: lp for t, lp in pairs} for pairs in tops] if tops else None
    return {"tokens": [names(t)[0] for t in tokens], "token_logprobs": list(logprobs), "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(names: TokenText, tokens, logprobs, tops) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text, raw = names(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    content = [{**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in tops[i]] if tops else []}
               for i, (token, lp) in enumerate(zip(tokens, logprobs))]
    return {"content": content, "refusal": None}


# --- response builders ------------------------------------------------------------------------------------
class Reply:
    """Accumulates a job's updates into the route's response shape, or turns them into stream chunks."""

    object_name = chunk_object = ""

    def __init__(self, rid: str, model: str, names: TokenText, plan: Plan):
        self.rid, self.model, self.names, self.plan = rid, model, names, plan
        self.created = int(time.time())  # one timestamp for the response and all its chunks
        self.choices = [Choice() for _ in plan.rows]
        self.offsets = list(plan.prompt_chars)  # legacy text_offset of each row's next token

    def add(self, updates: list[RowUpdate]) -> None:
        for u in updates:
            c = self.choices[u.row]
            c.text += u.text
            c.tokens += u.tokens
            c.logprobs += u.logprobs
            c.top_logprobs += u.top_logprobs
            c.finish_reason = u.finish_reason or c.finish_reason

    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def usage_chunk(self) -> dict:
        return {**envelope(self.rid, self.chunk_object, self.model, self.created), "choices": [],
                "usage": usage(self.plan.prompt_tokens, self.completion_tokens())}

    def response(self) -> dict:
        choices = [self.choice(i, c) for i, c in enumerate(self.choices)]
        return {**envelope(self.rid, self.object_name, self.model, self.created), "choices": choices,
                "usage": usage(self.plan.prompt_tokens, self.completion_tokens())}

    def chunks(self, updates: list[RowUpdate]) -> list[dict]:
        self.add(updates)  # keeps the token counts for the usage chunk
        # a token whose text is held back (part of a character, maybe a stop string) has nothing to show
        # unless its logprobs were asked for
        shown = [u for u in updates if u.text or u.finish_reason or self.plan.logprobs is not None]
        return [{**envelope(self.rid, self.chunk_object, self.model, self.created),
                 "choices": [self.chunk_choice(u)]} for u in shown]

    def opening_chunks(self) -> list[dict]:
        return []

    def _logprobs(self, tokens, logprobs, tops, row: int):
        raise NotImplementedError

    def choice(self, index: int, c: Choice) -> dict:
        raise NotImplementedError

    def chunk_choice(self, u: RowUpdate) -> dict:
        raise NotImplementedError


class CompletionReply(Reply):
    object_name = chunk_object = "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        # text_offset: characters of each row's text so far, decoded as the text itself is (a character
        # split over tokens counts once, at the token that completes it)
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in self.plan.rows]

    def _logprobs(self, tokens, logprobs, tops, row: int):
        if self.plan.logprobs is None:
            return None
        offsets = []
        for t in tokens:
            offsets.append(self.offsets[row])
            self.offsets[row] += len(self.decoders[row].decode(self.names(t)[1]))
        return completion_logprobs(self.names, tokens, logprobs, tops if self.plan.logprobs else None, offsets)

    def choice(self, index: int, c: Choice) -> dict:
        return {"index": index, "text": c.text, "logprobs": self._logprobs(c.tokens, c.logprobs, c.top_logprobs,
                                                                            index),
                "finish_reason": c.finish_reason}

    def chunk_choice(self, u: RowUpdate) -> dict:
        return {"index": u.row, "text": u.text, "logprobs": self._logprobs(u.tokens, u.logprobs, u.top_logprobs,
                                                                            u.row),
                "finish_reason": u.finish_reason}


class ChatReply(Reply):
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    def _logprobs(self, tokens, logprobs, tops, row: int):
        if self.plan.logprobs is None:
            return None
        return chat_logprobs(self.names, tokens, logprobs, tops if self.plan.logprobs else None)

    def choice(self, index: int, c: Choice) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": self._logprobs(c.tokens, c.logprobs, c.top_logprobs, index),
                "finish_reason": c.finish_reason}

    def opening_chunks(self) -> list[dict]:
        return [{**envelope(self.rid, self.chunk_object, self.model, self.created),
                 "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]} for i in range(len(self.choices))]

    def chunk_choice(self, u: RowUpdate) -> dict:
        delta = {"content": u.text} if u.text or not u.finish_reason else {}
        return {"index": u.row, "delta": delta, "logprobs": self._logprobs(u.tokens, u.logprobs, u.top_logprobs,
                                                                            u.row),
                "finish_reason": u.finish_reason}
