"""What a turn reports: its events, the record of each call, and the pump that streams them.

One typed value per concept, built once where it happens and carried unchanged to the CLI, the logs
and the HTTP API (whose stream chunks carry the events as they are):

- ``StageEvent`` — the turn moved on: planning → executing (only with calls) → answering → done;
- ``CallEvent`` — one call moved on: queued, started, progress, done, failed (built by the dispatchers);
- ``TextEvent`` — a piece of the core's text, of its plan or of its answer;
- ``CallRecord`` — how one call of a reply went (built by the dispatcher, or by the loop for a call
  that was invalid and never ran).

Every event has a ``type`` (how API clients tell them apart) and a ``time`` (for metrics and logs;
left out of the JSON). ``pump`` runs a producer of events in a thread and yields them as they come.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field, model_serializer

TurnStage = Literal["planning", "executing", "answering", "done"]
CallStage = Literal["queued", "started", "progress", "done", "failed"]
CallStatus = Literal["done", "failed", "skipped", "invalid"]


class Event(BaseModel):
    """Base of the events of a turn."""

    time: float = Field(default_factory=time.time, exclude=True)


class StageEvent(Event):
    """The turn moved on: planning → executing (only when there are calls) → answering → done."""

    type: Literal["stage"] = "stage"
    stage: TurnStage


class CallEvent(Event):
    """A stage of one call, streamed to clients (SSE) and logs."""

    type: Literal["call"] = "call"
    call_id: str
    expert: str
    stage: CallStage
    progress: float | None = None
    message: str = ""

    # No return annotation: with one, pydantic would document the serialised schema as a bare dict.
    @model_serializer(mode="wrap")
    def _omit_no_progress(self, handler: Any):  # noqa: ANN202
        data = handler(self)
        if data.get("progress", 0) is None:
            del data["progress"]
        return data


class TextEvent(Event):
    """A piece of the core's text as it is decoded: of its plan (commands included) or of its answer."""

    type: Literal["plan", "answer"]
    text: str

    @property
    def phase(self) -> Literal["plan", "answer"]:
        return self.type


EventSink = Callable[[Any], None]


class CallRecord(BaseModel):
    """How one call of a reply went: what the CLI prints, the core reads back and the API reports.

    ``args`` are the arguments it ran with (references resolved; empty when it never ran),
    ``result`` the expert's result as JSON (``summary``, ``artifacts`` …) when it is done, ``error``
    what went wrong otherwise. ``tool_call`` is the call as an OpenAI ``tool_calls`` entry, with its
    arguments as the reply wrote them (``$c1`` references included).
    """

    call_id: str
    expert: str
    status: CallStatus
    args: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    tool_call: dict[str, Any] | None = None

    @classmethod
    def invalid(cls, call_id: str, expert: str, args: dict[str, Any], error: str) -> CallRecord:
        """A call that did not validate (it never ran); ``args`` as written in the reply."""
        return cls(call_id=call_id, expert=expert, status="invalid", args=args, error=error, tool_call={
            "id": call_id, "function": {"name": expert, "arguments": json.dumps(args)}})

    @property
    def summary(self) -> str | None:
        return (self.result or {}).get("summary", "") if self.status == "done" else None

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        """The artifacts it made: ``{"id", "kind", "role"}`` each."""
        return (self.result or {}).get("artifacts", []) if self.status == "done" else []

    def outcome(self) -> dict[str, Any]:
        """The mapping ``orchestrator.core.format.tool_line`` reads (shared with the training data)."""
        return {"call_id": self.call_id, "expert": self.expert, "status": self.status, "summary": self.summary,
                "error": self.error, "artifacts": self.artifacts}


def pump(produce: Callable[[EventSink], Any], *, name: str) -> Iterator[Any]:
    """Run ``produce(emit)`` in a daemon thread and yield what it emits, as it emits it.

    The producer finishes even if the consumer stops early (a client that went away does not cut a
    turn in half); an exception inside it is re-raised from the iterator.
    """
    items: queue.Queue[Any] = queue.Queue()
    end = object()

    def work() -> None:
        try:
            produce(items.put)
        except BaseException as e:  # handed to the consumer
            items.put(e)
        finally:
            items.put(end)

    threading.Thread(target=work, daemon=True, name=name).start()
    while (item := items.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item
