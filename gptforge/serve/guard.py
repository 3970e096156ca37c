"""Who may ask what, checked before any route runs (an ASGI middleware around the whole app).

- Host: on a loopback bind only requests addressed to localhost, 127.0.0.1 or [::1] (any port) are
  served, or to the names in --allowed_hosts; anything else is a 421. A web page cannot reach a local
  server by pointing its own domain name at 127.0.0.1 (DNS rebinding): the browser sends that name.
- API key: a keyed server wants it on every route except /health and the web app's own files (/ and
  /static/...), which hold no data and ask for the key themselves; 401 otherwise, before any body is read.
- Security headers on every response: a Content-Security-Policy that lets the web app load only its own
  files and talk only to this server, and no framing (clickjacking).
- HEAD is answered as GET without the body (uvicorn drops it), on every GET route.
The JSON routes also refuse bodies without a JSON content type (requests.read_json): a web page can POST
text/plain to any server without asking, but a JSON POST to another origin needs a CORS preflight, which
this server never grants.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Optional

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptforge.common import UserError
from gptforge.serve import ServeConfig
from gptforge.serve.replies import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def api_key(config: ServeConfig) -> Optional[str]:
    """The key the server wants: --api_key, else GPTFORGE_API_KEY, else none. An empty one is an error
    (it would silently mean no key at all)."""
    key, where = config.api_key, "--api_key"
    if key is None:
        key, where = os.environ.get("GPTFORGE_API_KEY"), "GPTFORGE_API_KEY"
    if key is None:
        return None
    if not key:
        raise UserError(f"{where} is empty; give a key, or leave it out to serve without one")
    if not all(32 <= ord(c) < 127 for c in key) or key != key.strip():
        raise UserError(f"{where} must be printable ASCII, without spaces at either end (it travels in an HTTP "
                        "header)")
    return key


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(config: ServeConfig) -> Optional[frozenset[str]]:
    """Host names requests may be addressed to; None: any."""
    if config.allowed_hosts is not None:
        names = {_allowed_name(n) for n in config.allowed_hosts.split(",") if n.strip()}
        if not names:
            raise UserError("--allowed_hosts is empty; give host names separated by commas, or * for any")
        return None if "*" in names else frozenset(names)
    if is_loopback(config.host):
        return frozenset({*LOOPBACK_NAMES, config.host.lower().strip("[]")})
    return None


def _allowed_name(entry: str) -> str:
    """An --allowed_hosts entry as host_name() will see it: a port is dropped, an IPv6 address unbracketed."""
    entry = entry.strip()
    name = host_name(f"[{entry}]" if entry.count(":") > 1 and not entry.startswith("[") else entry)
    if name is None:
        raise UserError(f"--allowed_hosts: {entry!r} is not a host name (give names like localhost or "
                        "example.com, separated by commas)")
    return name


def host_name(header: str) -> Optional[str]:
    """The name in a Host header without its port ('[::1]:8000' -> '::1'); None if it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = header.partition(":")
    if not name or (port and not port.isdigit()):
        return None
    return name.removesuffix(".")


def is_public(path: str) -> bool:
    return path in ("/", "/health") or path.startswith("/static/")


class Guard:
    def __init__(self, app: ASGIApp, api_key: Optional[str], hosts: Optional[frozenset[str]]):
        self.app, self.key, self.hosts = app, api_key, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        try:
            self._check(scope)
        except APIError as e:
            await JSONResponse(e.body(), status_code=e.status)(scope, receive, send_with_headers)
            return
        if scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}  # uvicorn's own copy stays HEAD: it sends no body
        await self.app(scope, receive, send_with_headers)

    def _check(self, scope: Scope) -> None:
        headers = Headers(scope=scope)
        if self.hosts is not None and host_name(headers.get("host", "")) not in self.hosts:
            raise APIError(421, "this server does not answer to that Host header; add the name to the "
                                "server's --allowed_hosts if it is yours", None, "invalid_host")
        if self.key is not None and not is_public(scope["path"]):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"),
                                                                     self.key.encode()):
                raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'", None,
                               "invalid_api_key")
