"""Request and response models of the HTTP API, shaped exactly like OpenAI's chat.completions.

Switchboard's additions are extra fields that OpenAI clients ignore (and keep, as their models allow
extra fields):

- request: ``conversation_id`` — continue a conversation (or send the ``X-Conversation-Id`` header);
- response and every chunk: ``conversation_id``;
- assistant message: ``artifacts`` (what the expert calls made, with URLs); each ``tool_calls`` entry
  also carries the call's ``status`` and its ``summary`` or ``error`` — the calls were already run by
  the server, the client has nothing to execute;
- stream chunks: ``event`` — a stage of the turn (planning, executing, answering, done), a stage of
  one call (queued, started, progress, done, failed), or a piece of the core's plan text.

Errors are always ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from orchestrator.events import CallEvent, CallRecord, StageEvent, TextEvent

MODEL_ID = "switchboard"
CONVERSATION_HEADER = "X-Conversation-Id"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    """Response models: ``None`` fields listed in ``_omit_none`` are left out of the JSON."""

    _omit_none: frozenset[str] = frozenset()

    # No return annotation: with one, pydantic would document the serialised schema as a bare dict.
    @model_serializer(mode="wrap")
    def _drop_nones(self, handler: Any):  # noqa: ANN202
        data = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self._omit_none)}


# -- request ------------------------------------------------------------------------------------

class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str = Field(description="A data: URI (data:image/png;base64,…) or the URL of one of this "
                     "conversation's artifacts (…/v1/artifacts/{id}). Remote URLs are not fetched.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


UserPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(_Model):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class ToolCallFunction(_Model):
    name: str
    arguments: str


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class ToolMessage(_Model):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class StreamOptions(_Model):
    include_usage: bool | None = None


class ChatCompletionRequest(_Model):
    """``POST /v1/chat/completions``. Sampling parameters are accepted and ignored: the core decodes
    greedily under the command grammar, so a reply is reproducible."""

    model: str = Field(default=MODEL_ID, description=f"Always {MODEL_ID!r} (see GET /v1/models).")
    messages: list[Message] = Field(min_length=1, description=(
        "The last message is the new user turn. With a conversation_id the server's history is used "
        "and earlier messages are ignored; without one they seed a new conversation."))
    stream: bool = False
    stream_options: StreamOptions | None = None
    conversation_id: str | None = Field(default=None, description=(
        "Continue this conversation (its history and artifacts). The response tells the id of a new one."))
    n: int | None = Field(default=None, description="Only 1 is supported.")
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="Not supported: the experts are the server's tools.")
    tool_choice: str | dict[str, Any] | None = None


# -- response -----------------------------------------------------------------------------------

class Artifact(_Response):
    """Something an expert call made: an image, overlay, mask, boxes (JSON) …"""

    id: str
    kind: str
    role: str = ""
    call_id: str | None = None
    url: str
    media_type: str | None = None
    width: int | None = None
    height: int | None = None

    _omit_none = frozenset({"media_type", "width", "height"})


class ExecutedToolCall(_Response):
    """An OpenAI ``tool_calls`` entry for a call the server ran, with how it went."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction
    status: Literal["done", "failed", "skipped", "invalid"]
    summary: str | None = None
    error: str | None = None
    artifacts: list[str] = Field(default_factory=list, description="Ids of the artifacts it made.")

    _omit_none = frozenset({"summary", "error"})

    @classmethod
    def from_record(cls, record: CallRecord, **extra: Any) -> Self:
        """The API's view of a call's record (``extra``: fields of a subclass, e.g. a delta's index)."""
        tc = record.tool_call or {"id": record.call_id,
                                  "function": {"name": record.expert, "arguments": json.dumps(record.args)}}
        return cls(id=tc["id"], function=ToolCallFunction(**tc["function"]), status=record.status,
                   summary=record.summary, error=record.error, artifacts=[a["id"] for a in record.artifacts],
                   **extra)


class ResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ExecutedToolCall] | None = None
    artifacts: list[Artifact] = Field(default_factory=list)

    _omit_none = frozenset({"tool_calls"})


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] = "stop"
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = MODEL_ID
    choices: list[Choice]
    usage: None = None
    system_fingerprint: str | None = None
    conversation_id: str
    trimmed_messages: int | None = Field(default=None, description=(
        "How many older messages were left out of the core's prompt to fit its length limit (absent: none)."))


# -- streaming ----------------------------------------------------------------------------------

# The events are the turn's own (orchestrator.events): a stage of the turn, a stage of one call, or a
# piece of the core's plan text (pieces of the answer arrive as content deltas, not as events).
StreamEvent = Annotated[StageEvent | CallEvent | TextEvent, Field(discriminator="type")]


class ToolCallDelta(ExecutedToolCall):
    index: int


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    artifacts: list[Artifact] | None = None

    _omit_none = frozenset({"role", "content", "tool_calls", "artifacts"})


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta = Field(default_factory=Delta)
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    """One ``data:`` frame of a streamed completion (the stream ends with ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str = MODEL_ID
    choices: list[ChunkChoice] = Field(default_factory=lambda: [ChunkChoice()])
    conversation_id: str
    event: StreamEvent | None = None
    usage: None = None
    trimmed_messages: int | None = None  # on the last chunk, when older messages were left out of the prompt

    _omit_none = frozenset({"event", "usage", "trimmed_messages"})


# -- models, health, errors -----------------------------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "switchboard"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    assistant: Literal["loaded", "not loaded", "failed"]
    detail: str | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorInfo


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The JSON of an error response; ``type`` follows OpenAI's use of it."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code)).model_dump()
