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

Every parameter of OpenAI's request is either honoured or refused with a 400 that names it
(:meth:`ChatCompletionRequest.refusal`); a parameter OpenAI does not have is refused as OpenAI does
("Unrecognized request argument supplied"). Text that is not valid Unicode (a lone surrogate such as
``"\\ud800"`` in the JSON) is refused with a 400 naming where it is.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator
from pydantic_core import PydanticCustomError

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
    include_usage: bool | None = Field(default=None, description=(
        "Send a last chunk (empty choices) with the turn's token usage before data: [DONE]."))
    include_obfuscation: bool | None = Field(default=None, description="Accepted; nothing is obfuscated.")


class ResponseFormat(_Model):
    type: str = Field(description='Only "text" is supported.')


#: What a parameter that is not honoured may be set to (anything else is a 400 naming it), and why not.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "logprobs": ((None, False), "log probabilities are not returned"),
    "top_logprobs": ((None, 0), "log probabilities are not returned"),
    "logit_bias": ((None, {}), "the core's tokens are not OpenAI's, so a bias by token id has no meaning here"),
    "functions": ((None, []), "client-side tools are not supported: the server runs its own experts"),
    "function_call": ((None, "none", "auto"), "client-side tools are not supported: the server runs its own experts"),
    "tool_choice": ((None, "none", "auto"), "client-side tools are not supported: the server runs its own experts"),
    "parallel_tool_calls": ((None, True, False), ""),
    "audio": ((None,), "the server answers in text"),
    "modalities": ((None, ["text"]), "the server answers in text"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "the core does not reason in a separate phase"),
    "verbosity": ((None,), "the answer's length is set by max_tokens"),
    "web_search_options": ((None,), "the server does not search the web"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
}


def _surrogate_at(value: Any, path: str) -> str | None:
    """The path of the first string in ``value`` that holds a lone surrogate (not valid Unicode)."""
    if isinstance(value, str):
        if value.isascii():  # most of a request (data URIs above all): no surrogate possible
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        name = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and _surrogate_at(key, "") is not None:
            return name.encode("utf-8", "backslashreplace").decode()
        found = _surrogate_at(item, name)
        if found is not None:
            return found
    return None


class ChatCompletionRequest(_Model):
    """``POST /v1/chat/completions``.

    Sampling: ``temperature``, ``top_p``, ``seed``, ``presence_penalty`` and ``frequency_penalty`` choose the
    tokens of the *answer text*; the plan (which experts, with which arguments) is always decoded greedily
    under the command grammar. Unset, the answer is greedy too (as ``temperature: 0``), so a reply is
    reproducible. ``stop`` ends the answer before the first of its strings (``finish_reason: "stop"``).
    Parameters the server cannot honour are refused with a 400 naming them (see ``UNSUPPORTED``).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default=MODEL_ID, description=f"Always {MODEL_ID!r} (see GET /v1/models).")
    messages: list[Message] = Field(min_length=1, description=(
        "The last message is the new user turn. With a conversation_id the server's history is used "
        "and earlier messages are ignored; without one they seed a new conversation."))
    stream: bool = False
    stream_options: StreamOptions | None = None
    conversation_id: str | None = Field(default=None, description=(
        "Continue this conversation (its history and artifacts). The response tells the id of a new one."))
    n: int | None = Field(default=None, ge=1, le=128, description="Only 1 is supported.")
    temperature: float | None = Field(default=None, ge=0, le=2, description=(
        "Sampling temperature of the answer text (0-2; unset or 0 = greedy)."))
    top_p: float | None = Field(default=None, ge=0, le=1, description=(
        "Nucleus sampling of the answer text (0-1; with temperature unset, sampling at temperature 1)."))
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description=(
        "The same seed, request and conversation give the same sampled answer."))
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = Field(default=None, description=(
        "Up to 4 strings; the answer ends before the first one found (finish_reason stop)."))
    max_tokens: int | None = Field(default=None, ge=1, description="Cap on the answer's tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as max_tokens.")
    response_format: ResponseFormat | None = Field(default=None, description='Only {"type": "text"}.')
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="Not supported: the experts are the server's tools.")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description='"none" or "auto" (no tools).')
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(default=None, description="Not supported.")
    function_call: str | dict[str, Any] | None = Field(default=None, description="Not supported.")
    logprobs: bool | None = Field(default=None, description="Not supported (false only).")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Not supported (0 only).")
    logit_bias: dict[str, float] | None = Field(default=None, description="Not supported (empty only).")
    modalities: list[str] | None = Field(default=None, description='Only ["text"].')
    audio: dict[str, Any] | None = Field(default=None, description="Not supported.")
    prediction: dict[str, Any] | None = Field(default=None, description="Not supported.")
    reasoning_effort: str | None = Field(default=None, description="Not supported.")
    verbosity: str | None = Field(default=None, description="Not supported.")
    web_search_options: dict[str, Any] | None = Field(default=None, description="Not supported.")
    service_tier: str | None = Field(default=None, description='"auto" or "default".')

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """JSON may spell a lone surrogate (``"\\ud800"``), which is no character: refuse it here,
        before it reaches a store or the tokenizer."""
        where = _surrogate_at(data, "")
        if where is not None:
            raise PydanticCustomError("invalid_unicode", "{message}", {"param": where, "message": (
                f"Invalid '{where}': the text is not valid Unicode (it holds a lone surrogate such as \\ud800).")})
        return data

    @model_validator(mode="after")
    def _honoured(self) -> Self:
        problem = self.refusal()
        if problem is not None:
            param, message = problem
            raise PydanticCustomError("unsupported_parameter", "{message}", {"param": param, "message": message})
        return self

    def refusal(self) -> tuple[str, str] | None:
        """The first parameter set to something the server does not do, and what to say; None: none."""
        for name, (allowed, why) in UNSUPPORTED.items():
            value = getattr(self, name)
            if not any(value == a and type(value) is type(a) for a in allowed):
                shown = json.dumps(value)[:60]
                return name, (f"Unsupported value: '{name}' does not support {shown} with this model"
                              + (f" ({why})." if why else "."))
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", (f"Unsupported value: 'response_format.type' does not support "
                                       f"{self.response_format.type[:40]!r} with this model (only 'text': the answer "
                                       "is free text).")
        if self.stream_options is not None and not self.stream:
            return "stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4:
            return "stop", f"Invalid 'stop': array too long. Expected an array with maximum length 4, but got {len(stops)}."
        return None

    def sampling(self) -> Any:
        """The request's ``orchestrator.core.sampling.Sampling`` (None: greedy, no stop strings)."""
        from orchestrator.core.sampling import Sampling

        stops = tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s)
        temperature = self.temperature if self.temperature is not None else (1.0 if self.top_p is not None else 0.0)
        options = Sampling(temperature=temperature, top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                           presence_penalty=self.presence_penalty or 0.0,
                           frequency_penalty=self.frequency_penalty or 0.0, stop=stops)
        return None if options == Sampling(seed=self.seed) else options


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


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens the core took from its KV cache instead of computing again


class Usage(BaseModel):
    """Tokens of the turn's core passes: the plan and, after calls, the answer (each pass's prompt counts)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, usage: Any) -> Usage:
        """From an ``orchestrator.core.loop.TurnUsage``."""
        prompt, completion = int(usage.prompt_tokens), int(usage.completion_tokens)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=int(usage.cached_tokens)))


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
    usage: Usage | None = None
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
    usage: Usage | None = None  # only on the last chunk (empty choices) with stream_options.include_usage
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
