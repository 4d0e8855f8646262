"""Fixtures for the worker tests: a real redis-server (AOF on), real `switchboard worker` processes,
and a QueuedDispatcher whose registry holds the sample experts of tests/workers/sample_experts.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.workers import sample_experts
from workers.testing import RedisServer, WorkerProcess, worker_env


@pytest.fixture
def worker_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``workers.app.app``, imported as a worker imports it: with a broker URL (nothing connects to it).
    What the worker CLI sets on it is put back afterwards."""
    from switchboard.settings import get_settings

    monkeypatch.setenv("SWITCHBOARD_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    from workers.app import app

    monkeypatch.setattr(app, "switchboard_settings", app.switchboard_settings)
    try:
        yield app
    finally:
        get_settings.cache_clear()


# The tests run under the default visibility timeout (the longest hard limit + 60 s): a call whose
# whole worker died is rerun because of the worker's heartbeat (workers.liveness), not the timeout.
# Calls may wait this long in a queue before the orchestrator gives up on them.
QUEUE_TIMEOUT_S = 5.0


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except RuntimeError as e:  # integration tests run in CI: a missing redis-server is a failure
        pytest.fail(str(e))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[Any]:
    if not redis_server.ping():  # a test that restarted it and failed half way
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def env(redis_server: RedisServer, artifact_dir: Path, tmp_path: Path) -> dict[str, str]:
    return worker_env(redis_server.url, artifact_dir, extra_experts=sample_experts.SPEC,
                      WT_SETUP_LOG=str(tmp_path / "setup.log"),
                      SWITCHBOARD_QUEUE_TIMEOUT_S=str(QUEUE_TIMEOUT_S),
                      SWITCHBOARD_CALL_TIMEOUT_S="10")


@pytest.fixture
def start_worker(env: dict[str, str], tmp_path: Path, redis_db: Any) -> Iterator[Callable[..., WorkerProcess]]:
    """Start a `switchboard worker`; every worker started is killed (with its pool) after the test."""
    started: list[WorkerProcess] = []

    def start(experts: list[str], *, concurrency: int = 1, pool: str = "prefork", name: str) -> WorkerProcess:
        w = WorkerProcess(experts, env=env, log_path=tmp_path / f"worker-{name}.log", concurrency=concurrency,
                          pool=pool, name=name)
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def test_registry() -> Any:
    from switchboard.registry import Registry

    reg = Registry()
    for cls in sample_experts.ALL:
        reg.register(cls, "tests")
    return reg


@pytest.fixture
def dispatcher(redis_server: RedisServer, redis_db: Any, artifact_dir: Path, test_registry: Any) -> Iterator[Any]:
    from switchboard.artifacts import ArtifactStore
    from switchboard.settings import Settings
    from workers.dispatch import QueuedDispatcher

    settings = Settings(broker_url=redis_server.url, artifact_dir=artifact_dir, call_timeout_s=10,
                        queue_timeout_s=QUEUE_TIMEOUT_S)
    d = QueuedDispatcher(test_registry, ArtifactStore(artifact_dir), settings=settings)
    yield d
    d.close()


class PlanRunner:
    """Runs a plan on a thread and records its events, so a test can act in the middle of a call."""

    def __init__(self, dispatcher: Any, plan: Any, **kw: Any) -> None:
        self.events: list[Any] = []
        self._cond = threading.Condition()
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(dispatcher, plan, kw), daemon=True)
        self._thread.start()

    def _on_event(self, ev: Any) -> None:
        with self._cond:
            self.events.append(ev)
            self._cond.notify_all()

    def _run(self, dispatcher: Any, plan: Any, kw: dict[str, Any]) -> None:
        try:
            self._result = dispatcher.run_plan(plan, on_event=self._on_event, **kw)
        except BaseException as e:  # reported by result()
            self._error = e

    def wait_event(self, pred: Callable[[Any], bool], timeout: float = 20.0, count: int = 1) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [e for e in self.events if pred(e)]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no such event after {timeout} s; events: {self.events}")
                self._cond.wait(left)

    def result(self, timeout: float = 60.0) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"run_plan did not return within {timeout} s; events: {self.events}")
        if self._error is not None:
            raise self._error
        return self._result

    def stages(self, call_id: str) -> list[str]:
        return [e.stage for e in self.events if e.call_id == call_id]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
