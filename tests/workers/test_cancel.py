"""A cancelled turn (its client went away) takes back its queued Celery calls: a real Redis and worker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from orchestrator.plan import Plan
from tests.workers.conftest import PlanRunner, lines

pytestmark = pytest.mark.integration


def test_a_cancelled_plan_never_runs_its_queued_calls(start_worker, dispatcher, test_registry, tmp_path: Path) -> None:
    start_worker(["wt_slow"], name="one")  # one slot: c1 runs, c2..c4 wait in the queue
    marker = tmp_path / "slow.txt"
    plan = Plan.from_text("\n".join(f'<call id="c{i}" expert="wt_slow" seconds="1.0" marker="{marker}"/>'
                                    for i in range(1, 5)), test_registry)
    assert not plan.errors
    gone = threading.Event()
    runner = PlanRunner(dispatcher, plan, should_stop=gone.is_set)
    runner.wait_event(lambda e: e.call_id == "c1" and e.stage == "started")
    gone.set()
    result = runner.result(timeout=30)
    o = result.by_id()
    assert o["c1"].status == "done"  # it had started: waited for, its result kept
    for cid in ("c2", "c3", "c4"):
        assert o[cid].status == "skipped" and "cancelled" in o[cid].error, (o[cid], runner.events)
    time.sleep(2.5)  # long enough for the worker to have taken every message left in the queue
    assert {line.split()[0] for line in lines(marker)} == {"c1"}
