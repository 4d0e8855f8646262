"""The queued dispatcher: runs a plan's calls on Celery workers, one queue per expert.

It shares the scheduler of ``orchestrator.dispatch.Dispatcher`` (dependencies, concurrency, time
limits) and only implements ``submit``: publish the call to its expert's queue and return a Future.

Results and progress come back through the Redis result backend. Celery stores each task state
under ``celery-task-meta-<task id>`` and publishes it on a channel of the same name; every task id of
this dispatcher starts with a per-dispatcher prefix, so one pattern subscription receives all of our
calls' states and nobody else's. A listener thread turns them into CallEvents (started, progress) and
settles the futures (done, failed). It survives Redis restarts: it reconnects with backoff,
resubscribes, and reads the stored states of all pending calls to catch up on what it missed.

Deadlines, one meaning each:

- **queue**: a call no worker has started within ``SWITCHBOARD_QUEUE_TIMEOUT_S`` fails with "queued
  N s behind M calls in queue 'q'; no worker free (…)" or "… no live worker serves it", the queue's
  depth and the workers' liveness (workers.liveness) read when it fails;
- **run**: a call that started has its expert's hard time limit plus ``RESULT_GRACE_S`` from its start
  (the worker stops it at the hard limit and reports "ran past its N s limit"; the orchestrator's
  deadline only fires when no result comes, and says whether the call's worker is alive). A call put
  back after its worker died (REQUEUED, workers.liveness) is queued again, with a new queue deadline.

Giving up is atomic with the workers' start (workers.backend ``ABANDON`` / ``START_DELIVERY``): the
orchestrator stores REVOKED unless a worker has started the call in time, in which case it waits for
that run instead; a worker never starts a call once REVOKED is stored or its deadline (carried in the
message) has passed. So a call reported failed never runs afterwards, even when Redis was down at the
deadline. Deadlines are checked on their own thread, which never waits on Redis for more than
``SWITCHBOARD_BROKER_TIMEOUT_S``; while the broker cannot be reached, submits and give-ups fail at
once with "the broker at … cannot be reached" (for ``BROKER_RECHECK_S`` after a failure), so a plan's
calls are reported together, not one broker timeout after another.

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
from kombu.exceptions import OperationalError
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from orchestrator.dispatch import CallEvent, CallFailed, Dispatcher, EventSink
from switchboard.artifacts import ArtifactStore
from switchboard.settings import Settings
from workers.backend import ABANDON, REQUEUED, revoked_meta
from workers.config import (
    EVENT_FLUSH_INTERVAL_S,
    RESULT_KEY_PREFIX,
    TASK_NAME,
    broker_url,
    create_app,
    redacted_url,
    result_backend_url,
)
from workers.liveness import live_workers
from workers.routing import RETRY_MAX_S, orchestrator_deadline, queue_for, time_limits

log = logging.getLogger(__name__)

# run_plan's own deadline (a backstop) comes this much after the longest ours can be.
SCHEDULER_SLACK_S = 5.0
LISTEN_POLL_S = 0.1
CATCH_UP_EVERY_S = 1.0
DEADLINE_TICK_S = 0.1
# After the broker failed once, submits and give-ups fail at once for this long (then it is tried again).
BROKER_RECHECK_S = 1.0


@dataclass
class _Pending:
    task_id: str
    call_id: str
    expert: str
    queue: str
    soft: float
    hard: float
    queue_s: float
    run_s: float
    queue_by: float  # epoch s: when a call no worker has started is given up (the message carries it)
    deadline: float  # monotonic: when the watcher looks at the call next (queue or run deadline)
    emit: EventSink
    future: cf.Future
    submitted: float = 0.0  # monotonic
    queued_since: float = 0.0  # monotonic: submitted, or put back after its worker died
    running: bool = False
    started_at: float = 0.0  # epoch s of the start the run deadline counts from
    last: bytes | str | None = None
    seen: float = 0.0  # monotonic time of the last state received
    worker: str | None = None
    died_on: str | None = None  # the worker that died holding the call, if one did
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


def _mono(epoch: float) -> float:
    """The monotonic time of a wall-clock time (deadlines travel as epoch seconds)."""
    return time.monotonic() + (epoch - time.time())


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
            result_backend_url(s), socket_connect_timeout=min(3.0, s.broker_timeout_s), socket_timeout=10,
            socket_keepalive=True, health_check_interval=10,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 2))
        # The deadline watcher's: short timeouts, no retries (it must never wait long on a broker that is down).
        self._quick = redis.Redis.from_url(
            result_backend_url(s), socket_connect_timeout=s.broker_timeout_s, socket_timeout=s.broker_timeout_s)
        self._broker = redis.Redis.from_url(
            broker_url(s), socket_connect_timeout=s.broker_timeout_s, socket_timeout=s.broker_timeout_s)
        self._abandon = self._quick.register_script(ABANDON)
        self._pending: dict[str, _Pending] = {}
        self._by_future: dict[cf.Future, str] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._subscribed = threading.Event()
        self._listener: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._broker_error: str | None = None  # why the broker failed last, while BROKER_RECHECK_S lasts
        self._broker_down_until = 0.0
        self._sent_events = SentEvents(self.app) if self.app.conf.task_send_sent_event else None

    # -- the Dispatcher interface ---------------------------------------------------------------
    def _limits(self, expert: str) -> tuple[float, float, float]:
        """(soft, hard, run allowance) of a call of ``expert``."""
        cls = self.registry.get_class(expert)
        soft, hard = time_limits(cls, self.settings.call_timeout_s)
        return soft, hard, orchestrator_deadline(cls, self.settings.call_timeout_s)

    def timeout_for(self, expert: str) -> float:
        """The scheduler's backstop: later than any deadline of ours can be (each rerun after a worker died
        gets its queue and run time again), so the errors below are the ones reported."""
        _, _, run_s = self._limits(expert)
        per_try = self.settings.queue_timeout_s + run_s + RETRY_MAX_S + self.settings.worker_liveness_timeout_s
        return (self.settings.worker_max_deliveries + 1) * per_try + SCHEDULER_SLACK_S

    def _broker_unreachable(self, e: BaseException | str) -> str:
        why = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
        return f"the broker at {redacted_url(broker_url(self.settings))} cannot be reached ({why})"

    def _mark_broker_down(self, e: BaseException) -> None:
        self._broker_error = f"{type(e).__name__}: {e}"
        self._broker_down_until = time.monotonic() + BROKER_RECHECK_S

    def submit(self, call_id: str, expert: str, args: dict[str, Any], *, conversation_id: str | None,
               emit: EventSink) -> cf.Future:
        if self._closed.is_set():
            raise RuntimeError("the dispatcher is closed")
        soft, hard, run_s = self._limits(expert)
        queue = queue_for(self.registry, expert)
        if time.monotonic() < self._broker_down_until:  # failed a moment ago: do not wait for it again
            raise RuntimeError(self._broker_unreachable(self._broker_error or "down"))
        task_id = f"{self._prefix}{call_id}-{uuid.uuid4().hex[:16]}"
        fut: cf.Future = cf.Future()
        now, queue_s = time.monotonic(), self.settings.queue_timeout_s
        queue_by = time.time() + queue_s
        pending = _Pending(task_id, call_id, expert, queue, soft, hard, queue_s, run_s, queue_by, now + queue_s,
                           emit, fut, submitted=now, queued_since=now, seen=now)
        with self._lock:
            self._pending[task_id] = pending
            self._by_future[fut] = task_id
        self._ensure_threads()
        try:
            self.app.send_task(
                TASK_NAME, task_id=task_id, queue=queue, time_limit=hard, soft_time_limit=soft,
                kwargs={"expert": expert, "args": args, "call_id": call_id, "conversation_id": conversation_id,
                        "deadlines": {"queue_by": queue_by, "queue_s": queue_s, "run_s": run_s}},
                # What Flower and the logs show; also spares Celery a repr() of large arguments.
                argsrepr="()", kwargsrepr=f"{{expert: {expert}, call_id: {call_id}, conversation_id: {conversation_id}}}",
                declare=[], event_dispatcher=self._sent_events, retry_policy=self._publish_retry)
        except Exception as e:
            self._forget(task_id)
            if not isinstance(e, OperationalError | redis.RedisError | OSError):
                raise RuntimeError(f"the call could not be sent ({type(e).__name__}: {e})") from e
            self._mark_broker_down(e)
            raise RuntimeError(self._broker_unreachable(e)) from e
        return fut

    @property
    def _publish_retry(self) -> dict[str, Any]:
        # One quick retry (a pooled connection from before a Redis restart fails once); the socket
        # timeouts (broker_timeout_s, workers.config) bound each try.
        return {"max_retries": 1, "interval_start": 0.1, "interval_step": 0.1, "interval_max": 0.1}

    def on_timeout(self, fut: cf.Future) -> None:
        """The scheduler's backstop fired (it should not: our deadlines come first): give the call up."""
        with self._lock:
            task_id = self._by_future.get(fut)
            p = self._pending.get(task_id) if task_id else None
        if p is not None:
            p.deadline = time.monotonic()
            self._check_deadlines(force={p.task_id})

    def cancel_queued(self, fut: cf.Future) -> bool:
        """Give up a call no worker has started (its turn was cancelled), atomically with the workers'
        start (ABANDON, as at closing): True when it will never run; False when it has started (or the
        broker cannot say), and it is waited for as usual."""
        with self._lock:
            task_id = self._by_future.get(fut)
            p = self._pending.get(task_id) if task_id else None
        if p is None or p.running:
            return False
        now = time.time()  # queue_by = now: a call not started is late at once
        try:
            given_up, _ = self._abandon(
                keys=[RESULT_KEY_PREFIX + p.task_id],
                args=[json.dumps(revoked_meta(p.task_id, "given up by the orchestrator: the turn was cancelled")),
                      int(self.app.conf.result_expires.total_seconds()
                          if hasattr(self.app.conf.result_expires, "total_seconds")
                          else self.app.conf.result_expires or 0),
                      repr(now), repr(now), repr(p.run_s)],
                client=self._quick)
        except (redis.RedisError, OSError):
            return False
        if not given_up:
            return False
        self._settle(p, error=f"{p.expert}: not run: the turn was cancelled")
        return True

    def close(self) -> None:
        self._closed.set()
        for t in (self._listener, self._watcher):
            if t is not None:
                t.join(timeout=2 * LISTEN_POLL_S + 1)
        with self._lock:
            left = list(self._pending.values())
        if left:  # give them up (so no worker runs them for nobody), as far as the broker lets us
            self._give_up(left, closing=True)
        try:
            if self._sent_events is not None:
                self._sent_events.close()
            self.app.close()
        finally:
            for client in (self._redis, self._quick, self._broker):
                client.close()

    # -- listening ------------------------------------------------------------------------------
    def _ensure_threads(self) -> None:
        first = self._listener is None
        if first:
            with self._lock:
                if self._listener is None:
                    self._listener = threading.Thread(target=self._listen, name="switchboard-results", daemon=True)
                    self._listener.start()
                    self._watcher = threading.Thread(target=self._watch, name="switchboard-deadlines",
                                                     daemon=True)
                    self._watcher.start()
            # A state published before we subscribe is read by the catch-up after subscribing anyway; the
            # first call waits for the subscription (bounded) only to get its events without that delay.
            self._subscribed.wait(self.settings.broker_timeout_s)

    def _watch(self) -> None:
        while not self._closed.wait(DEADLINE_TICK_S):
            try:
                self._check_deadlines()
            except Exception:  # never let one bad call stop the deadlines of the others
                log.exception("deadline watcher error")

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
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                self._subscribed.clear()
                # once per outage at warning level, then quietly until it is back
                log.log(logging.WARNING if backoff <= 0.1 else logging.DEBUG,
                        "result listener lost Redis (%s); reconnecting", e)
                self._closed.wait(backoff)
                backoff = min(1.0, backoff * 2)
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
        if status in ("STARTED", "PROGRESS"):
            info = info if isinstance(info, dict) else {}
            started_at = info.get("started_at")
            if isinstance(started_at, int | float) and started_at > p.started_at:
                # the run deadline counts from this start (the worker checks the same number)
                p.running, p.started_at = True, float(started_at)
                p.deadline = _mono(p.started_at + p.run_s)
        if status == "STARTED":
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
            p.emit_event("progress", progress=info.get("progress"), message=str(info.get("message") or ""))
        elif status == "RETRY":
            _, msg = _exc_text(info)
            # queued again after the retry's backoff, with its queue time again (workers.tasks)
            p.running, p.queued_since = False, time.monotonic()
            p.deadline = time.monotonic() + RETRY_MAX_S * 1.2 + p.queue_s
            p.queue_by = time.time() + RETRY_MAX_S * 1.2 + p.queue_s
            p.emit_event("progress", message=f"retrying after a transient error: {msg}")
        elif status == REQUEUED:
            info = info if isinstance(info, dict) else {}
            by = info.get("queue_by")
            if isinstance(by, int | float):
                p.running, p.queue_by, p.deadline = False, float(by), _mono(float(by))
                p.queued_since = time.monotonic()
            p.died_on = str(info.get("worker") or p.worker or "?")
            p.emit_event("progress", message=f"its worker {p.died_on} died; the call is back at the front of "
                                             f"queue {p.queue!r}")
        elif status == "SUCCESS":
            self._settle(p, result=info if isinstance(info, dict) else {"summary": str(info)})
        elif status == "FAILURE":
            self._settle(p, error=self._failure_message(p, info))
        elif status == "REVOKED":
            # Given up: by us (the watcher settles it), or by a worker that found it too late to start
            # (our deadline is due within DEADLINE_MARGIN_S): the watcher reports it with the facts now.
            p.deadline = min(p.deadline, time.monotonic())

    def _failure_message(self, p: _Pending, info: Any) -> str:
        exc_type, msg = _exc_text(info)
        if exc_type == "CallFailed":
            return msg
        if exc_type == "TimeLimitExceeded":
            return (f"{p.expert}: ran past its hard time limit of {p.hard:g} s; the worker killed the process "
                    "running it and goes on with a fresh one")
        if exc_type == "SoftTimeLimitExceeded":
            return f"{p.expert}: exceeded its time limit of {p.soft:g} s and was stopped"
        if exc_type == "WorkerLostError":
            return f"{p.expert}: the worker process running the call died ({msg})"
        return f"{p.expert} failed on the worker: {exc_type}: {msg}"

    # -- deadlines ------------------------------------------------------------------------------
    def _check_deadlines(self, force: set[str] | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            late = [p for p in self._pending.values() if now >= p.deadline or (force and p.task_id in force)]
        if late:
            self._give_up(late)

    def _give_up(self, late: list[_Pending], *, closing: bool = False) -> None:
        """Give up on calls past their deadline: atomically with the workers' start (ABANDON), so each is
        either reported failed and never runs, or found started in time and waited for."""
        now = time.monotonic()
        if now < self._broker_down_until and not closing:
            for p in late:
                self._settle(p, error=self._late_message(p, broker=self._broker_error or "down"))
            return
        try:
            pipe = self._quick.pipeline(transaction=False)
            wall = time.time()  # one clock reading: "now" must not come before a closing call's "deadline"
            for p in late:
                reason = ("the orchestrator was closed" if closing else
                          ("ran past its limit" if p.running else "waited in its queue past its deadline"))
                self._abandon(keys=[RESULT_KEY_PREFIX + p.task_id],
                              args=[json.dumps(revoked_meta(p.task_id, f"given up by the orchestrator: {reason}")),
                                    int(self.app.conf.result_expires.total_seconds()
                                        if hasattr(self.app.conf.result_expires, "total_seconds")
                                        else self.app.conf.result_expires or 0),
                                    # closing: a call still queued is given up now (it would run for nobody)
                                    repr(wall), repr(wall if closing else p.queue_by), repr(p.run_s)],
                              client=pipe)
            replies = pipe.execute()
            facts = {} if closing else self._facts({p.queue for p in late if not p.running})
        except (redis.RedisError, OSError) as e:
            self._mark_broker_down(e)
            for p in late:
                self._settle(p, error="the dispatcher was closed before the call finished" if closing
                             else self._late_message(p, broker=self._broker_error))
            return
        for p, (given_up, current) in zip(late, replies, strict=True):
            if closing:
                self._settle(p, error="the dispatcher was closed before the call finished")
            elif given_up:
                self._settle(p, error=self._late_message(p, facts=facts))
            elif current is not None:
                meta = json.loads(current)
                if meta.get("status") == "REVOKED":  # a worker found it too late to start: the same failure
                    self._settle(p, error=self._late_message(p, facts=facts))
                else:  # a result, a start in time, or a requeue that we had not heard of yet
                    p.last = None
                    self._on_state(p.task_id, current)
            # else: not late by Redis's reckoning yet (clocks a tick apart): looked at again next tick

    def _facts(self, queues: set[str]) -> dict[str, Any]:
        """Queue depths and the live workers, for the errors (empty where the broker does not answer)."""
        out: dict[str, Any] = {"depth": {}, "workers": None}
        try:
            if queues:
                pipe = self._broker.pipeline(transaction=False)
                names = sorted(queues)
                for q in names:
                    pipe.llen(q)
                out["depth"] = dict(zip(names, pipe.execute(), strict=True))
            out["workers"] = live_workers(self._broker)
        except (redis.RedisError, OSError) as e:
            log.debug("queue facts not read: %s", e)
        return out

    def _late_message(self, p: _Pending, *, facts: dict[str, Any] | None = None, broker: str | None = None) -> str:
        now = time.monotonic()
        if broker is not None:
            what = f"ran {time.time() - p.started_at:.0f} s" if p.running else f"queued {now - p.queued_since:.0f} s"
            return f"{p.expert}: {what} with no result and {self._broker_unreachable(broker)}"
        facts = facts or {}
        workers = facts.get("workers")
        if p.running:
            where = p.worker or "?"
            if workers is None:
                alive = ""
            elif any(w.get("hostname") == where for w in workers.values()):
                alive = f"; {where} is alive but sent no result"
            else:
                alive = f"; {where} is no longer alive and no other worker reran the call in time"
            return (f"{p.expert}: ran past its {p.run_s:.0f} s limit with no result (started on {where}, "
                    f"{time.time() - p.started_at:.0f} s ago){alive}")
        waited = now - p.queued_since
        depth = (facts.get("depth") or {}).get(p.queue)
        waiting = f", {depth} call(s) waiting there" if depth is not None else ""
        died = f", back in the queue after {p.died_on} died" if p.died_on else ""
        head = f"{p.expert}: queued {waited:.0f} s in queue {p.queue!r}{waiting}{died}"
        if workers is None:
            return f"{head}; no worker took it (worker liveness could not be read)"
        serving = [w for w in workers.values() if p.queue in (w.get("queues") or [])]
        if not serving:
            return (f"{head}; no live worker serves it: is a worker for it running "
                    f"(`switchboard worker --experts {p.expert}`)?")
        held = sum(int(w.get("held") or 0) for w in serving)
        slots = sum(int(w.get("concurrency") or 1) for w in serving)
        names = ", ".join(sorted(str(w.get("hostname")) for w in serving)[:4])
        return (f"{head}; no worker free ({len(serving)} live worker(s) serve it with {slots} slot(s), holding "
                f"{held} call(s): {names})")

    # -- bookkeeping ----------------------------------------------------------------------------
    def _forget(self, task_id: str) -> _Pending | None:
        with self._lock:
            p = self._pending.pop(task_id, None)
            if p is not None:
                self._by_future.pop(p.future, None)
            return p

    def _settle(self, p: _Pending, *, result: dict[str, Any] | None = None, error: str | None = None) -> None:
        if self._forget(p.task_id) is None:
            return  # already settled
        try:
            if error is not None:
                p.future.set_exception(CallFailed(error))
            else:
                p.future.set_result(result)
        except cf.InvalidStateError:
            pass  # cancelled by the scheduler meanwhile
