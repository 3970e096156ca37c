"""The connection layer under the app: uvicorn's h11 protocol with the limits a server on a network needs.

uvicorn (0.54) times out idle kept-alive connections, but not a client that takes forever to send a
request's headers or body, nor one that stops reading its response; and it accepts connections until the
process runs out of file descriptors, after which asyncio logs every failed accept. Here, per connection:
- header_timeout: from connecting (or from the first byte of the next request on a kept-alive connection)
  until the request's headers are complete; then a 408 and the connection is closed.
- body_timeout: from the headers until the body is complete; then a 408 (if no answer has started) and
  the connection is closed; the handler sees a disconnect.
- write_timeout: how long a response may wait for a client that does not read it; then the connection is
  dropped (its generation is cancelled like any disconnect's).
- max_connections: a connection over the cap is answered 503 and closed at once, so the process stays
  below its open-file limit however many clients connect.
Every such event logs at most one line per LOG_EVERY seconds and kind, counting the ones held back.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gptforge.common import UserError

log = logging.getLogger("gptforge.serve")

LOG_EVERY = 10.0  # seconds between two log lines of one kind (refused connections, timeouts, ...)
MAX_DEFAULT_CONNECTIONS = 1024
MIN_BACKLOG, MAX_BACKLOG = 8, 2048  # connections waiting to be accepted (uvicorn's default is the maximum)
FD_MARGIN = 32  # descriptors kept free for what the server opens besides connections (logs, listeners)
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    body_timeout: float
    write_timeout: float
    max_connections: int


class RateLimit:
    """One log line per kind every `every` seconds; the next line that passes counts those held back."""

    def __init__(self, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = every, clock
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def suffix(self, kind: str) -> Optional[str]:
        """None: hold this line back; else what to append to it ("" when nothing was held back)."""
        now = self.clock()
        if kind in self.last and now - self.last[kind] < self.every:
            self.held[kind] = self.held.get(kind, 0) + 1
            return None
        self.last[kind] = now
        held = self.held.pop(kind, 0)
        return f" ({held} more like this since the last such line)" if held else ""

    def log(self, kind: str, message: str, level: int = logging.WARNING) -> None:
        suffix = self.suffix(kind)
        if suffix is not None:
            log.log(level, message + suffix)


class QuietRepeats(logging.Filter):
    """For uvicorn's logger: its one-line warnings about bad clients ("Invalid HTTP request received.")
    are rate-limited like ours, so a flood of garbage cannot flood the log."""

    def __init__(self, rate: RateLimit):
        super().__init__()
        self.rate = rate

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or record.exc_info:
            return True
        suffix = self.rate.suffix(f"uvicorn: {record.msg}")
        if suffix:
            record.msg = f"{record.msg}{suffix}"
        return suffix is not None


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, rate: RateLimit) -> None:
    """asyncio logs a traceback for every accept() that fails for want of descriptors (once a second while
    it lasts); the connection cap should prevent it, and if it happens anyway it is one line at a time."""
    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_FILES:
            rate.log("accept", f"cannot accept connections: {exc.strerror}; lower --max_connections or raise the "
                               "open-file limit (ulimit -n)")
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def connection_room(requested: Optional[int]) -> tuple[int, int]:
    """(max_connections, listen backlog) that keep the process below its open-file limit: max_connections
    as asked for (checked) or the most the limit allows (at most MAX_DEFAULT_CONNECTIONS).

    A connection may hold two descriptors (its socket, and a static file being sent). Under a flood,
    asyncio accepts `backlog` connections at a time, and closes those over the cap only two batches
    later: three backlogs of descriptors are kept free for that."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        unlimited = soft == resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):  # no such limit on this platform
        soft, unlimited = 0, True
    if unlimited:
        return requested or MAX_DEFAULT_CONNECTIONS, MAX_BACKLOG
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = FD_MARGIN
    free = soft - in_use - FD_MARGIN
    if requested is None:
        backlog = max(MIN_BACKLOG, min(MAX_BACKLOG, free // 8))
        room = min(MAX_DEFAULT_CONNECTIONS, (free - 3 * backlog) // 2)
        if room < 1:
            raise UserError(f"the open-file limit ({soft}, see `ulimit -n`) leaves no room for connections; "
                            "raise it")
        return room, backlog
    if 2 * requested + 3 * MIN_BACKLOG > free:
        raise UserError(f"--max_connections {requested} is more than the open-file limit ({soft}, see `ulimit -n`) "
                        f"leaves room for ({max(0, (free - 3 * MIN_BACKLOG) // 2)}); raise the limit or lower "
                        "--max_connections")
    return requested, max(MIN_BACKLOG, min(MAX_BACKLOG, (free - 2 * requested) // 3))


def protocol_class(limits: Limits, rate: RateLimit) -> type[H11Protocol]:
    """The protocol to give uvicorn (`http=`) for these limits."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits, "rate": rate})


def _response(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole response, written straight to the transport (the connection closes after it)."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "server_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus read and write timeouts and a connection cap (see the module's doc)."""

    limits: Limits
    rate: RateLimit

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._read_timer: Optional[asyncio.TimerHandle] = None
        self._waiting_for: Optional[str] = None  # "headers" or "body": what the read timer waits for
        self._write_timer: Optional[asyncio.TimerHandle] = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused, self.transport = True, transport
            transport.write(_response(503, "Service Unavailable", "the server has too many open connections; "
                                      "retry shortly", "too_many_connections"))
            transport.close()
            self.rate.log("refused", f"refused a connection: {len(self.connections)} are open, the most "
                                     "--max_connections allows")
            return
        super().connection_made(transport)
        # pause (and start the write timer) as soon as the kernel's buffer is full, not 64 KiB later: a
        # closing connection with bytes left in asyncio's buffer would wait for an absent reader for ever
        transport.set_write_buffer_limits(high=0)
        self._expect("headers")

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._expect(None)
        self._stop_write_timer()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._waiting_for is None and self.conn.their_state is h11.IDLE:
            self._expect("headers")  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next cycle, parsing what the client already sent of it
        if self._waiting_for is None and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._expect("headers")  # part of a next request is in: keep-alive idleness no longer applies
        self._follow_request()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.limits.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_write_timer()

    # --- timers ------------------------------------------------------------------------------------
    def _follow_request(self) -> None:
        """Point the read timer at what the client owes now: a body, or nothing (request complete)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._waiting_for != "body":
                self._expect("body")
        elif state is not h11.IDLE:
            self._expect(None)

    def _expect(self, what: Optional[str]) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self._waiting_for = what
        if what is not None:
            timeout = self.limits.header_timeout if what == "headers" else self.limits.body_timeout
            self._read_timer = self.loop.call_later(timeout, self._read_timed_out, what, timeout)

    def _read_timed_out(self, what: str, timeout: float) -> None:
        self._read_timer, self._waiting_for = None, None
        if self.transport.is_closing():
            return
        cycle = self.cycle if what == "body" else None
        if cycle is None or not cycle.response_started:
            self.transport.write(_response(408, "Request Timeout", f"the request's {what} did not arrive within "
                                           f"{timeout:g} s", "request_timeout"))
        if cycle is not None:  # the handler waiting for the body sees a disconnect; its answer goes nowhere
            cycle.disconnected = True
            cycle.message_event.set()
        self.rate.log(f"timeout {what}", f"closed a connection from {self._peer()}: the request's {what} did not "
                                         f"arrive within {timeout:g} s (--{'header' if what == 'headers' else what}"
                                         "_timeout)")
        self.transport.close()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self.rate.log("timeout write", f"dropped a connection from {self._peer()}: it left its response unread "
                                       f"for {self.limits.write_timeout:g} s (--write_timeout)")
        self.transport.abort()

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _peer(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"
