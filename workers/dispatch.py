"""The queued dispatcher: runs a plan's calls on Celery workers, one queue per expert.

It shares the scheduler of ``orchestrator.dispatch.Dispatcher`` (dependencies, concurrency, time
limits) and only implements ``submit``: publish the call to its expert's queue and return a Future.

Results and progress come back through the Redis result backend. Celery stores each task state
under ``celery-task-meta-<task id>`` and publishes it on a channel of the same name; every task id of
this dispatcher starts with a per-dispatcher prefix, so one pattern subscription receives all of our
calls' states and nobody else's. A listener thread turns them into CallEvents (started, progress) and
settles the futures (done, failed). It survives Redis restarts: it reconnects with backoff,
resubscribes, and reads the stored states of all pending calls to catch up on what it missed.

A call nobody picks up (no worker for its queue) fails after its deadline with an error that says
so; the message expires at that deadline, so a worker started later does not run it for nobody.

Per call, publishing costs one Redis command (the LPUSH of the message): the ``task-sent`` event
Celery would PUBLISH right after it is buffered and sent with the others of the last
``EVENT_FLUSH_INTERVAL_S`` in one ``task.multi`` message (as workers send theirs), and the queue is
not re-declared on every send (calls go to the queue by name; the worker declares it).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from orchestrator.dispatch import CallEvent, CallFailed, Dispatcher, EventSink
from switchboard.artifacts import ArtifactStore
from switchboard.settings import Settings
from workers.config import (
    EVENT_FLUSH_INTERVAL_S,
    RESULT_KEY_PREFIX,
    TASK_NAME,
    broker_url,
    create_app,
    redacted_url,
    result_backend_url,
)
from workers.routing import orchestrator_deadline, queue_for, time_limits

log = logging.getLogger(__name__)

# run_plan's own deadline comes this much after ours, so the clearer error below is the one reported.
SCHEDULER_SLACK_S = 2.0
LISTEN_POLL_S = 0.1
CATCH_UP_EVERY_S = 1.0
SUBSCRIBE_WAIT_S = 5.0


@dataclass
class _Pending:
    task_id: str
    call_id: str
    expert: str
    queue: str
    soft: float
    hard: float
    wait_s: float
    deadline: float
    emit: EventSink
    future: cf.Future
    last: bytes | str | None = None
    seen: float = 0.0  # monotonic time of the last state received
    worker: str | None = None
    starts: set[tuple[int, str, Any]] = field(default_factory=set)  # (retry, worker, pid) seen

    def emit_event(self, stage: str, **kw: Any) -> None:
        try:
            self.emit(CallEvent(call_id=self.call_id, expert=self.expert, stage=stage, time=time.time(), **kw))
        except Exception:  # a broken event sink must not stop results from arriving
            log.exception("event sink failed")


def _exc_text(info: Any) -> tuple[str, str]:
    """(exception type, message) of a FAILURE/RETRY state stored by Celery as JSON."""
    if not isinstance(info, dict):
        return "Error", str(info)
    msg = info.get("exc_message", "")
    if isinstance(msg, list | tuple):
        msg = " ".join(str(m) for m in msg) if msg else ""
    return str(info.get("exc_type") or "Error"), str(msg)


class SentEvents:
    """Takes the place of Celery's event dispatcher in ``send_task``: ``task-sent`` events are kept and
    sent in batches (``flush_due``, called by the result listener, or at Celery's ``buffer_limit``).

    An event that cannot be sent (Redis down) is kept by Celery's dispatcher and sent after the next
    batch; events are for monitoring (Flower), so nothing waits for them.
    """

    def __init__(self, app: Any) -> None:
        self._dispatcher = app.events.Dispatcher(app.connection_for_write(), enabled=True, buffer_group=["task"])
        self._lock = threading.Lock()
        self._oldest: float | None = None  # monotonic time of the oldest event not sent yet

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> None:
        """What ``send_task`` calls after publishing a message (the producer is not needed here)."""
        with self._lock:
            self._dispatcher.send(type, **fields)  # sends the batch itself once it is full
            if self._oldest is None:
                self._oldest = time.monotonic()

    def flush_due(self, now: float) -> None:
        if self._oldest is not None and now - self._oldest >= EVENT_FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            self._oldest = None
            self._dispatcher.flush()

    def close(self) -> None:
        try:
            self.flush()
        except Exception as e:  # events are for monitoring: never fail a close over them
            log.debug("task-sent events not flushed: %s", e)
        finally:
            self._dispatcher.close()
            if self._dispatcher.connection is not None:
                self._dispatcher.connection.close()


class QueuedDispatcher(Dispatcher):
    """Dispatches calls through Celery + Redis; used when ``SWITCHBOARD_BROKER_URL`` is set."""

    def __init__(self, registry: Any, store: ArtifactStore, *, settings: Settings, app: Any = None) -> None:
        s = settings
        super().__init__(registry, store, default_timeout=s.call_timeout_s)
        self.settings = s
        self.app = app if app is not None else create_app(s, registry, producer=True)
        self._prefix = f"sb-{uuid.uuid4().hex[:12]}-"
        self._pattern = f"{RESULT_KEY_PREFIX}{self._prefix}*"
        self._redis = redis.Redis.from_url(
            result_backend_url(s), socket_connect_timeout=3, socket_timeout=10, socket_keepalive=True,
            health_check_interval=10, retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2))
        self._pending: dict[str, _Pending] = {}
        self._by_future: dict[cf.Future, str] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._subscribed = threading.Event()
        self._listener: threading.Thread | None = None
        self._sent_events = SentEvents(self.app) if self.app.conf.task_send_sent_event else None

    # -- the Dispatcher interface ---------------------------------------------------------------
    def timeout_for(self, expert: str) -> float:
        return orchestrator_deadline(self.registry.get_class(expert), self.settings.call_timeout_s) + SCHEDULER_SLACK_S

    def submit(self, call_id: str, expert: str, args: dict[str, Any], *, conversation_id: str | None,
               emit: EventSink) -> cf.Future:
        if self._closed.is_set():
            raise RuntimeError("the dispatcher is closed")
        cls = self.registry.get_class(expert)
        soft, hard = time_limits(cls, self.settings.call_timeout_s)
        wait_s = orchestrator_deadline(cls, self.settings.call_timeout_s)
        queue = queue_for(self.registry, expert)
        task_id = f"{self._prefix}{call_id}-{uuid.uuid4().hex[:16]}"
        fut: cf.Future = cf.Future()
        now = time.monotonic()
        pending = _Pending(task_id, call_id, expert, queue, soft, hard, wait_s, now + wait_s, emit, fut, seen=now)
        with self._lock:
            self._pending[task_id] = pending
            self._by_future[fut] = task_id
        self._ensure_listener()
        try:
            self.app.send_task(
                TASK_NAME, task_id=task_id, queue=queue, time_limit=hard, soft_time_limit=soft, expires=wait_s,
                kwargs={"expert": expert, "args": args, "call_id": call_id, "conversation_id": conversation_id},
                # What Flower and the logs show; also spares Celery a repr() of large arguments.
                argsrepr="()", kwargsrepr=f"{{expert: {expert}, call_id: {call_id}, conversation_id: {conversation_id}}}",
                declare=[], event_dispatcher=self._sent_events)
        except Exception as e:
            self._forget(task_id)
            raise RuntimeError(f"the broker at {redacted_url(broker_url(self.settings))} cannot be reached "
                               f"({type(e).__name__}: {e})") from e
        return fut

    def on_timeout(self, fut: cf.Future) -> None:
        with self._lock:
            task_id = self._by_future.get(fut)
        if task_id is not None:
            self._forget(task_id)
            self._revoke(task_id)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.join(timeout=2 * LISTEN_POLL_S + 1)
        with self._lock:
            left = list(self._pending.values())
        for p in left:
            self._settle(p, error="the dispatcher was closed before the call finished")
        try:
            if self._sent_events is not None:
                self._sent_events.close()
            self.app.close()
        finally:
            self._redis.close()

    # -- listening ------------------------------------------------------------------------------
    def _ensure_listener(self) -> None:
        if self._listener is None:
            with self._lock:
                if self._listener is None:
                    self._listener = threading.Thread(target=self._listen, name="switchboard-results", daemon=True)
                    self._listener.start()
        # A state published before we subscribe would be missed until the next catch-up read.
        self._subscribed.wait(SUBSCRIBE_WAIT_S)

    def _listen(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            pubsub = None
            try:
                pubsub = self._redis.pubsub()
                pubsub.psubscribe(self._pattern)
                while pubsub.get_message(timeout=LISTEN_POLL_S) is None and not self._closed.is_set():
                    pass  # the first message is the subscription's confirmation
                self._subscribed.set()
                if backoff > 0.1:
                    log.info("result listener reconnected to Redis")
                backoff = 0.1
                self._catch_up(quiet_for=0.0)  # whatever changed while we were not subscribed
                next_catch_up = time.monotonic() + CATCH_UP_EVERY_S
                while not self._closed.is_set():
                    msg = pubsub.get_message(timeout=LISTEN_POLL_S)
                    if msg is not None and msg.get("type") == "pmessage":
                        channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
                        self._on_state(channel[len(RESULT_KEY_PREFIX):], msg["data"])
                    now = time.monotonic()
                    if self._sent_events is not None:
                        self._sent_events.flush_due(now)
                    if now >= next_catch_up:
                        self._catch_up(quiet_for=CATCH_UP_EVERY_S)
                        next_catch_up = now + CATCH_UP_EVERY_S
                    self._check_deadlines()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                self._subscribed.clear()
                # once per outage at warning level, then quietly until it is back
                log.log(logging.WARNING if backoff <= 0.1 else logging.DEBUG,
                        "result listener lost Redis (%s); reconnecting", e)
                self._check_deadlines()
                self._closed.wait(backoff)
                backoff = min(2.0, backoff * 2)
            except Exception:  # never let a bad message end the listener
                log.exception("result listener error")
                self._closed.wait(0.5)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass

    def _catch_up(self, quiet_for: float) -> None:
        """Read the stored state of pending calls not heard of for ``quiet_for`` s (what pub/sub missed).

        Calls that are sending states are left to pub/sub, so their events keep their order.
        """
        now = time.monotonic()
        with self._lock:
            ids = [t for t, p in self._pending.items() if now - p.seen >= quiet_for]
        if not ids:
            return
        values = self._redis.mget([RESULT_KEY_PREFIX + t for t in ids])
        for task_id, raw in zip(ids, values, strict=True):
            if raw is not None:
                self._on_state(task_id, raw)

    def _on_state(self, task_id: str, raw: bytes | str) -> None:
        with self._lock:
            p = self._pending.get(task_id)
        if p is None:
            return
        p.seen = time.monotonic()
        if raw == p.last:  # a catch-up read of what pub/sub already delivered
            return
        p.last = raw
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError):
            log.warning("unreadable state for task %s", task_id)
            return
        status, info = meta.get("status"), meta.get("result")
        if status == "STARTED":
            info = info if isinstance(info, dict) else {}
            retry = int(info.get("retry") or 0)
            start = (retry, str(info.get("hostname") or "?"), info.get("pid"))
            if start in p.starts:
                return  # a late copy of a start already reported
            again = ", again: an earlier worker died" if any(r == retry for r, _, _ in p.starts) else ""
            again += f", retry {retry}" if retry else ""
            p.starts.add(start)
            p.worker = start[1]
            p.emit_event("started", message=f"on {p.worker} (pid {start[2]}){again}")
        elif status == "PROGRESS":
            info = info if isinstance(info, dict) else {}
            p.emit_event("progress", progress=info.get("progress"), message=str(info.get("message") or ""))
        elif status == "RETRY":
            _, msg = _exc_text(info)
            p.emit_event("progress", message=f"retrying after a transient error: {msg}")
        elif status == "SUCCESS":
            self._settle(p, result=info if isinstance(info, dict) else {"summary": str(info)})
        elif status == "FAILURE":
            self._settle(p, error=self._failure_message(p, info))
        elif status == "REVOKED":
            self._settle(p, error=f"{p.expert}: the call was revoked or expired before a worker ran it")

    def _failure_message(self, p: _Pending, info: Any) -> str:
        exc_type, msg = _exc_text(info)
        if exc_type == "CallFailed":
            return msg
        if exc_type == "TimeLimitExceeded":
            return (f"{p.expert}: exceeded its hard time limit of {p.hard:g} s; the worker killed the process "
                    "running it and goes on with a fresh one")
        if exc_type == "SoftTimeLimitExceeded":
            return f"{p.expert}: exceeded its time limit of {p.soft:g} s and was stopped"
        if exc_type == "WorkerLostError":
            return f"{p.expert}: the worker process running the call died ({msg})"
        return f"{p.expert} failed on the worker: {exc_type}: {msg}"

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [p for p in self._pending.values() if now >= p.deadline]
        for p in late:
            if p.worker is None:
                error = (f"{p.expert}: no worker took the call from queue {p.queue!r} within {p.wait_s:.0f} s; "
                         f"is a worker for it running (`switchboard worker --experts {p.expert}`)?")
            else:
                error = (f"{p.expert}: no result within {p.wait_s:.0f} s (the call was last seen on {p.worker}); "
                         "its worker may have died or be overloaded")
            self._settle(p, error=error)
            self._revoke(p.task_id)

    # -- bookkeeping ----------------------------------------------------------------------------
    def _forget(self, task_id: str) -> _Pending | None:
        with self._lock:
            p = self._pending.pop(task_id, None)
            if p is not None:
                self._by_future.pop(p.future, None)
            return p

    def _settle(self, p: _Pending, *, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        if self._forget(p.task_id) is None:
            return  # already settled (or timed out by the scheduler)
        try:
            if error is not None:
                p.future.set_exception(CallFailed(error))
            else:
                p.future.set_result(result)
        except cf.InvalidStateError:
            pass  # cancelled by the scheduler meanwhile

    def _revoke(self, task_id: str) -> None:
        """Tell live workers to drop the call (best effort; the message also expires by itself)."""
        try:
            self.app.control.revoke(task_id)
        except Exception as e:
            log.debug("revoke of %s failed: %s", task_id, e)
