"""Celery configuration, the worker's registry, and the names the workers share with the orchestrator.

The worker's app instance lives in ``workers.app``; the orchestrator's queued dispatcher builds its own
(producer-only) app from the same configuration. Settings come from ``switchboard.settings``
(``SWITCHBOARD_*``).

What the configuration guarantees, and why:

- JSON only, both ways (``accept_content=["json"]``): a pickled message is refused, so a client that
  can write to Redis cannot make a worker run code.
- One queue per expert (``Expert.queue_name()``), derived from the registry at run time.
- Late acks + reject on worker lost + prefetch 1: a call whose worker dies is delivered again,
  and a busy worker never holds calls that an idle one could run. Redeliveries are counted by the
  task (workers.tasks) and capped (``SWITCHBOARD_WORKER_MAX_DELIVERIES``), then dead-lettered.
- Per-expert soft/hard time limits (workers.routing.time_limits) travel with each message.
- Broker and result backend reconnect by themselves after a Redis restart.
- Task events on, so Flower shows the calls. The worker sends them in batches (``task.multi``
  messages, which Flower and every Celery event receiver read) at most ``EVENT_FLUSH_INTERVAL_S``
  after they happen, rather than one Redis PUBLISH per event (three per call).
- A worker that dies is noticed by its heartbeat (workers.liveness) and the calls it held are put back
  at the front of their queues within seconds; the visibility timeout (the longest hard limit + 60 s)
  is the safety net behind it. A call whose pool process died goes to the front of its queue too.
- Workers reconnect to Redis with at most ``RECONNECT_MAX_S`` between tries (Celery's default backoff
  grows by 2 s a try).
- A dead pool process is noticed within 0.5 s (PoolWatch), kombu's Redis transport reuses its
  client objects (workers.transport), and a task state is stored in one round trip
  (workers.backend): all take time off every call.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache, partial
from typing import Any

from celery import Celery, bootsteps
from celery.worker.consumer import Consumer as CeleryConsumer

from switchboard.settings import Settings
from workers import backend, transport
from workers.liveness import Heartbeat
from workers.routing import load_extra_experts, max_hard_limit, queue_for

transport.install()
backend.install()

TASK_NAME = "switchboard.run_expert"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# Redis keys the workers use besides Celery's own.
DEAD_LETTER_KEY = "switchboard:dead"
DELIVERIES_KEY = "switchboard:deliveries:{task_id}:{retries}"
# Celery's Redis result backend stores a task's state under this key and publishes every change
# on a channel of the same name; the queued dispatcher listens there (no global key prefix is set).
RESULT_KEY_PREFIX = "celery-task-meta-"
# How much longer than the longest hard time limit a call may stay unacknowledged before it is
# handed to another worker whatever its holder's heartbeat says: the safety net behind liveness
# (workers.liveness), which finds a dead worker in seconds.
VISIBILITY_MARGIN_S = 60.0
# Worker reconnect backoff: first try at once-ish, then every RECONNECT_MAX_S.
RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 1.0


class BrokerNotConfigured(ValueError):
    """Something that needs the broker was started without ``SWITCHBOARD_BROKER_URL``."""


def broker_url(settings: Settings) -> str:
    """The broker's URL. Unset means in-process dispatch, so a worker (or anything else that needs the
    broker) without one is a mistake, not a reason to guess localhost."""
    if not settings.broker_url:
        raise BrokerNotConfigured(
            "SWITCHBOARD_BROKER_URL is not set: workers need the broker the orchestrator sends calls to; "
            "set it on both, e.g. SWITCHBOARD_BROKER_URL=redis://localhost:6379/0 (unset, the orchestrator "
            "runs every call in-process and needs no worker)")
    return settings.broker_url


def redacted_url(url: str) -> str:
    """A Redis URL fit for logs and error messages (no password)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def result_backend_url(settings: Settings) -> str:
    url = settings.result_backend or broker_url(settings)
    if not url.startswith(REDIS_SCHEMES):
        raise ValueError(f"the result backend must be Redis (redis://…), got {url.split('://')[0]}://…")
    return url


def worker_registry(settings: Settings) -> Any:
    """The process registry (entry points) plus ``SWITCHBOARD_EXTRA_EXPERTS``.

    Registering a class that is already registered is a no-op, so calling this again is cheap.
    """
    from switchboard.registry import get_registry

    reg = get_registry()
    if settings.extra_experts:
        load_extra_experts(reg, settings.extra_experts)
    return reg


def queues_measurable(settings: Settings) -> bool:
    """Whether ``queue_depths`` can measure this broker's queues (a Redis broker)."""
    return bool(settings.broker_url) and settings.broker_url.startswith(REDIS_SCHEMES)


@lru_cache(maxsize=4)
def _broker_client(url: str) -> Any:
    import redis

    # Short timeouts: a metrics scrape must not hang on a broker that is down.
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)


def queue_depths(settings: Settings, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue, in one round trip. Raises if the broker cannot be reached.

    kombu's Redis transport keeps a queue as a Redis list named after it (priority 0, the only one
    the dispatchers use), so its length is the number of calls waiting.
    """
    names = list(queues)
    pipe = _broker_client(broker_url(settings)).pipeline()
    for name in names:
        pipe.llen(name)
    return {name: int(n) for name, n in zip(names, pipe.execute(), strict=True)}


def visibility_timeout(settings: Settings, registry: Any) -> float:
    if settings.broker_visibility_timeout_s:
        return float(settings.broker_visibility_timeout_s)
    return max_hard_limit(registry, settings.call_timeout_s) + VISIBILITY_MARGIN_S


def celery_config(settings: Settings, registry: Any, *, producer: bool = False) -> dict[str, Any]:
    """Celery settings for a worker, or (``producer=True``) for the orchestrator that only sends calls."""
    vis = visibility_timeout(settings, registry)

    def route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict | None:
        expert = (kwargs or {}).get("expert") if name == TASK_NAME else None
        if expert and expert in registry:
            return {"queue": queue_for(registry, expert)}
        return None

    transport_options = {
        "visibility_timeout": vis,
        # Sweep for calls of vanished workers often enough that the timeout above is what counts.
        "unacked_restore_interval": int(max(1, min(10, vis / 10))),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
    }
    if producer:
        # The orchestrator never waits on a broker that is down for longer than this (a submit fails).
        transport_options.update(socket_connect_timeout=settings.broker_timeout_s,
                                 socket_timeout=settings.broker_timeout_s)
    return {
        "broker_url": broker_url(settings),
        # The orchestrator reads results itself (workers.dispatch); without a backend object here,
        # Celery does not start a second result listener in the orchestrator process.
        "result_backend": None if producer else result_backend_url(settings),
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure": True,
        "task_acks_on_timeout": True,
        "worker_prefetch_multiplier": 1,
        # How long the prefork parent waits for a result from a pool process that died before it
        # declares the call's worker lost and requeues it (Celery's default is 10 s). A result that
        # was stored anyway is found by the redelivered task, which then does not run again.
        "worker_lost_wait": 1.0,
        # STARTED is stored by the task itself, after its redelivery checks (workers.tasks).
        "task_track_started": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_routes": (route,),
        "task_default_queue": "switchboard",
        "task_create_missing_queues": True,
        "broker_transport_options": transport_options,
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_connection_timeout": settings.broker_timeout_s if producer else 5,
        # A call running while the broker connection drops goes on; its result is stored, and if
        # its ack is lost the redelivered message finds that result instead of running again.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 1.0},
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_max_sleep_between_retries_ms": int(RECONNECT_MAX_S * 1000),
        "redis_retry_on_timeout": True,
        "redis_socket_keepalive": True,
        "redis_socket_connect_timeout": 5,
        "redis_backend_health_check_interval": 10,
        "result_expires": 24 * 3600,
        "enable_utc": True,
        "worker_hijack_root_logger": True,
    }


# How often the prefork parent looks for pool processes that died. Celery watches each process's exit
# pipe, but when the pipe closes before the process can be reaped it misses the death and notices
# it only at its 5 s maintenance tick; a call whose process was killed would wait that long.
POOL_CHECK_INTERVAL_S = 0.5


class PoolWatch(bootsteps.StartStopStep):
    """Worker bootstep: run the prefork pool's maintenance (reap, requeue, respawn) every 0.5 s."""

    requires = ("celery.worker.components:Pool",)
    label = "switchboard pool watch"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tref: Any = None

    def start(self, parent: Any) -> None:
        hub = getattr(parent, "hub", None)
        pool = getattr(getattr(parent, "pool", None), "_pool", None)
        if hub is not None and hasattr(pool, "maintain_pool"):
            self._tref = hub.call_repeatedly(POOL_CHECK_INTERVAL_S, pool.maintain_pool)

    def stop(self, parent: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None


# How long a task event may wait in the worker to be sent with others. Celery's own policy sends each
# one on the next turn of the event loop: a PUBLISH per event, three per call (received, started,
# succeeded), a third of the worker main process's CPU time for a short call. Batches also go out as
# soon as they hold ``buffer_limit`` (24) events.
EVENT_FLUSH_INTERVAL_S = 0.1


class BatchedTaskEvents(bootsteps.StartStopStep):
    """Consumer bootstep: send task events at most ``EVENT_FLUSH_INTERVAL_S`` late, in batches."""

    requires = ("celery.worker.consumer.events:Events",)
    label = "switchboard batched task events"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._tref: Any = None

    def start(self, c: Any) -> None:
        dispatcher, hub = getattr(c, "event_dispatcher", None), getattr(c, "hub", None)
        if dispatcher is None or hub is None or not dispatcher.on_send_buffered:
            return  # no event loop: Celery does not buffer task events at all

        def flush() -> None:
            self._tref = None
            c._flush_events()

        def on_buffered() -> None:
            if self._tref is None:
                self._tref = hub.call_later(EVENT_FLUSH_INTERVAL_S, flush)

        dispatcher.on_send_buffered = on_buffered

    def stop(self, c: Any) -> None:
        # Events still buffered go out now (the Events step closes the dispatcher after this step).
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        dispatcher = getattr(c, "event_dispatcher", None)
        if dispatcher is not None:
            try:
                dispatcher.flush()
            except Exception:  # the connection may be what is going away
                pass

    shutdown = stop


class Consumer(CeleryConsumer):
    """Celery's worker consumer, reconnecting to the broker with at most ``RECONNECT_MAX_S`` between tries.

    Celery retries at +2, +4, +6 … s (kombu's defaults), so a worker came back 4-5 s after a 2 s outage.
    """

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = partial(conn.ensure_connection, interval_start=RECONNECT_FIRST_S,
                                         interval_step=RECONNECT_MAX_S, interval_max=RECONNECT_MAX_S)
        return super().ensure_connected(conn)


def create_app(settings: Settings, registry: Any = None, *, producer: bool = False) -> Celery:
    """A configured Celery app. Workers use the module-level ``app``; dispatchers make their own.

    The app keeps the settings it was made with (``app.switchboard_settings``): the worker's tasks
    read theirs there, so a worker process reads its settings once, where it starts.
    Raises BrokerNotConfigured without ``SWITCHBOARD_BROKER_URL``.
    """
    reg = registry if registry is not None else worker_registry(settings)
    app = Celery("switchboard", set_as_current=not producer)
    app.conf.update(celery_config(settings, reg, producer=producer))
    app.switchboard_settings = settings
    if not producer:
        app.conf.include = ["workers.tasks"]
        app.conf.worker_consumer = f"{__name__}:Consumer"
        app.steps["worker"].add(PoolWatch)
        app.steps["worker"].add(Heartbeat)
        app.steps["consumer"].add(BatchedTaskEvents)
    return app

