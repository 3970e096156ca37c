"""What the server answers, in OpenAI's JSON shapes: responses, stream chunks, logprobs, and error bodies.

A Reply gathers one job's updates (worker.RowUpdate, one per row and step) into the route's response,
or turns each step into stream chunks; requests.Plan says what it is answering (rows, logprobs, prompt
size). Errors are APIError, answered as {"error": {"message", "type", "param", "code"}} with its status.
"""

from __future__ import annotations

import codecs
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from gptforge.serve.worker import RowUpdate

if TYPE_CHECKING:
    from gptforge.serve.requests import Plan


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


# --- responses ------------------------------------------------------------------------------------------
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
        self.extension: Optional[dict] = None  # gptforge's own fields (a request extension's outcome)

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
        body = {**envelope(self.rid, self.object_name, self.model, self.created), "choices": choices,
                "usage": usage(self.plan.prompt_tokens, self.completion_tokens())}
        if self.extension is not None:
            body["gptforge"] = self.extension  # OpenAI's clients keep unknown fields (model_extra)
        return body

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
