"""Task events, as Flower receives them: every call's sent/received/started/succeeded events arrive,
although the worker and the dispatcher send them in batches (``task.multi`` messages)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from orchestrator.plan import Plan

pytestmark = pytest.mark.integration


def test_flower_sees_every_call_through_its_events(start_worker, dispatcher, test_registry) -> None:
    from celery.events.state import State

    app = dispatcher.app
    state = State()
    seen: list[str] = []
    ready = threading.Event()
    receivers: list[Any] = []

    def on_event(event: dict[str, Any]) -> None:
        seen.append(event["type"])
        state.event(event)

    def receive() -> None:  # what Flower does: one receiver on every event
        with app.connection_for_read() as conn:
            recv = app.events.Receiver(conn, handlers={"*": on_event})
            receivers.append(recv)
            ready.set()
            recv.capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    assert ready.wait(10)
    time.sleep(0.3)  # the receiver's subscription is in place
    start_worker(["wt_make"], name="events")
    plan = Plan.from_text("\n".join(f'<call id="c{i}" expert="wt_make" text="t{i}"/>' for i in range(5)),
                          test_registry)
    result = dispatcher.run_plan(plan)
    assert result.ok
    try:
        deadline = time.monotonic() + 10
        # events travel in batches (up to ~0.1 s late, task-sent from the orchestrator's listener), so
        # wait for all of them, not just for the tasks' final state
        kinds = ("task-sent", "task-received", "task-started", "task-succeeded")
        while time.monotonic() < deadline:
            done = [t for t in state.tasks.values() if t.state == "SUCCESS"
                    and t.sent and t.received and t.started and t.succeeded]
            if len(done) == 5 and all(seen.count(k) >= 5 for k in kinds):
                break
            time.sleep(0.05)
        tasks = list(state.tasks.values())
        assert len(tasks) == 5 and all(t.state == "SUCCESS" for t in tasks), [(t.uuid, t.state) for t in tasks]
        assert all(t.sent and t.received and t.started and t.succeeded for t in tasks)
        assert all(t.worker is not None and t.worker.hostname.startswith("events@") for t in tasks)
        for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
            assert seen.count(kind) == 5, (kind, seen)
    finally:
        receivers[0].should_stop = True
        thread.join(5)
