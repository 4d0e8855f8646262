"""Calls through real Celery workers and a real Redis, including the ways they fail."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.plan import Plan
from tests.workers.conftest import QUEUE_TIMEOUT_S, PlanRunner, lines
from workers.config import DEAD_LETTER_KEY, RESULT_KEY_PREFIX, TASK_NAME

pytestmark = pytest.mark.integration


def plan_of(text: str, registry: Any) -> Plan:
    plan = Plan.from_text(text, registry)
    assert not plan.errors, plan.errors
    return plan


def wait_for_state(redis_db: Any, task_id: str, status: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = redis_db.get(RESULT_KEY_PREFIX + task_id)
        if raw and json.loads(raw)["status"] == status:
            return json.loads(raw)
        time.sleep(0.05)
    raise TimeoutError(f"task {task_id} not {status} after {timeout} s: {raw!r}")


def started_pid(event: Any) -> int:
    m = re.search(r"\(pid (\d+)\)", event.message)
    assert m, event.message
    return int(m.group(1))


def test_plan_runs_through_celery(start_worker, dispatcher, test_registry, tmp_path: Path) -> None:
    worker = start_worker(["wt_make", "wt_use", "wt_flaky"], concurrency=2, name="plan")
    # A pickled message is refused (JSON only), and does not stop the worker.
    pickled = tmp_path / "pickled.txt"
    dispatcher.app.send_task(TASK_NAME, queue="wt_flaky", serializer="pickle", kwargs={
        "expert": "wt_flaky", "args": {"marker": str(pickled)}, "call_id": "p1"})
    flaky, broken = tmp_path / "flaky.txt", tmp_path / "broken.txt"
    plan = plan_of(
        '<call id="c1" expert="wt_make" text="hello"/>\n'
        '<call id="c2" expert="wt_use" boxes="$c1"/>\n'
        f'<call id="c3" expert="wt_flaky" marker="{flaky}"/>\n'
        f'<call id="c4" expert="wt_flaky" marker="{broken}" mode="broken"/>', test_registry)
    runner = PlanRunner(dispatcher, plan, conversation_id="conv-1")
    result = runner.result(timeout=60)
    out = result.by_id()

    assert out["c1"].status == "done" and out["c1"].result["summary"] == "made hello"
    assert out["c2"].status == "done" and out["c2"].result["summary"] == "used hello"
    assert out["c2"].args["boxes"] == out["c1"].result["artifacts"][0]["id"]  # $c1 resolved to an id
    meta = dispatcher.store.get(out["c1"].result["artifacts"][0]["id"])
    assert (meta.call_id, meta.conversation_id) == ("c1", "conv-1")
    # progress events reach the orchestrator, in order
    assert runner.stages("c1") == ["queued", "started", "progress", "done"]
    assert runner.stages("c2") == ["queued", "started", "done"]
    # a transient error is retried with backoff; an expert's bug is not
    assert out["c3"].status == "done" and out["c3"].result["summary"] == "worked on attempt 2"
    assert any("retrying after a transient error" in e.message for e in runner.events if e.call_id == "c3")
    assert runner.stages("c3").count("started") == 2  # the retry is a new start
    assert out["c4"].status == "failed" and "ValueError: a bug, not worth retrying" in out["c4"].error
    assert len(lines(broken)) == 1
    # models load once per pool process, never in the prefork parent
    setups = [tuple(line.split()) for line in lines(tmp_path / "setup.log")]
    assert setups and len(setups) == len(set(setups))
    assert str(worker.pid) not in {pid for _, pid in setups}
    assert {int(pid) for _, pid in setups} <= set(worker.child_pids())
    # the pickled message was refused, never run
    worker.wait_for("untrusted content", timeout=10)
    assert not pickled.exists()
    assert worker.proc.poll() is None


def test_worker_killed_mid_call_completes_on_another_exactly_once(start_worker, dispatcher, test_registry,
                                                                  tmp_path: Path) -> None:
    a = start_worker(["wt_slow"], name="kill-a")
    b = start_worker(["wt_slow"], name="kill-b")
    marker = tmp_path / "slow.txt"
    runner = PlanRunner(dispatcher, plan_of(f'<call id="c1" expert="wt_slow" seconds="1.5" marker="{marker}"/>',
                                            test_registry))
    first = runner.wait_event(lambda e: e.stage == "progress")  # in the middle of the call
    started = runner.wait_event(lambda e: e.stage == "started")
    victim, survivor = (a, b) if f"{a.name}@" in started.message else (b, a)
    assert first.call_id == "c1"
    victim.kill()  # kill -9 the worker and its pool process
    result = runner.result(timeout=60)
    assert result.ok, result.outcomes
    done = lines(marker)
    assert len(done) == 1, done  # exactly once
    assert int(done[0].split()[1]) in survivor.child_pids()
    again = runner.wait_event(lambda e: e.stage == "started", count=2, timeout=1)
    assert f"{survivor.name}@" in again.message and "an earlier worker died" in again.message


def test_pool_process_killed_is_requeued_and_completes(start_worker, dispatcher, test_registry,
                                                       tmp_path: Path) -> None:
    worker = start_worker(["wt_slow"], name="child")
    marker = tmp_path / "slow.txt"
    runner = PlanRunner(dispatcher, plan_of(f'<call id="c1" expert="wt_slow" seconds="1.0" marker="{marker}"/>',
                                            test_registry))
    runner.wait_event(lambda e: e.stage == "progress")
    child = started_pid(runner.wait_event(lambda e: e.stage == "started"))
    assert child in worker.child_pids() and child != worker.pid
    os.kill(child, signal.SIGKILL)
    result = runner.result(timeout=60)
    assert result.ok, result.outcomes
    done = lines(marker)
    assert len(done) == 1 and int(done[0].split()[1]) != child
    assert worker.proc.poll() is None


def test_redis_restart_loses_no_queued_call(start_worker, dispatcher, redis_server, test_registry,
                                            tmp_path: Path) -> None:
    start_worker(["wt_slow"], name="restart")
    marker = tmp_path / "slow.txt"
    text = "\n".join(f'<call id="c{i}" expert="wt_slow" seconds="0.5" marker="{marker}"/>' for i in range(1, 5))
    runner = PlanRunner(dispatcher, plan_of(text, test_registry))
    runner.wait_event(lambda e: e.stage == "started")
    redis_server.restart(signal.SIGTERM, down_for=0.5)  # calls are waiting in the queue meanwhile
    result = runner.result(timeout=60)
    assert result.ok, [o.error for o in result.outcomes]
    done = sorted(line.split()[0] for line in lines(marker))
    assert done == ["c1", "c2", "c3", "c4"], done  # nothing lost, nothing run twice
    # the orchestrator reconnected by itself: a new plan goes through the same dispatcher
    again = dispatcher.run_plan(plan_of(f'<call id="c5" expert="wt_slow" seconds="0.1" marker="{marker}"/>',
                                        test_registry))
    assert again.ok, again.outcomes


def test_call_that_kills_every_worker_is_dead_lettered(start_worker, dispatcher, redis_db, test_registry,
                                                       tmp_path: Path) -> None:
    worker = start_worker(["wt_crash"], name="crash")
    marker = tmp_path / "crash.txt"
    t0 = time.monotonic()
    result = dispatcher.run_plan(plan_of(f'<call id="c1" expert="wt_crash" marker="{marker}"/>', test_registry))
    outcome = result.outcomes[0]
    assert outcome.status == "failed"
    assert "wt_crash: call c1 killed its worker 3 times; dead-lettered" in outcome.error
    assert time.monotonic() - t0 < dispatcher.timeout_for("wt_crash")  # not the deadline: the cap
    assert len(lines(marker)) == 3
    dead = [json.loads(x) for x in redis_db.lrange(DEAD_LETTER_KEY, 0, -1)]
    assert [(d["expert"], d["call_id"], d["deaths"]) for d in dead] == [("wt_crash", "c1", 3)]
    assert dead[0]["args"] == {"marker": str(marker)}
    assert worker.proc.poll() is None


def test_time_limits_stop_the_call_and_the_worker_goes_on(start_worker, dispatcher, redis_db,
                                                          test_registry) -> None:
    worker = start_worker(["wt_sleepy"], name="limits")
    t0 = time.monotonic()
    soft = dispatcher.run_plan(plan_of('<call id="c1" expert="wt_sleepy" seconds="30"/>', test_registry))
    assert soft.outcomes[0].status == "failed"
    assert soft.outcomes[0].error == "wt_sleepy: exceeded its time limit of 1 s and was stopped"
    hard = dispatcher.run_plan(plan_of('<call id="c2" expert="wt_sleepy" seconds="30" stubborn="true"/>',
                                       test_registry))
    assert hard.outcomes[0].status == "failed"
    assert "wt_sleepy: ran past its hard time limit of 2 s" in hard.outcomes[0].error
    assert time.monotonic() - t0 < 10
    ok = dispatcher.run_plan(plan_of('<call id="c3" expert="wt_sleepy" seconds="0.1"/>', test_registry))
    assert ok.ok, ok.outcomes
    assert worker.proc.poll() is None
    # A message sent without time limits (`celery call`, a script) still gets the expert's own.
    task_id = "raw-sleepy-1"
    dispatcher.app.send_task(TASK_NAME, task_id=task_id, queue="wt_sleepy",
                             kwargs={"expert": "wt_sleepy", "args": {"seconds": 30}, "call_id": "r1"})
    meta = wait_for_state(redis_db, task_id, "FAILURE", timeout=10)
    assert meta["result"]["exc_message"] == ["wt_sleepy: exceeded its time limit of 1 s and was stopped"]


def test_queue_without_worker_gives_up_after_the_queue_timeout(start_worker, dispatcher, test_registry,
                                                               tmp_path: Path) -> None:
    marker = tmp_path / "orphan.txt"
    t0 = time.monotonic()
    result = dispatcher.run_plan(plan_of(f'<call id="c1" expert="wt_orphan" marker="{marker}"/>', test_registry))
    elapsed = time.monotonic() - t0
    outcome = result.outcomes[0]
    assert outcome.status == "failed"
    # the queue deadline, with the queue's depth and the workers' liveness in the error
    assert outcome.error == (
        "wt_orphan: queued 5 s in queue 'wt_orphan', 1 call(s) waiting there; no live worker serves it: is a "
        "worker for it running (`switchboard worker --experts wt_orphan`)?"), outcome.error
    assert QUEUE_TIMEOUT_S - 0.5 <= elapsed <= QUEUE_TIMEOUT_S + 1.5
    # The abandoned call stays given up: a worker that starts later takes its message and does not run it.
    late = start_worker(["wt_orphan"], name="late")
    later = dispatcher.run_plan(plan_of(f'<call id="c2" expert="wt_orphan" marker="{marker}"/>', test_registry))
    assert later.ok, later.outcomes
    assert [line.split()[0] for line in lines(marker)] == ["c2"]
    late.wait_for("call c1 (wt_orphan", timeout=5)
    assert "not run: the orchestrator has given up on it" in late.log()
