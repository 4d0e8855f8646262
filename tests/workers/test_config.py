"""The Celery side without Redis: configuration, routing from the registry, time limits, the CLI."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads
from pydantic import BaseModel

from switchboard.expert import Expert, ExpertResult
from switchboard.registry import Registry
from switchboard.settings import Settings
from tests.workers import sample_experts
from workers import cli, routing
from workers.config import (
    TASK_NAME,
    VISIBILITY_MARGIN_S,
    celery_config,
    create_app,
    redacted_url,
    result_backend_url,
    visibility_timeout,
)


class PluginArgs(BaseModel):
    text: str = ""


class PluginExpert(Expert):
    """Stands for an expert a plugin registers at run time."""

    name = "plugin_thing"
    description = "a plugin expert"
    Args = PluginArgs
    Result = ExpertResult
    queue = "gpu_shared"
    time_limit = 300.0


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    for cls in sample_experts.ALL:
        r.register(cls, "tests")
    return r


@pytest.fixture
def settings() -> Settings:
    return Settings(broker_url="redis://127.0.0.1:1/0", call_timeout_s=120)


def test_worker_config_is_json_only_and_reliable(settings: Settings, reg: Registry) -> None:
    conf = celery_config(settings, reg)
    assert conf["accept_content"] == ["json"] and conf["result_accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_send_task_events"] and conf["task_send_sent_event"]
    assert conf["result_backend"] == "redis://127.0.0.1:1/0"
    assert conf["broker_connection_retry"] and conf["broker_connection_max_retries"] is None
    assert conf["result_backend_always_retry"]
    # the orchestrator's app reads results itself
    assert celery_config(settings, reg, producer=True)["result_backend"] is None


def test_nothing_waits_long_on_a_broker_that_is_down(reg: Registry) -> None:
    s = Settings(broker_url="redis://127.0.0.1:1/0", broker_timeout_s=2.5)
    opts = celery_config(s, reg, producer=True)["broker_transport_options"]
    assert opts["socket_connect_timeout"] == opts["socket_timeout"] == 2.5  # submits fail within it
    # workers reconnect with at most ~1 s between tries (Celery's own backoff grows by 2 s a try)
    app = create_app(s, reg)
    try:
        assert app.conf.worker_consumer == "workers.config:Consumer"
        assert {step.__name__ for step in app.steps["worker"]} >= {"Heartbeat", "PoolWatch"}
    finally:
        app.close()
    from workers.config import RECONNECT_MAX_S

    assert RECONNECT_MAX_S <= 1.0


def test_a_pool_death_puts_the_call_at_the_front_of_its_queue() -> None:
    """kombu's reject(requeue=True) LPUSHes (the back: consumers BRPOP from the right); ours RPUSHes."""
    from workers.transport import QoS

    calls: list[tuple[str, bool]] = []
    qos = QoS.__new__(QoS)
    qos.restore_by_tag = lambda tag, client=None, leftmost=False: calls.append((tag, leftmost))  # type: ignore
    acked: list[str] = []
    qos._quick_ack = acked.append  # kombu's bookkeeping of the message this process held
    qos.reject("t1", requeue=True)
    assert calls == [("t1", False)] and acked == ["t1"]


def test_a_pickled_message_is_refused() -> None:
    ctype, enc, body = dumps({"expert": "x"}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(body, ctype, enc, accept=["json"])
    assert pickle.loads(body) == {"expert": "x"}  # it really was a pickle


def test_the_task_is_registered_with_late_acks(worker_app: Any) -> None:
    from workers.tasks import ExpertRequest

    task = worker_app.tasks[TASK_NAME]
    assert task.acks_late and task.reject_on_worker_lost
    assert task.Request is ExpertRequest


def test_one_queue_per_expert_derived_from_the_registry(settings: Settings, reg: Registry) -> None:
    reg.register(PluginExpert, "some-plugin")  # registered after import: no change anywhere else
    assert routing.queue_for(reg, "wt_make") == "wt_make"
    assert routing.queue_for(reg, "plugin_thing") == "gpu_shared"
    assert routing.queues_for(reg, ["wt_make", "plugin_thing", "wt_make"]) == ["wt_make", "gpu_shared"]
    (route,) = celery_config(settings, reg)["task_routes"]
    assert route(TASK_NAME, (), {"expert": "plugin_thing"}, {}) == {"queue": "gpu_shared"}
    assert route("other.task", (), {"expert": "plugin_thing"}, {}) is None


def test_time_limits_come_from_the_expert_or_the_settings(settings: Settings, reg: Registry) -> None:
    assert routing.time_limits(sample_experts.SleepyExpert, 120) == (1.0, 2.0)
    assert routing.time_limits(sample_experts.MakeExpert, 120) == (120.0, 132.0)  # no time_limit: settings
    assert routing.time_limits(PluginExpert, 120) == (300.0, 330.0)
    assert routing.orchestrator_deadline(sample_experts.SleepyExpert, 120) == 2.0 + routing.RESULT_GRACE_S
    reg.register(PluginExpert, "some-plugin")
    assert visibility_timeout(settings, reg) == 330.0 + VISIBILITY_MARGIN_S
    assert visibility_timeout(settings.model_copy(update={"broker_visibility_timeout_s": 7.0}), reg) == 7.0


def test_extra_experts_spec(reg: Registry) -> None:
    fresh = Registry()
    names = routing.load_extra_experts(fresh, "tests.workers.sample_experts:MakeExpert, "
                                              "tests.workers.sample_experts:UseExpert")
    assert names == ["wt_make", "wt_use"] and fresh.names() == ["wt_make", "wt_use"]
    routing.load_extra_experts(fresh, "tests.workers.sample_experts:MakeExpert")  # again: a no-op
    with pytest.raises(ValueError, match="package.module:Class"):
        routing.load_extra_experts(fresh, "no_colon_here")
    with pytest.raises(ImportError, match="cannot be loaded"):
        routing.load_extra_experts(fresh, "tests.workers.sample_experts:Nope")


def test_result_backend_must_be_redis() -> None:
    assert result_backend_url(Settings(broker_url="redis://h:6379/0")) == "redis://h:6379/0"
    with pytest.raises(ValueError, match="must be Redis"):
        result_backend_url(Settings(broker_url="redis://h/0", result_backend="rpc://"))
    assert redacted_url("redis://:secret@h:6379/0") == "redis://***@h:6379/0"


def test_transient_errors_are_retried_bugs_are_not() -> None:
    from workers.tasks import is_transient

    assert is_transient(ConnectionError("reset"))
    assert is_transient(TimeoutError())
    assert is_transient(OSError(5, "I/O error"))
    assert not is_transient(PermissionError())
    assert not is_transient(ValueError("bug"))
    assert not is_transient(None)


def test_queued_dispatcher_failure_messages(settings: Settings, reg: Registry, tmp_path: Any) -> None:
    from switchboard.artifacts import ArtifactStore
    from workers.dispatch import QueuedDispatcher

    d = QueuedDispatcher(reg, ArtifactStore(tmp_path / "a"), settings=settings, app=create_app(settings, reg,
                                                                                               producer=True))
    try:
        assert d.timeout_for("wt_sleepy") > routing.orchestrator_deadline(sample_experts.SleepyExpert, 120)
        p: Any = type("P", (), {"expert": "wt_sleepy", "soft": 1.0, "hard": 2.0})()
        msg = d._failure_message
        assert msg(p, {"exc_type": "CallFailed", "exc_message": ["wt_sleepy: bad"]}) == "wt_sleepy: bad"
        assert "hard time limit of 2 s" in msg(p, {"exc_type": "TimeLimitExceeded", "exc_message": [2.0]})
        assert msg(p, {"exc_type": "SoftTimeLimitExceeded", "exc_message": []}) == (
            "wt_sleepy: exceeded its time limit of 1 s and was stopped")
        assert "KeyError: 'x'" in msg(p, {"exc_type": "KeyError", "exc_message": ["'x'"]})
    finally:
        d.close()


def test_cli_refuses_unknown_experts(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWITCHBOARD_EXTRA_EXPERTS", raising=False)
    assert cli.main(["--experts", "no_such_expert"]) == 2
    err = capsys.readouterr().err
    assert "unknown expert(s) no_such_expert" in err and "registered experts:" in err
    assert cli.main(["--experts", "crop", "--concurrency", "0"]) == 2


def test_a_worker_without_a_broker_url_says_to_set_it(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from switchboard.settings import get_settings
    from workers.config import BrokerNotConfigured, broker_url

    monkeypatch.delenv("SWITCHBOARD_BROKER_URL", raising=False)
    monkeypatch.delenv("SWITCHBOARD_EXTRA_EXPERTS", raising=False)
    get_settings.cache_clear()
    try:
        assert cli.main(["--experts", "crop"]) == 2
    finally:
        get_settings.cache_clear()
    assert "SWITCHBOARD_BROKER_URL is not set" in capsys.readouterr().err
    with pytest.raises(BrokerNotConfigured, match="set it"):
        broker_url(Settings(broker_url=None))


def test_cli_starts_celery_on_the_experts_queues(monkeypatch: pytest.MonkeyPatch, worker_app: Any) -> None:
    from switchboard.settings import get_settings

    monkeypatch.setenv("SWITCHBOARD_EXTRA_EXPERTS", sample_experts.SPEC)
    get_settings.cache_clear()
    seen: list[list[str]] = []
    monkeypatch.setattr(worker_app, "start", lambda argv: seen.append(argv) or 0)
    assert cli.main(["--experts", "wt_make,wt_slow", "-c", "3", "--pool", "solo"]) == 0
    (argv,) = seen
    assert argv[0] == "worker"
    assert argv[argv.index("--queues") + 1] == "wt_make,wt_slow"
    assert argv[argv.index("--concurrency") + 1] == "3"
    assert argv[argv.index("--pool") + 1] == "solo"
    assert argv[argv.index("--hostname") + 1] == "wt_make+wt_slow@%h"
