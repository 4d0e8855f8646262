"""The give-up protocol between the orchestrator and the workers, on a real Redis (no worker process):
``START_DELIVERY`` (a worker taking a call) and ``ABANDON`` (the orchestrator giving up on it) are atomic,
so a call is either started in time or reported failed, never both (workers.backend)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from workers.backend import ABANDON, REQUEUED, revoked_meta

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(redis_server: Any, redis_db: Any, test_registry: Any) -> Any:
    from switchboard.settings import Settings
    from workers.config import create_app

    app = create_app(Settings(broker_url=redis_server.url), test_registry)
    yield app.backend
    app.close()


def _start(backend: Any, task_id: str, *, now: float, queue_by: float = 0.0, run_s: float = 0.0) -> tuple[int, Any, str]:
    request = SimpleNamespace(id=task_id, task="t", args=[], kwargs={}, hostname="w@h", retries=0, delivery_info={},
                              group=None, parent_id=None, root_id=None, ignore_result=False, properties={})
    info = {"hostname": "w@h", "pid": 1, "retry": 0, "started_at": now}
    return backend.start_delivery(request, f"count:{task_id}", 60, info, now=now, queue_by=queue_by, run_s=run_s,
                                  margin=0.5)


def _abandon(redis_db: Any, task_id: str, *, now: float, queue_by: float, run_s: float) -> tuple[int, Any]:
    script = redis_db.register_script(ABANDON)
    meta = json.dumps(revoked_meta(task_id, "given up"))
    given_up, current = script(keys=[f"celery-task-meta-{task_id}"], args=[meta, 0, repr(now), repr(queue_by),
                                                                           repr(run_s)])
    return int(given_up), current


def _status(redis_db: Any, task_id: str) -> str:
    return json.loads(redis_db.get(f"celery-task-meta-{task_id}"))["status"]


def test_a_start_in_time_wins_over_the_give_up(backend: Any, redis_db: Any) -> None:
    now = time.time()
    assert _start(backend, "a", now=now, queue_by=now + 5, run_s=10)[2] == "run"
    # the orchestrator's queue deadline passes right after: it finds the start and waits for the run instead
    given_up, current = _abandon(redis_db, "a", now=now + 5, queue_by=now + 5, run_s=10)
    assert given_up == 0 and json.loads(current)["status"] == "STARTED"
    # ... until the run deadline, counted from the start
    assert _abandon(redis_db, "a", now=now + 10.1, queue_by=now + 5, run_s=10)[0] == 1
    assert _status(redis_db, "a") == "REVOKED"


def test_a_give_up_wins_over_a_later_start(backend: Any, redis_db: Any) -> None:
    now = time.time()
    assert _abandon(redis_db, "b", now=now + 5, queue_by=now + 5, run_s=10)[0] == 1
    count, _, verdict = _start(backend, "b", now=now + 5.01, queue_by=now + 5, run_s=10)
    assert verdict == "abandoned" and count == 1
    assert _status(redis_db, "b") == "REVOKED"
    # a result that comes anyway (a call that had started) is not stored over the REVOKED
    assert backend.store_state("b", {"status": "SUCCESS", "result": {}, "task_id": "b"}, "SUCCESS") == -1
    assert _status(redis_db, "b") == "REVOKED"


def test_a_worker_refuses_a_call_past_its_deadline_even_without_the_give_up(backend: Any, redis_db: Any) -> None:
    """Redis was down when the orchestrator gave up (nothing stored): the deadline in the message decides."""
    now = time.time()
    assert _start(backend, "c", now=now + 4.6, queue_by=now + 5, run_s=10)[2] == "abandoned"  # within the margin
    assert _status(redis_db, "c") == "REVOKED"
    # a redelivery after its worker died, past the run deadline of the first start: refused too
    assert _start(backend, "d", now=now, queue_by=now + 5, run_s=10)[2] == "run"
    assert _start(backend, "d", now=now + 9.6, queue_by=now + 5, run_s=10)[2] == "abandoned"


def test_a_requeued_call_gets_a_new_queue_deadline(backend: Any, redis_db: Any) -> None:
    now = time.time()
    assert _start(backend, "e", now=now, queue_by=now + 5, run_s=10)[2] == "run"
    # its worker died; a sweeper put it back (workers.liveness) with a new queue deadline
    key = "celery-task-meta-e"
    redis_db.set(key, json.dumps({"status": REQUEUED, "task_id": "e", "result": {"queue_by": now + 20}}))
    assert _abandon(redis_db, "e", now=now + 12, queue_by=now + 5, run_s=10)[0] == 0  # not late: still queued
    assert _start(backend, "e", now=now + 12, queue_by=now + 5, run_s=10)[2] == "run"  # the rerun
    count, stored, verdict = _start(backend, "f", now=now, queue_by=now + 5, run_s=10)
    redis_db.set("celery-task-meta-f", json.dumps({"status": REQUEUED, "task_id": "f", "result": {"queue_by": now + 1}}))
    assert _start(backend, "f", now=now + 2, queue_by=now + 5, run_s=10)[2] == "abandoned"


def test_a_stored_result_is_returned_not_run_again(backend: Any, redis_db: Any) -> None:
    now = time.time()
    redis_db.set("celery-task-meta-g", json.dumps({"status": "SUCCESS", "task_id": "g", "result": {"summary": "x"}}))
    count, stored, verdict = _start(backend, "g", now=now, queue_by=now + 5, run_s=10)
    assert verdict == "done" and json.loads(stored)["result"] == {"summary": "x"}
    assert _abandon(redis_db, "g", now=now + 100, queue_by=now + 5, run_s=10)[0] == 0
