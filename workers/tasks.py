"""The one task that runs any expert by name, on a worker.

A message carries ``expert``, ``args`` (JSON, artifact ids, never pixels), ``call_id`` and
``conversation_id``. The task:

0. checks that the call is still wanted: a call the orchestrator has given up on (REVOKED stored,
   or its queue or run deadline, carried in the message, has passed) is not run, and says so in the
   log. The check is atomic with the orchestrator's own give-up (workers.backend), so a call is
   either started in time or reported failed, never both;
1. counts this delivery in Redis (``switchboard:deliveries:<task id>:<retry>``). Late acks plus
   reject-on-worker-lost deliver a call again whenever its worker dies, so a call that kills every
   worker it lands on would loop forever; after ``worker_max_deliveries`` deaths it is pushed to
   the Redis list ``switchboard:dead`` and fails with "… killed its worker N times; dead-lettered".
   The count, the checks of 0 and 2 and STARTED are one round trip, before the call runs;
2. returns the stored result if an earlier delivery already finished (its ack was lost), so a
   redelivered call does not run twice;
3. runs the expert through ``orchestrator.dispatch.execute_call`` (the same code as the in-process
   dispatcher), having stored STARTED (in the same round trip as the count), and publishes progress
   as PROGRESS states; in a batching worker (``--batch-max``, threads pool) the run itself joins a
   batch of concurrent calls of the same expert (workers.batching);
4. retries transient errors (OSError: a store on a shared volume that blinks, a lost connection)
   with exponential backoff; a ``CallFailed`` (bad arguments, an expert's own error) is final.

The expert instance is the process-wide one from the registry, set up on its first call in the
process that runs it, so a model loads once per pool process and never in a prefork parent.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import redis
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger
from celery.worker.request import Request

from orchestrator.dispatch import CallFailed, execute_call
from switchboard.artifacts import ArtifactStore
from switchboard.settings import Settings
from workers.app import app
from workers.batching import BatchingRegistry, batching_applies, process_batchers
from workers.config import (
    DEAD_LETTER_KEY,
    DELIVERIES_KEY,
    TASK_NAME,
    result_backend_url,
    visibility_timeout,
    worker_registry,
)
from workers.routing import RETRY_MAX_S, max_hard_limit, time_limits

log = get_task_logger(__name__)

MAX_RETRIES = 3
RETRY_BASE_S = 0.5
PROGRESS_MIN_INTERVAL_S = 0.05
# OSErrors that retrying cannot fix.
PERMANENT_OS_ERRORS = (PermissionError, IsADirectoryError, NotADirectoryError)

_process: dict[str, Any] = {}


def _per_process(key: str, make: Any) -> Any:
    """A resource made once per process (a prefork child must not reuse its parent's sockets)."""
    pid = os.getpid()
    item = _process.get(key)
    if item is None or item[0] != pid:
        item = (pid, make())
        _process[key] = item
    return item[1]


def _settings() -> Settings:
    """The settings this worker process started with (workers.app reads them once; the CLI may adjust them)."""
    return app.switchboard_settings


def _redis() -> redis.Redis:
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    # Ride out a Redis restart of ~10 s rather than failing the call.
    # The result backend's Redis: task states live there, so our writes can share a round trip with
    # them; the delivery counts and the dead letters live there too.
    return _per_process("redis", lambda: redis.Redis.from_url(
        result_backend_url(_settings()), socket_connect_timeout=5, socket_keepalive=True, health_check_interval=10,
        retry=Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.1), 12)))


def _registry() -> Any:
    # The registry holds no sockets, so a prefork child may keep its parent's (experts are
    # constructed lazily, in the process that runs them).
    if "registry" not in _process:
        _process["registry"] = (os.getpid(), worker_registry(_settings()))
    return _process["registry"][1]


def _count_ttl() -> int:
    """How long a delivery count is kept: longer than any call can keep being redelivered, so the
    count is never forgotten while it matters, and short enough that finished calls' counts go
    away by themselves (no extra round trip to delete them)."""
    if "count_ttl" not in _process:
        s, reg = _settings(), _registry()
        per_delivery = visibility_timeout(s, reg) + max_hard_limit(reg, s.call_timeout_s)
        _process["count_ttl"] = (os.getpid(), int((s.worker_max_deliveries + 1) * per_delivery) + 60)
    return _process["count_ttl"][1]


def _store() -> ArtifactStore:
    return _per_process("store", lambda: ArtifactStore.from_settings(_settings()))


def is_transient(exc: BaseException | None) -> bool:
    """Errors worth retrying: I/O and connection errors, not an expert's own failure or bad input."""
    return isinstance(exc, OSError | redis.ConnectionError | redis.TimeoutError) and not isinstance(
        exc, PERMANENT_OS_ERRORS)


class ExpertRequest(Request):
    """A request that takes its expert's time limits when the message carries none.

    The queued dispatcher always sends them; this covers other senders (``celery call``, scripts).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(self.time_limits or ()):
            try:
                cls = _registry().get_class((self.kwargs or {}).get("expert"))
            except Exception:  # an unknown expert: the task itself reports it
                return
            soft, hard = time_limits(cls, _settings().call_timeout_s)
            self.time_limits = (hard, soft)


def _soft_limit(task: Any, expert: str) -> float | None:
    limits = task.request.timelimit or (None, None)
    if limits[1]:
        return float(limits[1])
    try:
        return time_limits(_registry().get_class(expert), _settings().call_timeout_s)[0]
    except Exception:
        return None


def _queue_state(pipe: Any, task: Any, state: str, info: dict[str, Any], request: Any = None) -> None:
    """Add a task-state write to ``pipe``, exactly as Celery's Redis backend stores and publishes it.

    ``request`` defaults to ``task.request``, which is thread-local: progress reported from a batch's
    thread (workers.batching) passes the request of the task it belongs to.

    Used for PROGRESS, in one round trip with no read first (a call still running has no SUCCESS
    stored). STARTED is stored by the backend's ``start_delivery``, which never overwrites a SUCCESS.
    """
    backend = task.backend
    request = request if request is not None else task.request
    meta = backend._get_result_meta(result=info, state=state, traceback=None, request=request)
    meta["task_id"] = request.id
    key, value = backend.get_key_for_task(request.id), backend.encode(meta)
    expires = int(backend.expires or 0)
    if expires > 0:
        pipe.setex(key, expires, value)
    else:
        pipe.set(key, value)
    pipe.publish(key, value)


def _progress_reporter(task: Any, started_at: float) -> Any:
    last = [0.0]
    request = task.request  # the batch thread that may call this has no task request of its own

    def progress(fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - last[0] < PROGRESS_MIN_INTERVAL_S:
            return  # an expert reporting every step must not flood Redis
        last[0] = now
        with _redis().pipeline(transaction=False) as pipe:
            # started_at: the start the orchestrator's run deadline counts from (workers.backend reads it)
            _queue_state(pipe, task, "PROGRESS", {"progress": fraction, "message": message,
                                                  "started_at": started_at}, request)
            pipe.execute()

    return progress


def dead_letter(r: redis.Redis, entry: dict[str, Any]) -> None:
    """Keep a call that kept killing its workers in ``switchboard:dead`` (newest first)."""
    r.lpush(DEAD_LETTER_KEY, json.dumps(entry, sort_keys=True))


# A worker refuses a call this much before the orchestrator's deadline for it, for clock skew between
# hosts (the orchestrator's own give-up is atomic with the worker's start: workers.backend).
DEADLINE_MARGIN_S = 0.5


@app.task(bind=True, name=TASK_NAME, Request=ExpertRequest, acks_late=True, reject_on_worker_lost=True,
          max_retries=MAX_RETRIES, throws=(CallFailed,))
def run_expert(self: Any, expert: str, args: dict[str, Any], call_id: str = "c0",
               conversation_id: str | None = None, deadlines: dict[str, float] | None = None) -> dict[str, Any]:
    """Run one call of ``expert`` and return its result as JSON (see the module doc).

    ``deadlines`` (sent by the queued dispatcher): ``queue_by`` (epoch s) is when the orchestrator gives
    up on a call no worker has started, ``queue_s`` the queue allowance (a retry gets it again), ``run_s``
    how long after a start the orchestrator waits for the result.
    """
    settings = _settings()
    r = _redis()
    task_id = self.request.id
    d = deadlines or {}
    counter = DELIVERIES_KEY.format(task_id=task_id, retries=self.request.retries)
    now = time.time()
    started = {"hostname": self.request.hostname, "pid": os.getpid(), "retry": self.request.retries,
               "started_at": now}
    # One round trip (workers.backend): count this delivery, read the stored state, and store STARTED
    # unless the call has a result or the orchestrator has given up on it; its answers decide.
    delivery, stored, verdict = self.backend.start_delivery(
        self.request, counter, _count_ttl(), started, now=now, queue_by=float(d.get("queue_by") or 0),
        run_s=float(d.get("run_s") or 0), margin=DEADLINE_MARGIN_S)
    if verdict == "abandoned":
        log.warning("call %s (%s, task %s) not run: the orchestrator has given up on it (it waited past its "
                    "deadline, or was reported failed)", call_id, expert, task_id)
        raise Ignore()
    return _run_counted(self, settings, r, delivery, stored, expert, args, call_id, conversation_id, d, now)


def _run_counted(self: Any, settings: Any, r: redis.Redis, delivery: int, stored: bytes | None,
                 expert: str, args: dict[str, Any], call_id: str, conversation_id: str | None,
                 deadlines: dict[str, float], started_at: float) -> dict[str, Any]:
    task_id = self.request.id
    prior = json.loads(stored) if stored else {}
    if prior.get("status") == "SUCCESS":
        log.warning("call %s (%s, task %s) already finished; returning its stored result", call_id, expert, task_id)
        return prior["result"]
    deaths = int(delivery) - 1
    if deaths >= settings.worker_max_deliveries:
        dead_letter(r, {
            "task_id": task_id, "expert": expert, "call_id": call_id, "conversation_id": conversation_id,
            "args": args, "deaths": deaths, "retries": self.request.retries, "time": time.time(),
            "queue": (self.request.delivery_info or {}).get("routing_key"), "hostname": self.request.hostname,
        })
        raise CallFailed(f"{expert}: call {call_id} killed its worker {deaths} times; dead-lettered "
                         f"(task {task_id}, kept in the Redis list {DEAD_LETTER_KEY})")
    registry = _registry()
    if deaths == 0 and batching_applies(settings):
        # Join a batch of concurrent calls of this expert (workers.batching). A redelivered call
        # (its worker died holding it) runs on its own, so it cannot take a batch down with it again.
        registry = BatchingRegistry(registry, process_batchers(settings.batch_max_size,
                                                               settings.batch_window_ms / 1000.0))
    try:
        result = execute_call(registry, _store(), expert, args, call_id=call_id,
                              conversation_id=conversation_id, progress=_progress_reporter(self, started_at))
    except (CallFailed, SoftTimeLimitExceeded) as e:
        cause = e if isinstance(e, SoftTimeLimitExceeded) else e.__cause__
        if isinstance(cause, SoftTimeLimitExceeded):
            limit = _soft_limit(self, expert)
            shown = f" of {limit:g} s" if limit else ""
            raise CallFailed(f"{expert}: exceeded its time limit{shown} and was stopped") from None
        if is_transient(cause) and self.request.retries < self.max_retries:
            countdown = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** self.request.retries) * random.uniform(0.8, 1.2)
            log.warning("call %s (%s): transient %r; retry %d of %d in %.1f s", call_id, expert, cause,
                        self.request.retries + 1, self.max_retries, countdown)
            kwargs = dict(self.request.kwargs or {})
            if deadlines.get("queue_s"):  # the retry waits in the queue again, with the same allowance
                kwargs["deadlines"] = {**deadlines, "queue_by": time.time() + countdown + float(deadlines["queue_s"])}
            raise self.retry(exc=e, countdown=countdown, kwargs=kwargs) from None
        raise
    return result
