"""A batching worker (``switchboard worker --batch-max``) end to end: real Redis, a real worker process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.plan import Plan
from tests.workers import batch_experts, sample_experts
from tests.workers.conftest import QUEUE_TIMEOUT_S, PlanRunner, lines
from workers.testing import RedisServer, WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def registry() -> Any:
    from switchboard.registry import Registry

    reg = Registry()
    reg.register(batch_experts.EchoExpert, "tests")
    return reg


@pytest.fixture
def queued(redis_server: RedisServer, redis_db: Any, artifact_dir: Path, registry: Any) -> Iterator[Any]:
    from switchboard.artifacts import ArtifactStore
    from switchboard.settings import Settings
    from workers.dispatch import QueuedDispatcher

    settings = Settings(broker_url=redis_server.url, artifact_dir=artifact_dir, call_timeout_s=30,
                        queue_timeout_s=QUEUE_TIMEOUT_S)
    d = QueuedDispatcher(registry, ArtifactStore(artifact_dir), settings=settings)
    yield d
    d.close()


@pytest.fixture
def batch_worker(env: dict[str, str], tmp_path: Path, redis_db: Any) -> Iterator[WorkerProcess]:
    env = dict(env, SWITCHBOARD_EXTRA_EXPERTS=f"{sample_experts.SPEC},{batch_experts.SPEC}",
               WT_BATCH_LOG=str(tmp_path / "batches.log"))
    # A long window: the batch closes when 4 calls are in (at once), never by waiting it out.
    w = WorkerProcess(["wt_echo"], env=env, log_path=tmp_path / "worker-batch.log", concurrency=4,
                      pool="threads", name="batch", extra_args=["--batch-max", "4", "--batch-window-ms", "800"])
    w.start()
    yield w
    w.stop()


def test_concurrent_calls_run_as_one_batch(batch_worker: WorkerProcess, queued: Any, registry: Any,
                                           tmp_path: Path) -> None:
    plan = Plan.from_text("\n".join(f'<call id="c{i}" expert="wt_echo" text="t{i}"/>' for i in range(4)), registry)
    assert not plan.errors
    runner = PlanRunner(queued, plan)
    out = runner.result(timeout=60).by_id()
    for i in range(4):
        o = out[f"c{i}"]
        assert o.status == "done", o.error
        assert o.result["text"] == f"t{i}"  # each caller got its own result
        assert o.result["batch_size"] == 4
        assert o.result["pid"] == batch_worker.pid  # a threads pool: the worker's own process
        # progress reported from the batch's thread reaches the right call
        assert runner.stages(f"c{i}") == ["queued", "started", "progress", "done"]
        assert any(e.message == f"echoing t{i}" for e in runner.events if e.call_id == f"c{i}")
    batches = [line.split() for line in lines(tmp_path / "batches.log")]
    assert [(kind, size) for kind, size, _, _ in batches] == [("batch", "4")]
    assert sorted(batches[0][3].split(",")) == ["t0", "t1", "t2", "t3"]
    assert "batches of up to 4 calls per expert" in batch_worker.log()


def test_a_failing_call_does_not_fail_its_batch(batch_worker: WorkerProcess, queued: Any, registry: Any,
                                                tmp_path: Path) -> None:
    text = "\n".join([*(f'<call id="c{i}" expert="wt_echo" text="t{i}"/>' for i in range(3)),
                      '<call id="bad" expert="wt_echo" text="oops" mode="boom"/>'])
    out = PlanRunner(queued, Plan.from_text(text, registry)).result(timeout=60).by_id()
    assert [out[f"c{i}"].status for i in range(3)] == ["done"] * 3
    assert [out[f"c{i}"].result["text"] for i in range(3)] == ["t0", "t1", "t2"]
    assert out["bad"].status == "failed" and "ValueError: boom on oops" in out["bad"].error
    kinds = [line.split()[:2] for line in lines(tmp_path / "batches.log")]
    # the batch of 4 raised; its calls then ran one by one
    assert kinds == [["batch", "4"], ["run", "1"], ["run", "1"], ["run", "1"], ["run", "1"]]
