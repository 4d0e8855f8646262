"""The application: assembles settings, the assistant (injected, or built on first use), the routers,
the middleware and the error handlers. Nothing here decides anything about a request."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import switchboard
from orchestrator.api.metrics import Metrics
from orchestrator.api.middleware import ApiKeyAuth, BodySizeLimit, RequestMetrics
from orchestrator.api.protocol import error_body
from orchestrator.api.router import STATIC_DIR, api, ops, page
from orchestrator.api.serving import AssistantProvider, ServingChat
from orchestrator.session import ConversationStore
from switchboard.artifacts import ArtifactStore
from switchboard.errors import SwitchboardError
from switchboard.settings import Settings, get_settings

log = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/healthz")


def is_open_path(path: str) -> bool:
    """Paths served without a key: the page (so a user can enter one) and the health check."""
    return path in OPEN_PATHS or path.startswith("/static/")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    parts = []
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON: {detail}".rstrip(": "))
        else:
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    first = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
    return "; ".join(parts) + more, ".".join(first) or None


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as {"error": {"message", "type", "param", "code"}}."""

    @app.exception_handler(SwitchboardError)
    async def switchboard_error(request: Request, exc: SwitchboardError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.code, getattr(exc, "param", None)),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(error_body(exc.status_code, str(exc.detail), codes.get(exc.status_code)),
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
    app.state.serving = ServingChat(provider, store, conversations, metrics)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(api)
    app.include_router(ops)
    app.include_router(page)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_error_handlers(app)
    # Added last = runs first: metrics see every request, keys are checked before the body is read.
    app.add_middleware(BodySizeLimit, max_bytes=s.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=s.api_keys, is_open=is_open_path)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
