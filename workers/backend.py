"""Celery's Redis result backend, with each task-state write one round trip and one command.

Celery's ``_store_result`` first GETs the stored state (so that nothing overwrites a SUCCESS: a call
redelivered after its ack was lost must not replace the result), then SETs and PUBLISHes the new one
in a MULTI/EXEC pipeline. Here a server-side script does the same check, the write and the publish
atomically, in one EVALSHA: one round trip and one command for the worker to pack and parse instead
of six, and no window between the check and the write.

What is stored and published is byte for byte what Celery's backend stores (same key, same JSON,
same expiry), so the orchestrator, ``AsyncResult`` and Flower read it as before.

``start_delivery`` does the first round trip of every delivery of a call (workers.tasks) the same
way: count the delivery, read the stored state, store and publish STARTED unless a SUCCESS is stored.

``install()`` (called when workers.config is imported) makes it the backend of ``redis://`` result
URLs in this process, the way workers.transport does for the broker.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.app import backends as celery_backends
from celery.backends.base import BackendStoreError
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from kombu.utils.encoding import bytes_to_str

# KEYS[1]: the task's meta key; ARGV[1]: the encoded meta; ARGV[2]: expiry in seconds (0: none).
# Returns 1 when stored and published, 0 when a SUCCESS was already stored (nothing is written).
STORE_UNLESS_SUCCESS = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
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
# KEYS[1]: the delivery counter; KEYS[2]: the task's meta key; ARGV[1]: the counter's TTL in seconds;
# ARGV[2], ARGV[3]: the STARTED meta and its expiry, as above. Returns {count, stored meta or false}.
START_DELIVERY = """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
local current = redis.call('GET', KEYS[2])
local done = false
if current then
  local ok, meta = pcall(cjson.decode, current)
  done = ok and type(meta) == 'table' and meta['status'] == 'SUCCESS'
end
if not done then
  local ttl = tonumber(ARGV[3])
  if ttl and ttl > 0 then
    redis.call('SETEX', KEYS[2], ttl, ARGV[2])
  else
    redis.call('SET', KEYS[2], ARGV[2])
  end
  redis.call('PUBLISH', KEYS[2], ARGV[2])
end
return {count, current}
"""


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
        """Store and publish ``meta`` unless a SUCCESS is stored there; 1 if written, 0 if not."""
        value, expires = self._encoded(task_id, meta, state)
        return int(self._script(STORE_UNLESS_SUCCESS)(keys=[self.get_key_for_task(task_id)], args=[value, expires]))

    def start_delivery(self, request: Any, counter_key: str, counter_ttl: int,
                       info: dict[str, Any]) -> tuple[int, bytes | None]:
        """Count a delivery of ``request``'s task and store STARTED (``info``) unless it already
        succeeded: (deliveries so far, the stored meta as it was before, or None)."""
        task_id = request.id
        meta = self._get_result_meta(result=info, state=states.STARTED, traceback=None, request=request)
        meta["task_id"] = task_id
        value, expires = self._encoded(task_id, meta, states.STARTED)
        keys, args = [counter_key, self.get_key_for_task(task_id)], [counter_ttl, value, expires]
        # Retried through a Redis restart like every write of this backend (result_backend_always_retry).
        count, stored = self.ensure(self._script(START_DELIVERY), (keys, args))
        return int(count), stored or None

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        # Retried on connection errors like Celery's own writes (result_backend_always_retry).
        self.ensure(self.store_state, (task_id, meta, state))
        return result


def install() -> None:
    """Use this backend for ``redis://`` result URLs in this process."""
    path = f"{__name__}:RedisBackend"
    for scheme in ("redis", "rediss"):
        celery_backends.BACKEND_ALIASES[scheme] = path
