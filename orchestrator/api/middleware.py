"""ASGI middleware: request ids, API keys, the body size limit, and request metrics.

They are plain ASGI classes (not ``BaseHTTPMiddleware``) so streamed responses pass through untouched,
and the key and size checks happen before any route reads the body.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api.metrics import OTHER, Metrics
from orchestrator.api.protocol import error_body

log = logging.getLogger(__name__)
BODILESS = {"GET", "HEAD", "OPTIONS", "DELETE"}
REQUEST_ID_HEADER = "x-request-id"
# a client's id is echoed only when it is short and plain (it goes into logs and a response header)
_SANE_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


class RequestId:
    """Every response carries ``X-Request-Id``: the client's own when it sent a sane one (at most 128
    plain characters), otherwise a new ``req_…``; also on responses the other middleware refuse (401,
    413), as it runs first. The id is in ``scope["state"]["request_id"]`` for the routes and logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def choose(given: bytes | None) -> str:
        if given is not None and _SANE_ID.fullmatch(given.strip()):
            return given.strip().decode("ascii")
        return f"req_{secrets.token_hex(16)}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self.choose(_header(scope, REQUEST_ID_HEADER.encode()))
        scope.setdefault("state", {})["request_id"] = request_id

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # answered here, inside Starlette's own 500 handler, so the id is on it
            if started:
                raise
            log.exception("unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"), request_id)
            await JSONResponse(error_body(500, f"internal error ({type(exc).__name__})", "internal_error"),
                               status_code=500)(scope, receive, send_with_id)


class ApiKeyAuth:
    """Every request needs ``Authorization: Bearer <key>`` with one of ``keys``, except ``is_open``
    paths (the page and its files, the health check). No keys configured = open."""

    def __init__(self, app: ASGIApp, keys: list[str], is_open: Callable[[str], bool]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]
        self.is_open = is_open

    def check(self, header: bytes | None) -> str | None:
        """None when the key is valid, else what is wrong."""
        missing = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                   "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        if header is None:
            return missing
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "Malformed Authorization header. " + missing
        token = token.strip()
        ok = False
        for key in self.keys:  # compare with every key, in constant time each
            ok |= hmac.compare_digest(token, key)
        return None if ok else "Incorrect API key provided. The server's keys are set by SWITCHBOARD_API_KEYS."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        problem = self.check(_header(scope, b"authorization"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(error_body(401, problem, "invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="switchboard"'})
        await response(scope, receive, send)


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or while reading.

    The body is read here (at most ``max_bytes``) and handed on whole, so a route never sees half of
    an oversized request.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str,
                      code: str) -> None:
        await JSONResponse(error_body(status, message, code), status_code=status,
                           headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODILESS:
            await self.app(scope, receive, send)
            return
        too_large = f"the request body is larger than the limit of {self.max_bytes} bytes"
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await self._refuse(scope, receive, send, 400, "invalid Content-Length header", "invalid_request")
                return
            if declared > self.max_bytes:
                await self._refuse(scope, receive, send, 413, too_large, "request_too_large")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, too_large, "request_too_large")
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then wait for the disconnect, as the server would

        await self.app(scope, replay, send)


class RequestMetrics:
    """Counts requests by method, route template and status, and times them. A request refused before
    routing (401, 413 from the middleware) is labelled with the route its path would have reached
    (``route_of``), not "other"."""

    def __init__(self, app: ASGIApp, metrics: Metrics,
                 route_of: Callable[[Scope], str | None] | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None and self.route_of is not None:
                try:
                    route = self.route_of(scope)
                except Exception:  # a label must never fail a request
                    route = None
            route = route or OTHER
            method = scope["method"] if scope["method"] in ("GET", "POST", "HEAD", "OPTIONS") else OTHER
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.request_seconds.labels(method, route).observe(time.perf_counter() - start)
