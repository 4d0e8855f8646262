"""Celery's Redis result backend, with each task-state write one round trip and one command.

Celery's ``_store_result`` first GETs the stored state (so that nothing overwrites a SUCCESS: a call
redelivered after its ack was lost must not replace the result), then SETs and PUBLISHes the new one
in a MULTI/EXEC pipeline. Here a server-side script does the same check, the write and the publish
atomically, in one EVALSHA: one round trip and one command for the worker to pack and parse instead
of six, and no window between the check and the write. A REVOKED state is final too: it is what the
orchestrator stores when it gives up on a call (``ABANDON``), so a call that finishes after that has
its result discarded (and the worker logs it) instead of stored.

What is stored and published is byte for byte what Celery's backend stores (same key, same JSON,
same expiry), so the orchestrator, ``AsyncResult`` and Flower read it as before.

``start_delivery`` does the first round trip of every delivery of a call (workers.tasks) the same
way, and is where a worker decides whether the call is still wanted, atomically with the
orchestrator's ``ABANDON``: count the delivery, read the stored state, and either store STARTED (the
call runs), or find a SUCCESS (return it), or find that the orchestrator has given up or will have
by now (REVOKED stored, or its queue or run deadline passed: the call is not run). Either the
worker's STARTED or the orchestrator's REVOKED lands first, never both.

``install()`` (called when workers.config is imported) makes it the backend of ``redis://`` result
URLs in this process, the way workers.transport does for the broker.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import states
from celery.app import backends as celery_backends
from celery.backends.base import BackendStoreError
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from kombu.utils.encoding import bytes_to_str

log = logging.getLogger(__name__)

# KEYS[1]: the task's meta key; ARGV[1]: the encoded meta; ARGV[2]: expiry in seconds (0: none).
# Returns 1 when stored and published, 0 when a SUCCESS was already stored, -1 when a REVOKED was
# (the orchestrator gave up on the call); nothing is written then.
STORE_UNLESS_FINAL = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' then
    if meta['status'] == 'SUCCESS' then return 0 end
    if meta['status'] == 'REVOKED' then return -1 end
  end
end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then
  redis.call('SETEX', KEYS[1], ttl, ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
# The verdict on a stored state at time ``now`` (shared by START_DELIVERY and ABANDON): 'done' (a
# SUCCESS), 'final' (FAILURE or REVOKED), 'running' (STARTED or PROGRESS within ``run_s`` of the
# start it records), 'late' (the call would start or is running past what the orchestrator waits for).
VERDICT = """
local function verdict(current, now, queue_by, run_s, margin)
  local meta = nil
  if current then
    local ok, m = pcall(cjson.decode, current)
    if ok and type(m) == 'table' then meta = m end
  end
  local status = meta and meta['status']
  if status == 'SUCCESS' then return 'done' end
  if status == 'REVOKED' then return 'final' end
  if (status == 'STARTED' or status == 'PROGRESS') and type(meta['result']) == 'table' then
    local started = tonumber(meta['result']['started_at'])
    if started then
      if run_s > 0 and now >= started + run_s - margin then return 'late' end
      return 'running'
    end
  end
  if status == 'REQUEUED' and type(meta['result']) == 'table' then
    -- put back by a sweeper after its worker died (workers.liveness): queued again, with a new deadline
    local by = tonumber(meta['result']['queue_by'])
    if by and now >= by - margin then return 'late' end
    return 'queued'
  end
  if status == 'FAILURE' then return 'final' end
  if queue_by > 0 and now >= queue_by - margin then return 'late' end
  return 'queued'
end
"""
# KEYS[1]: the delivery counter; KEYS[2]: the task's meta key. ARGV[1]: the counter's TTL in seconds;
# ARGV[2], ARGV[3]: the STARTED meta and its expiry; ARGV[4]: now (epoch s); ARGV[5]: the queue deadline
# (epoch s, 0: none); ARGV[6]: the run allowance from a start (s, 0: none); ARGV[7]: margin (s);
# ARGV[8]: the REVOKED meta stored when the call is too late to run.
# Returns {count, stored meta or false, 'run' | 'done' | 'abandoned'}. A FAILURE stored by an earlier
# delivery whose ack was lost does not stop a rerun (as before): only REVOKED and lateness do.
START_DELIVERY = VERDICT + """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
local current = redis.call('GET', KEYS[2])
local v = verdict(current, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]))
local ttl = tonumber(ARGV[3])
local function store(value)
  if ttl and ttl > 0 then redis.call('SETEX', KEYS[2], ttl, value) else redis.call('SET', KEYS[2], value) end
  redis.call('PUBLISH', KEYS[2], value)
end
if v == 'done' then return {count, current, 'done'} end
if v == 'late' then
  store(ARGV[8])
  return {count, current, 'abandoned'}
end
if v == 'final' then
  local ok, meta = pcall(cjson.decode, current)
  if meta['status'] == 'REVOKED' then return {count, current, 'abandoned'} end
end
store(ARGV[2])
return {count, current, 'run'}
"""
# The orchestrator giving up on a call (workers.dispatch). KEYS[1]: the task's meta key; ARGV[1]: the
# REVOKED meta; ARGV[2]: its expiry; ARGV[3]: now; ARGV[4]: the call's queue deadline (epoch s);
# ARGV[5]: its run allowance (s). Stores REVOKED only if the call is late: not if it has a result, or
# started within its run allowance (a worker took it just in time: the orchestrator waits for it
# instead), or was put back in its queue with a later deadline (REQUEUED).
# Returns {1 (given up) or 0 (not: read the stored meta), stored meta or false}.
ABANDON = VERDICT + """
local current = redis.call('GET', KEYS[1])
local v = verdict(current, tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), 0)
if v ~= 'late' then return {0, current} end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then redis.call('SETEX', KEYS[1], ttl, ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return {1, current}
"""

# A sweeper putting back a dead worker's call (workers.liveness). KEYS[1]: the task's meta key; ARGV[1]:
# the REQUEUED meta; ARGV[2]: its expiry. Stored unless the call has a final state. Returns 1 if stored.
REQUEUE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' then
    local s = meta['status']
    if s == 'SUCCESS' or s == 'FAILURE' or s == 'REVOKED' then return 0 end
  end
end
local ttl = tonumber(ARGV[2])
if ttl and ttl > 0 then redis.call('SETEX', KEYS[1], ttl, ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
REQUEUED = "REQUEUED"


def revoked_meta(task_id: str, reason: str) -> dict[str, Any]:
    """The REVOKED state Celery's backend would store for ``task_id``, with ``reason`` as its message."""
    return {"status": "REVOKED", "task_id": task_id, "traceback": None, "children": [],
            "date_done": datetime.now(UTC).isoformat(),
            "result": {"exc_type": "TaskRevokedError", "exc_module": "celery.exceptions", "exc_message": [reason]}}


class RedisBackend(CeleryRedisBackend):
    """Redis result backend whose state writes are one atomic script call (see the module doc)."""

    _scripts: dict[str, Any] | None = None

    def _script(self, source: str) -> Any:
        if self._scripts is None:
            self._scripts = {}
        if source not in self._scripts:
            # EVALSHA, falling back to EVAL once after a Redis restart has flushed the script cache.
            self._scripts[source] = self.client.register_script(source)
        return self._scripts[source]

    def _encoded(self, task_id: str, meta: dict[str, Any], state: str) -> tuple[Any, int]:
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        return value, int((self.failure_expires if state == states.FAILURE else self.expires) or 0)

    def store_state(self, task_id: str, meta: dict[str, Any], state: str) -> int:
        """Store and publish ``meta`` unless a SUCCESS (0) or a REVOKED (-1) is stored there; 1 if written."""
        value, expires = self._encoded(task_id, meta, state)
        return int(self._script(STORE_UNLESS_FINAL)(keys=[self.get_key_for_task(task_id)], args=[value, expires]))

    def start_delivery(self, request: Any, counter_key: str, counter_ttl: int, info: dict[str, Any], *,
                       now: float, queue_by: float = 0.0, run_s: float = 0.0,
                       margin: float = 0.0) -> tuple[int, bytes | None, str]:
        """Count a delivery of ``request``'s task and decide whether it runs (see the module doc):
        (deliveries so far, the stored meta as it was before or None, 'run' | 'done' | 'abandoned').
        On 'run', STARTED (``info``) is stored; on 'abandoned' because it is late, REVOKED."""
        task_id = request.id
        meta = self._get_result_meta(result=info, state=states.STARTED, traceback=None, request=request)
        meta["task_id"] = task_id
        value, expires = self._encoded(task_id, meta, states.STARTED)
        late = self.encode(revoked_meta(task_id, "too late to run: the orchestrator has given up on the call"))
        keys = [counter_key, self.get_key_for_task(task_id)]
        args = [counter_ttl, value, expires, repr(now), repr(queue_by), repr(run_s), repr(margin), late]
        # Retried through a Redis restart like every write of this backend (result_backend_always_retry).
        count, stored, verdict = self.ensure(self._script(START_DELIVERY), (keys, args))
        return int(count), stored or None, bytes_to_str(verdict)

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        # Retried on connection errors like Celery's own writes (result_backend_always_retry).
        written = self.ensure(self.store_state, (task_id, meta, state))
        if written < 0 and state == states.SUCCESS:
            arts = [a.get("id") for a in (result or {}).get("artifacts", []) if isinstance(a, dict)]
            log.warning("task %s finished after the orchestrator gave up on it: its result is discarded%s",
                        task_id, f"; its artifacts {', '.join(map(str, arts))} are left unreferenced" if arts else "")
        return result


def install() -> None:
    """Use this backend for ``redis://`` result URLs in this process."""
    path = f"{__name__}:RedisBackend"
    for scheme in ("redis", "rediss"):
        celery_backends.BACKEND_ALIASES[scheme] = path
