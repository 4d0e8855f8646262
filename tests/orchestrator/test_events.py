"""The turn's events, the call record and the event pump."""

from __future__ import annotations

import json
import threading

import pytest

from orchestrator.events import CallEvent, CallRecord, StageEvent, TextEvent, pump
from switchboard.artifacts import IMAGE_KINDS, accepted_kinds


def test_events_serialise_as_api_clients_see_them() -> None:
    assert json.loads(StageEvent(stage="planning").model_dump_json()) == {"type": "stage", "stage": "planning"}
    queued = CallEvent(call_id="c1", expert="crop", stage="queued")
    assert queued.time > 0  # for metrics and logs, not for clients
    assert json.loads(queued.model_dump_json()) == {"type": "call", "call_id": "c1", "expert": "crop",
                                                    "stage": "queued", "message": ""}
    assert CallEvent(call_id="c1", expert="crop", stage="progress", progress=0.5).model_dump()["progress"] == 0.5
    text = TextEvent(type="plan", text="<call")
    assert text.phase == "plan" and json.loads(text.model_dump_json()) == {"type": "plan", "text": "<call"}


def test_call_record_views() -> None:
    done = CallRecord(call_id="c1", expert="crop", status="done", args={"image": "image-" + "0" * 24},
                      result={"summary": "cropped", "artifacts": [{"id": "a", "kind": "image", "role": ""}]})
    assert done.summary == "cropped" and [a["id"] for a in done.artifacts] == ["a"]
    assert done.outcome() == {"call_id": "c1", "expert": "crop", "status": "done", "summary": "cropped",
                              "error": None, "artifacts": done.artifacts}
    bad = CallRecord.invalid("c2", "crop", {"region": "[1]"}, "region: too short")
    assert bad.status == "invalid" and bad.summary is None and bad.artifacts == []
    assert bad.tool_call == {"id": "c2", "function": {"name": "crop", "arguments": '{"region": "[1]"}'}}


def test_pump_yields_in_order_from_another_thread_and_reraises() -> None:
    threads: list[str] = []

    def produce(emit) -> None:
        threads.append(threading.current_thread().name)
        for i in range(3):
            emit(i)

    assert list(pump(produce, name="t-ok")) == [0, 1, 2] and threads == ["t-ok"]

    def fail(emit) -> None:
        emit("before")
        raise RuntimeError("inside")

    it = pump(fail, name="t-fail")
    assert next(it) == "before"
    with pytest.raises(RuntimeError, match="inside"):
        next(it)


def test_an_image_argument_accepts_any_image_kind() -> None:
    assert accepted_kinds("image") == IMAGE_KINDS == ("image", "overlay", "mask")
    assert accepted_kinds("mask") == ("mask",) and accepted_kinds("boxes") == ("boxes",)
