"""The job layer keeps its promises under failure (issue #28): real Redis, real worker processes.

Each test checks one promise of the README's "When things fail"; together they run in well under a
minute on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.plan import Plan
from tests.workers.conftest import QUEUE_TIMEOUT_S, PlanRunner, lines
from workers.config import RESULT_KEY_PREFIX

pytestmark = pytest.mark.integration


def plan_of(text: str, registry: Any) -> Plan:
    plan = Plan.from_text(text, registry)
    assert not plan.errors, plan.errors
    return plan


def slow_calls(n: int, seconds: float, marker: Path, first: int = 1) -> str:
    return "\n".join(f'<call id="c{i}" expert="wt_slow" seconds="{seconds}" marker="{marker}"/>'
                     for i in range(first, first + n))


def test_dead_worker_calls_rerun_within_seconds_under_default_settings(start_worker, dispatcher, test_registry,
                                                                      tmp_path: Path) -> None:
    """A whole worker killed: its call is put back (front of the queue) by another worker's sweep within
    seconds, though the visibility timeout is its default (the longest hard limit + 60 s = 82 s here)."""
    a = start_worker(["wt_slow"], name="live-a")
    b = start_worker(["wt_slow"], name="live-b")
    marker = tmp_path / "slow.txt"
    runner = PlanRunner(dispatcher, plan_of(f'<call id="c1" expert="wt_slow" seconds="2" marker="{marker}"/>',
                                            test_registry))
    started = runner.wait_event(lambda e: e.stage == "started")
    victim, survivor = (a, b) if f"{a.name}@" in started.message else (b, a)
    runner.wait_event(lambda e: e.stage == "progress")
    killed_at = time.monotonic()
    victim.kill()
    back = runner.wait_event(lambda e: e.stage == "progress" and "died" in e.message, timeout=15)
    assert f"its worker {victim.name}@" in back.message and "back at the front of queue 'wt_slow'" in back.message
    again = runner.wait_event(lambda e: e.stage == "started", count=2, timeout=15)
    rerun_s = time.monotonic() - killed_at
    assert f"{survivor.name}@" in again.message
    assert rerun_s < 10, rerun_s  # liveness timeout 4 s + confirmation 1.5 s + a sweep
    result = runner.result(timeout=30)
    assert result.ok, result.outcomes
    assert len(lines(marker)) == 1  # exactly once
    assert "died holding 1 call(s); put back at the front" in survivor.log()


def test_pool_death_requeues_to_the_front_of_the_queue(start_worker, dispatcher, test_registry,
                                                      tmp_path: Path) -> None:
    worker = start_worker(["wt_slow"], name="front")
    marker = tmp_path / "slow.txt"
    runner = PlanRunner(dispatcher, plan_of(slow_calls(5, 0.6, marker), test_registry))
    first = runner.wait_event(lambda e: e.stage == "progress")  # the first call is running, 4 wait behind it
    child = int(runner.wait_event(lambda e: e.stage == "started" and e.call_id == first.call_id)
                .message.split("(pid ")[1].split(")")[0])
    os.kill(child, signal.SIGKILL)
    result = runner.result(timeout=40)
    assert result.ok, [o.error for o in result.outcomes]
    done = [line.split()[0] for line in lines(marker)]
    assert done[0] == first.call_id, done  # rerun next, not behind the 4 others
    assert sorted(done) == ["c1", "c2", "c3", "c4", "c5"]
    assert worker.proc.poll() is None


def test_overloaded_queue_fails_with_queue_facts_and_never_runs_those_calls(start_worker, dispatcher, redis_db,
                                                                            test_registry, tmp_path: Path) -> None:
    """The queue deadline counts queue time only; a call it fails is never run afterwards."""
    start_worker(["wt_slow"], name="busy")
    marker = tmp_path / "slow.txt"
    n = 8  # 1 s each on one worker: about 5 start within the 5 s queue timeout
    result = PlanRunner(dispatcher, plan_of(slow_calls(n, 1.0, marker), test_registry)).result(timeout=60)
    failed = [o for o in result.outcomes if o.status == "failed"]
    done = [o for o in result.outcomes if o.status == "done"]
    assert failed and done, [o.error for o in result.outcomes]
    for o in failed:
        assert o.error.startswith("wt_slow: queued 5 s in queue 'wt_slow', "), o.error
        assert "no worker free (1 live worker(s) serve it with 1 slot(s)" in o.error, o.error
    # the calls that ran did not count their queue time against their run time
    assert all(o.seconds > 1.0 for o in done)
    time.sleep(2.5)  # long enough for the worker to take every message left in the queue
    ran = {line.split()[0] for line in lines(marker)}
    assert ran == {o.call_id for o in done}, (ran, [o.call_id for o in done])
    # the abandoned messages were taken and dropped (acked), not left behind to be redelivered
    assert redis_db.llen("wt_slow") == 0 and redis_db.hlen("unacked") == 0


def test_a_call_that_runs_past_the_deadline_has_its_result_discarded(start_worker, dispatcher, redis_db,
                                                                   test_registry) -> None:
    """A threads pool does not enforce time limits: the orchestrator gives up at the run deadline; the
    run that finishes later stores nothing and says so in the worker's log."""
    worker = start_worker(["wt_sleepy"], name="threads", pool="threads")
    runner = PlanRunner(dispatcher, plan_of('<call id="c1" expert="wt_sleepy" seconds="6"/>', test_registry))
    runner.wait_event(lambda e: e.stage == "started")
    result = runner.result(timeout=20)
    error = result.outcomes[0].error
    assert error.startswith("wt_sleepy: ran past its 4 s limit with no result (started on threads@"), error
    assert error.endswith("is alive but sent no result"), error
    worker.wait_for("finished after the orchestrator gave up on it: its result is discarded", timeout=10)
    task_ids = [k.decode()[len(RESULT_KEY_PREFIX):] for k in redis_db.keys(RESULT_KEY_PREFIX + "*")]
    states = {json.loads(redis_db.get(RESULT_KEY_PREFIX + t))["status"] for t in task_ids}
    assert states == {"REVOKED"}


def test_broker_down_fails_fast_and_nothing_runs_after(start_worker, dispatcher, redis_server, test_registry,
                                                       tmp_path: Path) -> None:
    marker = tmp_path / "orphan.txt"
    # A call waiting for a worker when Redis goes away: reported at its queue deadline, not when Redis returns.
    waiting = PlanRunner(dispatcher, plan_of(f'<call id="w1" expert="wt_orphan" marker="{marker}"/>',
                                             test_registry))
    waiting.wait_event(lambda e: e.stage == "queued")
    time.sleep(0.5)
    redis_server.stop(signal.SIGKILL)
    try:
        # Submitting while it is down: the plan's 8 calls fail together within the broker timeout.
        t0 = time.monotonic()
        down = dispatcher.run_plan(plan_of(slow_calls(8, 0.1, tmp_path / "never.txt"), test_registry))
        assert time.monotonic() - t0 < dispatcher.settings.broker_timeout_s + 1.0
        assert all(o.status == "failed" and "cannot be reached" in o.error for o in down.outcomes), down.outcomes
        t1 = time.monotonic()
        out = waiting.result(timeout=QUEUE_TIMEOUT_S + 5)
        assert time.monotonic() - t1 < QUEUE_TIMEOUT_S
        assert out.outcomes[0].status == "failed"
        assert "queued 5 s with no result and the broker at redis://" in out.outcomes[0].error
        assert "cannot be reached" in out.outcomes[0].error
    finally:
        redis_server.start()
    # Redis is back (AOF: the message is still queued); a worker for it starts: it does not run the call.
    late = start_worker(["wt_orphan"], name="after-outage")
    late.wait_for("call w1 (wt_orphan", timeout=15)
    assert "not run: the orchestrator has given up on it" in late.log()
    assert not marker.exists()


def test_workers_are_back_within_a_second_or_two_of_redis(start_worker, dispatcher, redis_server, test_registry,
                                                          tmp_path: Path) -> None:
    start_worker(["wt_slow"], name="reconnect")
    marker = tmp_path / "slow.txt"
    assert dispatcher.run_plan(plan_of(slow_calls(1, 0.1, marker), test_registry)).ok
    redis_server.stop(signal.SIGKILL)
    time.sleep(2.0)
    redis_server.start()
    t_up = time.monotonic()
    result = dispatcher.run_plan(plan_of(slow_calls(1, 0.1, marker, first=2), test_registry))
    assert result.ok, result.outcomes
    # Celery's own backoff (+2, +4, +6 s) had the worker back 4-5 s after a 2 s outage.
    assert time.monotonic() - t_up < 2.5
