"""The logic behind the routes: requests in the OpenAI shape → turns of the assistant → responses.

A turn is prepared before anything is sent (``ServingChat.prepare``): the model name, the
conversation, the user's text and images (data URIs are checked and stored; artifact URLs must belong
to this conversation) — so every error about the request is an HTTP status, also for ``stream: true``.
Only failures inside the turn itself arrive in the stream, as an ``{"error": …}`` frame.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from orchestrator.api.metrics import Metrics
from orchestrator.api.protocol import (
    MODEL_ID,
    Artifact,
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ExecutedToolCall,
    ImagePart,
    ModelCard,
    ModelList,
    ResponseMessage,
    SystemMessage,
    TextPart,
    ToolCallDelta,
    ToolMessage,
    Usage,
    UserMessage,
    error_body,
)
from orchestrator.core import loop
from orchestrator.core.format import neutralise
from orchestrator.events import CallEvent, StageEvent, TextEvent, pump
from orchestrator.session import DEFAULT_OWNER, Conversation, ConversationStore
from switchboard.artifacts import IMAGE_KINDS, ArtifactMeta, ArtifactStore, is_artifact_id
from switchboard.errors import ArtifactNotFound, ImageRejected, ImageTooLarge, SwitchboardError
from switchboard.memory import trim_heap

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a non-streamed turn checks that its client is still there
MAX_TEXT_CHARS = 16_000  # per message; the core's context is far shorter anyway
MAX_IMAGES_PER_MESSAGE = 8
MAX_IMAGES_PER_REQUEST = 16  # default of SWITCHBOARD_MAX_IMAGES_PER_REQUEST
# stands in for an image's id while deciding which history messages the core reads (same length)
_PLACEHOLDER_IMAGE = "image-" + "0" * 24


class BadRequest(SwitchboardError):
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(SwitchboardError):
    code = "model_not_found"
    status = 404


class CoreUnavailable(SwitchboardError):
    code = "assistant_unavailable"
    status = 503


# -- the assistant, built on first use ----------------------------------------------------------

class AssistantProvider:
    """Holds the assistant: an injected one, or the one ``build`` makes on first use (thread-safe).

    Loading the core takes seconds, so the server starts at once and the first request (or
    ``preload``) pays for it. A failed build is reported as 503 and retried on the next request.
    """

    def __init__(self, build: Callable[[], loop.Assistant], assistant: loop.Assistant | None = None) -> None:
        self._build = build
        self._assistant = assistant
        self._owned = assistant is None
        self._lock = threading.Lock()
        self.error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._assistant is not None

    def get(self) -> loop.Assistant:
        if self._assistant is not None:
            return self._assistant
        with self._lock:
            if self._assistant is None:
                try:
                    self._assistant = self._build()
                    self.error = None
                except Exception as e:
                    self.error = f"{type(e).__name__}: {e}"
                    log.exception("the assistant could not be built")
                    raise CoreUnavailable(f"the assistant could not be started: {self.error}") from e
        return self._assistant

    def preload(self) -> None:
        """Build the assistant in the background now, so the first request does not wait as long."""

        def work() -> None:
            try:
                self.get()
            except CoreUnavailable:
                pass  # logged; reported by /healthz and retried on the next request

        threading.Thread(target=work, daemon=True, name="assistant-preload").start()

    def close(self) -> None:
        if self._owned and self._assistant is not None:
            self._assistant.dispatcher.close()


# -- a prepared turn ----------------------------------------------------------------------------

@dataclass
class Turn:
    """A checked request: what ``Assistant.run`` needs."""

    conversation_id: str
    text: str
    images: list[str] = field(default_factory=list)
    max_tokens: int | None = None  # the answer's cap (finish_reason "length" when reached)
    owner: str = DEFAULT_OWNER  # the tenant (API key) whose turn it is: what it makes is theirs
    left_out: int = 0  # history messages of the request the core will not read (not imported)
    sampling: Any = None  # the answer's orchestrator.core.sampling.Sampling (None: greedy, no stop strings)
    include_usage: bool = False  # stream a last chunk with the usage (stream_options.include_usage)


class _KeyedLocks:
    """One lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
            with self._guard:
                users = self._locks[key][1] - 1
                if users:
                    self._locks[key] = (lock, users)
                else:
                    del self._locks[key]


class _Trimmed:
    """Streams text as ``str.strip()`` would leave it: leading whitespace dropped, trailing held back."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        kept = text.rstrip()
        self.held = text[len(kept):]
        return kept


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _alt(text: str) -> str:
    """Text safe inside markdown link brackets."""
    return " ".join(text.replace("[", "(").replace("]", ")").split())


class ServingChat:
    """``/v1/chat/completions``, ``/v1/models`` and ``/v1/artifacts``."""

    def __init__(self, provider: AssistantProvider, store: ArtifactStore, conversations: ConversationStore,
                 metrics: Metrics, *, max_images: int = MAX_IMAGES_PER_REQUEST) -> None:
        self.provider = provider
        self.store = store
        self.conversations = conversations
        self.metrics = metrics
        self.max_images = max_images
        self.started = int(time.time())
        # Turns of one conversation run one after the other: each reads the history and saves it
        # whole, so two at once would lose one of them.
        self._conversation_locks = _KeyedLocks()

    # -- models & artifacts ---------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=MODEL_ID, created=self.started)])

    def model(self, model_id: str) -> ModelCard:
        if model_id != MODEL_ID:
            raise ModelNotFound(f"the model {model_id!r} does not exist; this server serves {MODEL_ID!r}")
        return ModelCard(id=MODEL_ID, created=self.started)

    def artifact(self, artifact_id: str, owner: str = DEFAULT_OWNER) -> tuple[Path, ArtifactMeta]:
        """The file and metadata of an artifact ``owner`` may read; an id that is not one, or another
        owner's artifact, is simply not found (ids are content hashes: existence must not leak)."""
        if not is_artifact_id(artifact_id) or not self.store.owned_by(artifact_id, owner):
            raise ArtifactNotFound(f"no artifact {artifact_id[:80]!r}")
        meta = self.store.get(artifact_id)
        return self.store.path(artifact_id), meta

    # -- preparing a turn -----------------------------------------------------------------------
    def prepare(self, req: ChatCompletionRequest, header_conversation_id: str | None = None,
                owner: str = DEFAULT_OWNER) -> Turn:
        """Check the request and store its images. Raises SwitchboardError subclasses (4xx, 503).

        A conversation is only ``owner``'s own (another key's is not found). Of a stateless client's
        history only the messages the core will read are imported (``Assistant.read_window``), so
        images in older messages are never stored; a request carries at most ``max_images`` images.
        """
        if req.model != MODEL_ID:
            raise ModelNotFound(f"the model {req.model!r} does not exist; this server serves {MODEL_ID!r}")
        if req.n not in (None, 1):
            raise BadRequest("n must be 1: a turn has one answer", "n")
        if req.tools:
            raise BadRequest("client-side tools are not supported: the server runs its own experts and "
                             "reports them as tool_calls", "tools")
        conv_id = req.conversation_id
        if header_conversation_id and conv_id and header_conversation_id != conv_id:
            raise BadRequest("the conversation_id field and the X-Conversation-Id header differ", "conversation_id")
        conv_id = conv_id or header_conversation_id
        conv = self.conversations.get_owned(conv_id, owner) if conv_id else None

        last_index = len(req.messages) - 1
        last = req.messages[last_index]
        if not isinstance(last, UserMessage):
            raise BadRequest(f"the last message must be the user's new turn (role 'user'), not {last.role!r}",
                             f"messages.{last_index}")
        carried = sum(isinstance(p, ImagePart) for m in req.messages if isinstance(m, UserMessage)
                      and not isinstance(m.content, str) for p in m.content)
        if carried > self.max_images:
            raise BadRequest(f"the request carries {carried} images; at most {self.max_images} images per request "
                             "(older messages' images are not needed: the assistant keeps the conversation)",
                             "messages")
        known = set(conv.artifacts) if conv else set()
        history: list[dict[str, Any]] = []
        left_out = 0
        if conv is None:  # a stateless client sends the history: it seeds the new conversation
            window, left_out = self._read_window(req.messages, last_index)
            for i in window:
                entry = self._history_entry(req.messages[i], i, known, owner)
                if entry is not None:
                    history.append(entry)
                    known.update(entry.get("images", []))
        text, images = self._user_turn(last, last_index, known, owner)
        if not text.strip() and not images:
            raise BadRequest("the last user message is empty: send text, an image, or both",
                             f"messages.{last_index}.content")

        cap = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if cap is not None and cap < 1:
            raise BadRequest("max_tokens must be at least 1", "max_tokens")
        assistant = self.provider.get()  # 503 now rather than in the middle of a stream
        check = getattr(assistant, "check_message", None)
        if check is not None:  # a message the core cannot read at all is refused before anything is stored
            check(text, images)
        sampling = req.sampling()
        if sampling is not None and sampling.changes_tokens and not getattr(assistant, "samples", False):
            param = next((name for name, value in (("temperature", req.temperature), ("top_p", req.top_p),
                                                   ("presence_penalty", req.presence_penalty),
                                                   ("frequency_penalty", req.frequency_penalty)) if value),
                         "top_p")
            raise BadRequest(f"Unsupported parameter: '{param}' is not supported by this server's core, which "
                             "decodes greedily.", param)
        if conv is None:
            conv = self._new_conversation(history, owner)
        return Turn(conversation_id=conv.id, text=text, images=images, max_tokens=cap, owner=owner,
                    left_out=left_out, sampling=sampling,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage))

    def _read_window(self, messages: list[Any], last_index: int) -> tuple[list[int], int]:
        """Indices of the history messages the core will read (checked, but nothing stored yet), and
        how many it will not."""
        drafts: list[tuple[int, dict[str, Any]]] = []
        for i, msg in enumerate(messages[:last_index]):
            entry = self._history_entry(msg, i, set(), DEFAULT_OWNER, store=False)
            if entry is not None:
                drafts.append((i, entry))
        read = getattr(self.provider.get(), "read_window", None)
        if not drafts or read is None:
            return [i for i, _ in drafts], 0
        last = self._history_entry(messages[last_index], last_index, set(), DEFAULT_OWNER, store=False)
        kept = max(0, read([e for _, e in drafts] + [last]) - 1)
        return ([i for i, _ in drafts[len(drafts) - kept:]] if kept else []), len(drafts) - kept

    def _new_conversation(self, history: list[dict[str, Any]], owner: str) -> Conversation:
        conv = self.conversations.create(owner)
        if history:
            for msg in history:
                for image_id in msg.get("images", []):
                    conv.add_artifact(image_id, self.store.get(image_id).kind)
            conv.messages.extend(history)
            self.conversations.save(conv)
        return conv

    def _history_entry(self, msg: Any, index: int, known: set[str], owner: str,
                       store: bool = True) -> dict[str, Any] | None:
        if isinstance(msg, SystemMessage):
            return None  # the shipped core was trained without a system turn; instructions go to users
        if isinstance(msg, ToolMessage):
            raise BadRequest("tool messages are not accepted: the server runs the experts itself and "
                             "keeps their results in the conversation", f"messages.{index}")
        if isinstance(msg, UserMessage):
            text, images = self._user_turn(msg, index, known, owner, store)
            return {"role": "user", "content": text, "images": images}
        assert isinstance(msg, AssistantMessage)
        # the client wrote this text, not the core: command tags in it are data too (format.neutralise)
        text = neutralise(self._text(msg.content, index), commands=True)
        return {"role": "assistant", "content": text} if text else None

    def _text(self, content: str | list[TextPart] | None, index: int) -> str:
        if content is None:
            return ""
        text = content if isinstance(content, str) else "\n".join(p.text for p in content)
        if len(text) > MAX_TEXT_CHARS:
            raise BadRequest(f"message {index} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}",
                             f"messages.{index}.content")
        return text

    def _user_turn(self, msg: UserMessage, index: int, known: set[str], owner: str,
                   store: bool = True) -> tuple[str, list[str]]:
        """The text and image ids of a user message; ``store=False``: placeholders, nothing stored."""
        if isinstance(msg.content, str):
            return self._text(msg.content, index), []
        texts: list[TextPart] = []
        images: list[str] = []
        for j, part in enumerate(msg.content):
            if isinstance(part, TextPart):
                texts.append(part)
                continue
            assert isinstance(part, ImagePart)
            if len(images) == MAX_IMAGES_PER_MESSAGE:
                raise BadRequest(f"at most {MAX_IMAGES_PER_MESSAGE} images per message", f"messages.{index}.content")
            if not store:
                images.append(_PLACEHOLDER_IMAGE)
                continue
            param = f"messages.{index}.content.{j}.image_url.url"
            try:
                image_id = self._image(part.image_url.url, known, owner)
            except SwitchboardError as e:  # say which image was wrong
                e.param = getattr(e, "param", None) or param  # type: ignore[attr-defined]
                raise
            if image_id not in images:
                images.append(image_id)
        return self._text(texts, index), images

    def _image(self, url: str, known: set[str], owner: str) -> str:
        """The artifact id of an ``image_url``: a data URI is checked and stored (and is ``owner``'s);
        an artifact URL must name an image of this conversation."""
        if url[:5].lower() == "data:":
            image_id = self.store.import_image(_decode_data_uri(url, self.store.max_image_bytes)).id
            self.store.claim(image_id, owner)
            return image_id
        parts = urlsplit(url)
        if parts.scheme not in ("", "http", "https"):
            raise BadRequest(f"unsupported image URL scheme {parts.scheme!r}: send a data: URI or the URL of "
                             "an artifact of this conversation (/v1/artifacts/{id})")
        head, _, artifact_id = unquote(parts.path).rpartition("/")
        if not head.endswith("/v1/artifacts") or not is_artifact_id(artifact_id):
            raise BadRequest("remote image URLs are not fetched: send a data: URI (data:image/png;base64,…) or "
                             "the URL of an artifact of this conversation (/v1/artifacts/{id})")
        if artifact_id not in known:
            raise ArtifactNotFound(f"artifact {artifact_id} is not part of this conversation")
        kind = self.store.get(artifact_id).kind
        if kind not in IMAGE_KINDS:
            raise BadRequest(f"artifact {artifact_id} is {kind!r}, not an image")
        return artifact_id

    # -- running a turn -------------------------------------------------------------------------
    def _run(self, turn: Turn, on_event: Callable[[Any], None],
             should_stop: Callable[[], bool] | None = None) -> loop.ChatResult:
        assistant = self.provider.get()
        timer = self.metrics.call_timer()

        def sink(event: Any) -> None:
            timer(event)
            if isinstance(event, loop.ChatResult):  # the owner may read them before the client sees them
                for a in event.artifacts:
                    self.store.claim(a["id"], turn.owner)
            on_event(event)

        with self._conversation_locks.hold(turn.conversation_id), self.metrics.turn():
            extra: dict[str, Any] = {}
            if turn.max_tokens is not None:
                extra["max_tokens"] = turn.max_tokens
            if should_stop is not None:
                extra["should_stop"] = should_stop
            if turn.sampling is not None:
                extra["sampling"] = turn.sampling
            result = assistant.run(turn.text, images=turn.images, conversation_id=turn.conversation_id,
                                   on_event=sink, **extra)
        trim_heap()  # what the turn freed goes back to the system: RSS does not creep up turn after turn
        self.metrics.count_calls(result.calls)
        self.metrics.observe_core(getattr(result, "usage", None))
        return result

    def _events(self, turn: Turn, stop: threading.Event | None = None) -> Iterator[Any]:
        """The turn's events as they happen (the last is the ChatResult). The turn runs in its own
        thread; setting ``stop`` (the client went away) ends its decoding at the next step and starts
        no further calls; what it did is still saved."""
        should_stop = stop.is_set if stop is not None else None
        return pump(lambda emit: self._run(turn, emit, should_stop), name=f"turn-{turn.conversation_id}")

    def complete(self, turn: Turn, base_url: str,
                 should_stop: Callable[[], bool] | None = None) -> ChatCompletionResponse:
        """Run the turn to the end and return the whole completion (``should_stop``: as for a stream)."""
        result = self._run(turn, lambda event: None, should_stop)
        artifacts = self._artifacts(result, base_url)
        message = ResponseMessage(content=self._content(result.answer, artifacts),
                                  tool_calls=[ExecutedToolCall.from_record(c) for c in result.calls] or None,
                                  artifacts=artifacts)
        return ChatCompletionResponse(id=_completion_id(),
                                      choices=[Choice(message=message, finish_reason=_finish(result))],
                                      conversation_id=result.conversation_id, usage=_usage(result),
                                      trimmed_messages=_trimmed(result, turn))

    async def complete_while_connected(self, turn: Turn, base_url: str,
                                       is_disconnected: Callable[[], Awaitable[bool]]) -> ChatCompletionResponse:
        """``complete`` on a worker thread while the client is watched (every ``DISCONNECT_POLL_S``): a
        client that goes away stops the turn as a streamed one's does (decoding ends at the next step,
        queued calls are taken back, no further call starts); what it did is still saved."""
        from fastapi.concurrency import run_in_threadpool

        stop = threading.Event()
        task = asyncio.ensure_future(run_in_threadpool(self.complete, turn, base_url, stop.is_set))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and not stop.is_set() and await is_disconnected():
                stop.set()
        return task.result()

    def stream(self, turn: Turn, base_url: str) -> Iterator[str]:
        """Run the turn and yield SSE frames: stages and calls as ``event`` chunks, the answer as content
        deltas, then the calls and artifacts, ``finish_reason`` and ``data: [DONE]``."""
        cid, created = _completion_id(), int(time.time())

        def chunk(**kw: Any) -> str:
            return _sse(ChatCompletionChunk(id=cid, created=created, conversation_id=turn.conversation_id,
                                            **kw).model_dump_json())

        def content(text: str) -> str:
            return chunk(choices=[ChunkChoice(delta=Delta(content=text))])

        yield chunk(choices=[ChunkChoice(delta=Delta(role="assistant", content=""))])
        answer = _Trimmed()
        answered = False
        stop = threading.Event()
        try:
            for ev in self._events(turn, stop):
                if isinstance(ev, StageEvent):
                    if ev.stage != "done":  # "done" goes out with finish_reason, after the result
                        yield chunk(event=ev)
                elif isinstance(ev, CallEvent):
                    yield chunk(event=ev)
                elif isinstance(ev, TextEvent):
                    if ev.phase == "plan":
                        yield chunk(event=ev)
                    else:
                        answered = True
                        piece = answer.feed(ev.text)
                        if piece:
                            yield content(piece)
                elif isinstance(ev, loop.ChatResult):
                    if not answered and ev.answer:  # a reply without calls is its own answer
                        yield content(ev.answer)
                    artifacts = self._artifacts(ev, base_url)
                    links = self._content("", artifacts)
                    if links or ev.calls:
                        sep = "\n\n" if links and ev.answer else ""
                        calls = [ToolCallDelta.from_record(c, index=i) for i, c in enumerate(ev.calls)]
                        yield chunk(choices=[ChunkChoice(delta=Delta(content=sep + links if links else None,
                                                                     tool_calls=calls or None,
                                                                     artifacts=artifacts))])
                    yield chunk(choices=[ChunkChoice(finish_reason=_finish(ev))], event=StageEvent(stage="done"),
                                trimmed_messages=_trimmed(ev, turn))
                    if turn.include_usage:  # OpenAI's shape: a last chunk with no choices, only the usage
                        yield chunk(choices=[], usage=_usage(ev))
        except GeneratorExit:  # the client went away (the server closes the stream): stop the turn
            stop.set()
            raise
        except SwitchboardError as e:
            yield _sse(json.dumps(error_body(e.status, e.message, e.code)))
        except Exception as e:
            log.exception("a streamed turn failed")
            yield _sse(json.dumps(error_body(500, f"the turn failed: {type(e).__name__}: {e}", "internal_error")))
        yield _sse("[DONE]")

    # -- building the answer --------------------------------------------------------------------
    def _artifacts(self, result: loop.ChatResult, base_url: str) -> list[Artifact]:
        out = []
        for a in result.artifacts:
            extra: dict[str, Any] = {}
            try:
                meta = self.store.get(a["id"])
                extra = {"media_type": meta.media_type, "width": meta.width, "height": meta.height}
            except SwitchboardError:
                pass
            out.append(Artifact(id=a["id"], kind=a.get("kind", ""), role=a.get("role", ""),
                                call_id=a.get("call_id"), url=f"{base_url}/v1/artifacts/{a['id']}", **extra))
        return out

    @staticmethod
    def _content(answer: str, artifacts: list[Artifact]) -> str:
        """The answer followed by a markdown link (images: an image link) to each artifact."""
        links = []
        for a in artifacts:
            label = _alt(f"{a.role or a.kind} ({a.call_id})" if a.call_id else a.role or a.kind)
            links.append(f"{'!' if a.kind in IMAGE_KINDS else ''}[{label}]({a.url})")
        return "\n\n".join(p for p in (answer, "\n".join(links)) if p)


def _finish(result: Any) -> Any:
    """OpenAI's finish_reason for a turn: "length" when the answer reached max_tokens, else "stop"."""
    return "length" if getattr(result, "finish_reason", "stop") == "length" else "stop"


def _trimmed(result: Any, turn: Turn) -> int | None:
    """Older messages left out of the core's prompt: by the loop, and those of the request's history
    that were never imported because the core would not read them."""
    return (getattr(result, "trimmed_messages", 0) or 0) + turn.left_out or None


def _usage(result: Any) -> Usage | None:
    """OpenAI's ``usage`` of a turn (None for a result that does not count its tokens)."""
    usage = getattr(result, "usage", None)
    return Usage.of(usage) if usage is not None else None


def _completion_id() -> str:
    return f"chatcmpl-{secrets.token_hex(12)}"


def _decode_data_uri(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/…;base64,…`` URI, with an error that says what is wrong."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise BadRequest("malformed data URI: expected data:image/<type>;base64,<data>")
    media_type, *params = [p.strip().lower() for p in header.split(";")]
    if not media_type.startswith("image/"):
        shown = media_type or "none (text/plain)"
        raise ImageRejected(f"unsupported content type {shown[:60]!r} in the data URI; send an image "
                            "(PNG, JPEG, WEBP, GIF or BMP)")
    if "base64" not in params:
        raise BadRequest("the image data URI must be base64-encoded (data:image/<type>;base64,<data>)")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise ImageTooLarge(f"image is about {len(payload) * 3 // 4} bytes; the limit is {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected("the image data URI is not valid base64") from None
