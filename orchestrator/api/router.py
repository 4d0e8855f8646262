"""HTTP routes: thin glue between FastAPI and ``ServingChat`` (the logic lives in serving.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.api.deps import ConversationHeader, JsonBody, MetricsDep, OwnerDep, ServingDep, bearer
from orchestrator.api.protocol import (
    CONVERSATION_HEADER,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page loads nothing from elsewhere; artifacts are fetched with the key and shown as blob: URLs.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; "
            "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in (401, *codes)}


api = APIRouter(prefix="/v1", dependencies=[Security(bearer)], tags=["openai"])
ops = APIRouter(tags=["operations"])
page = APIRouter(include_in_schema=False)


@api.post(
    "/chat/completions", response_model=ChatCompletionResponse,
    responses={200: {"description": "A chat.completion, or with stream: true an SSE stream of "
                     "chat.completion.chunk frames ending with data: [DONE]",
                     "content": {"text/event-stream": {"schema": {
                         "type": "string", "description": "data: <ChatCompletionChunk JSON> frames"}}}},
               **_errors(400, 404, 413, 415, 503)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, serving: ServingDep,
                                 _json: JsonBody, owner: OwnerDep, conversation: ConversationHeader = None) -> Response:
    """One user turn: plan, run the expert calls, answer. ``stream: true`` sends the stages as they happen.
    A conversation belongs to the API key that started it; another key gets 404."""
    turn = await run_in_threadpool(serving.prepare, body, conversation, owner)
    base_url = str(request.base_url).rstrip("/")
    headers = {CONVERSATION_HEADER: turn.conversation_id}
    if body.stream:
        return StreamingResponse(serving.stream(turn, base_url), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await serving.complete_while_connected(turn, base_url, request.is_disconnected)
    return JSONResponse(result.model_dump(mode="json"), headers=headers)


@api.get("/models", response_model=ModelList, responses=_errors())
async def list_models(serving: ServingDep) -> ModelList:
    return serving.models()


@api.get("/models/{model_id}", response_model=ModelCard, responses=_errors(404))
async def retrieve_model(model_id: str, serving: ServingDep) -> ModelCard:
    return serving.model(model_id)


@api.get("/artifacts/{artifact_id}", response_class=FileResponse, responses={
    200: {"description": "The artifact's bytes, with its media type (image/png, application/json …)",
          "content": {"image/png": {}, "application/json": {}}}, **_errors(404)})
async def get_artifact(artifact_id: str, serving: ServingDep, owner: OwnerDep) -> FileResponse:
    """An artifact by id (content-addressed, so it never changes), if this API key uploaded it or one of
    its conversations made it; any other id is 404."""
    path, meta = serving.artifact(artifact_id, owner)
    return FileResponse(path, media_type=meta.media_type, headers={
        "Cache-Control": "private, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff",
        "Content-Disposition": f'inline; filename="{meta.id}"'})


@ops.get("/healthz", response_model=Health)
async def healthz(serving: ServingDep) -> Health:
    """Liveness (no key needed); ``assistant`` says whether the core is loaded yet."""
    provider = serving.provider
    if provider.loaded:
        return Health(assistant="loaded")
    return Health(assistant="failed", detail=provider.error) if provider.error else Health(assistant="not loaded")


@ops.get("/metrics", dependencies=[Security(bearer)], response_class=Response,
         responses={200: {"content": {"text/plain": {}}}, **_errors()})
async def metrics(m: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)


@page.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                            "Cache-Control": "no-cache"})
