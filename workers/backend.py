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
``send_start_delivery`` only sends that command, so that a first delivery (nothing to check before
it runs) can run while the command is on its way, and read the reply afterwards.

``install()`` (called when workers.config is imported) makes it the backend of ``redis://`` result
URLs in this process, the way workers.transport does for the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import states
from celery.app import backends as celery_backends
from celery.backends.base import BackendStoreError
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)

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
        keys, args = self._start_delivery_args(request, counter_key, counter_ttl, info)
        # Retried through a Redis restart like every write of this backend (result_backend_always_retry).
        count, stored = self.ensure(self._script(START_DELIVERY), (keys, args))
        self._start_script_loaded = True  # redis-py loaded it if Redis did not have it
        return int(count), stored or None

    _start_script_loaded = False

    def send_start_delivery(self, request: Any, counter_key: str, counter_ttl: int,
                            info: dict[str, Any]) -> Callable[[], tuple[int, bytes | None]]:
        """``start_delivery`` without waiting: send the command and return a function that reads its
        reply (call it exactly once; it returns what ``start_delivery`` returns).

        When this returns, the command has been written to Redis's socket, so it runs even if this
        process dies right after (the delivery is counted before the call can kill the process).
        The first time in a process (the script may not be loaded in Redis yet), or when it cannot be
        sent, the waiting ``start_delivery`` is used instead. If Redis has lost the script (it was
        restarted), nothing ran and the reply function runs ``start_delivery``: that one delivery is
        counted after its call, not before.
        """
        if not self._start_script_loaded:
            done = self.start_delivery(request, counter_key, counter_ttl, info)
            return lambda: done
        keys, args = self._start_delivery_args(request, counter_key, counter_ttl, info)
        sha = self._script(START_DELIVERY).sha
        pool = self.client.connection_pool
        conn = None
        try:
            conn = pool.get_connection()
            conn.send_command("EVALSHA", sha, len(keys), *keys, *args)
        except Exception as e:
            if conn is not None:
                conn.disconnect()
                pool.release(conn)
            log.debug("start of %s not sent (%s); waiting for it instead", request.id, e)
            done = self.start_delivery(request, counter_key, counter_ttl, info)
            return lambda: done

        def reply() -> tuple[int, bytes | None]:
            try:
                count, stored = conn.read_response()
            except NoScriptError:  # nothing ran: Redis lost the script (restart)
                pool.release(conn)
                self._start_script_loaded = False
                return self.start_delivery(request, counter_key, counter_ttl, info)
            except BaseException:
                conn.disconnect()
                pool.release(conn)
                raise
            pool.release(conn)
            return int(count), stored or None

        return reply

    def _start_delivery_args(self, request: Any, counter_key: str, counter_ttl: int,
                             info: dict[str, Any]) -> tuple[list[str], list[Any]]:
        task_id = request.id
        meta = self._get_result_meta(result=info, state=states.STARTED, traceback=None, request=request)
        meta["task_id"] = task_id
        value, expires = self._encoded(task_id, meta, states.STARTED)
        return [counter_key, self.get_key_for_task(task_id)], [counter_ttl, value, expires]

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
