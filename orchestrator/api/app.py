"""The application: assembles settings, the assistant (injected, or built on first use), the routers,
the middleware and the error handlers. Nothing here decides anything about a request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import Scope

import switchboard
from orchestrator.api.metrics import Metrics
from orchestrator.api.middleware import (
    REQUEST_ID_HEADER,
    ApiKeyAuth,
    BodySizeLimit,
    RequestId,
    RequestMetrics,
)
from orchestrator.api.protocol import CONVERSATION_HEADER, error_body
from orchestrator.api.router import STATIC_DIR, api, ops, page
from orchestrator.api.serving import AssistantProvider, ServingChat
from orchestrator.api.validation import describe
from orchestrator.session import ConversationStore
from switchboard.artifacts import ArtifactStore
from switchboard.errors import SwitchboardError
from switchboard.settings import Settings, get_settings

log = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/healthz")


def is_open_path(path: str) -> bool:
    """Paths served without a key: the page (so a user can enter one) and the health check."""
    return path in OPEN_PATHS or path.startswith("/static/")


def _templates(routes: list[Any], prefix: str = "") -> list[tuple[Any, str, set[str] | None]]:
    """(path regex, route template, methods) of every route, routers included (FastAPI 0.165 keeps an
    included router as one entry whose own routes hold the templates)."""
    out: list[tuple[Any, str, set[str] | None]] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            out += _templates(list(inner.routes), prefix + (getattr(context, "prefix", "") or ""))
        elif getattr(route, "path", None) is not None and getattr(route, "path_regex", None) is not None:
            regex = route.path_regex if not prefix else compile_path(prefix + route.path)[0]
            out.append((regex, prefix + route.path, getattr(route, "methods", None)))
    return out


def route_of(app: FastAPI) -> Any:
    """The route template a request's path would reach, for labelling requests refused before routing."""
    table: list[tuple[Any, str, set[str] | None]] = []

    def find(scope: Scope) -> str | None:
        if not table:  # built on first use, when every route is in place
            table.extend(_templates(list(app.router.routes)))
        path, method = scope.get("path", ""), scope.get("method", "")
        found = [(template, methods) for regex, template, methods in table if regex.match(path)]
        for template, methods in found:  # the route of this method, else the path's (405)
            if methods is None or method in methods:
                return template
        return found[0][0] if found else None

    return find


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as {"error": {"message", "type", "param", "code"}}."""

    @app.exception_handler(SwitchboardError)
    async def switchboard_error(request: Request, exc: SwitchboardError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.code, getattr(exc, "param", None)),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = describe(list(exc.errors()))
        return JSONResponse(error_body(400, message, code, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # no such route: OpenAI's words
            message = f"Invalid URL ({request.method} {request.url.path[:200]})"
        elif exc.status_code == 405:
            message = f"Invalid method for URL ({request.method} {request.url.path[:200]})"
        return JSONResponse(error_body(exc.status_code, message, codes.get(exc.status_code)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__})", "internal_error"),
                            status_code=500)


def create_app(settings: Settings | None = None, *, assistant: Any = None, preload: bool = False) -> FastAPI:
    """The API and the web page.

    ``assistant``: an ``orchestrator.core.loop.Assistant`` to serve (tests inject one with a stand-in
    core); by default the one ``build_assistant(settings)`` makes — the shipped core, every registered
    expert, in-process or Celery dispatch — built on the first request, or at start with ``preload``.
    """
    s = settings or get_settings()
    if assistant is not None:
        registry, store, conversations = assistant.registry, assistant.store, assistant.conversations
    else:
        from switchboard.registry import get_registry

        registry = get_registry()
        store, conversations = ArtifactStore.from_settings(s), ConversationStore.from_settings(s)

    def build() -> Any:
        from orchestrator.runtime import build_assistant

        return build_assistant(s, registry=registry)

    provider = AssistantProvider(build, assistant)
    metrics = Metrics()
    metrics.know_experts(registry.names)
    if s.broker_url:
        metrics.watch_queues(s, lambda: sorted(
            {registry.get_class(n).queue_name() for n in registry.names()}))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if preload:
            provider.preload()
        yield
        provider.close()

    app = FastAPI(title="Switchboard", version=switchboard.__version__, lifespan=lifespan,
                  description="OpenAI-compatible chat with a tool-routing multimodal assistant.",
                  docs_url=None, redoc_url=None, openapi_url=None)  # the docs UIs need a CDN
    app.state.settings = s
    app.state.metrics = metrics
    app.state.serving = ServingChat(provider, store, conversations, metrics, max_images=s.max_images_per_request)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(api)
    app.include_router(ops)
    app.include_router(page)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app)
    # Added last = runs first: every response has a request id, metrics see every request, a browser's
    # CORS preflight is answered before the key is asked for, keys are checked before the body is read.
    app.add_middleware(BodySizeLimit, max_bytes=s.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=s.api_keys, is_open=is_open_path)
    if s.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=s.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", CONVERSATION_HEADER, REQUEST_ID_HEADER],
                           expose_headers=[CONVERSATION_HEADER, REQUEST_ID_HEADER], max_age=600)
    app.add_middleware(RequestMetrics, metrics=metrics, route_of=route_of(app))
    app.add_middleware(RequestId)
    return app
