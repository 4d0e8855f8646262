"""Worker liveness: a heartbeat per worker, and the sweep that reruns a dead worker's calls in seconds.

Celery on Redis hands a call whose whole worker vanished (kill -9, a host lost) to another worker only
after the broker's visibility timeout, which must exceed the longest call (minutes). Here every worker
main process, on its own thread:

- every ``HEARTBEAT_S`` sets ``switchboard:alive:<id>`` with a TTL of ``worker_liveness_timeout_s`` and
  its entry in the hash ``switchboard:workers`` (hostname, queues, concurrency);
- records every message it takes in ``switchboard:held:<id>`` (workers.transport), until it acks it
  or puts it back;
- sweeps: a worker of the hash whose alive key this process has seen missing for ``CONFIRM_S`` in a
  row is dead; every message it held is put back at the *front* of its queue (with kombu's own
  restore, a WATCH transaction on the unacked hash, so two sweepers never both restore one message),
  marked redelivered so the task counts the death (workers.tasks).

Observing the key missing *in a row*, from this process, is what keeps a Redis restart from looking
like every worker died: keys expire by the clock while Redis is down, but the sweep forgets what it saw
on any Redis error, and live workers set their keys again within a second of Redis coming back.

The visibility timeout stays, as the safety net (a message whose holder was never recorded).
The orchestrator reads the same keys to say in an error whether a live worker serves a queue.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import redis
from celery import bootsteps

from workers import transport

log = logging.getLogger(__name__)

# The heartbeat thread runs in the prefork parent, which forks pool processes at any time (a new
# worker, a process that died). A fork copies only the forking thread: a lock the heartbeat thread held
# at that moment (logging, an import, a stream, Celery's app) would stay held in the child forever. So
# the thread does all its work holding _FORK_GUARD, and a fork waits for it (at most one beat).
_FORK_GUARD = threading.Lock()
os.register_at_fork(before=_FORK_GUARD.acquire, after_in_parent=_FORK_GUARD.release,
                    after_in_child=_FORK_GUARD.release)

ALIVE_KEY = "switchboard:alive:{owner}"
WORKERS_KEY = "switchboard:workers"
HELD_KEY = transport.HELD_KEY
HEARTBEAT_S = 1.0
# How long a worker's alive key must be seen missing, on consecutive sweeps, before it counts as dead.
CONFIRM_S = 1.5


def new_owner(hostname: str) -> str:
    """A liveness id: unique per worker start (a restarted worker is a new one)."""
    return f"{hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def live_workers(client: Any) -> dict[str, dict[str, Any]]:
    """The workers whose heartbeat is current: liveness id -> info (hostname, queues, concurrency, held)."""
    infos = client.hgetall(WORKERS_KEY)
    if not infos:
        return {}
    owners = [o.decode() if isinstance(o, bytes) else o for o in infos]
    pipe = client.pipeline(transaction=False)
    for o in owners:
        pipe.exists(ALIVE_KEY.format(owner=o))
        pipe.scard(HELD_KEY.format(owner=o))
    replies = pipe.execute()
    out: dict[str, dict[str, Any]] = {}
    for i, (o, raw) in enumerate(zip(owners, infos.values(), strict=True)):
        if replies[2 * i]:
            try:
                info = json.loads(raw)
            except ValueError:
                info = {}
            out[o] = {**info, "held": int(replies[2 * i + 1])}
    return out


class Sweeper:
    """Finds dead workers and puts the messages they held back at the front of their queues."""

    def __init__(self, app: Any, me: str, results: Any = None) -> None:
        self.app = app
        self.me = me
        self.results = results  # the result backend's Redis (REQUEUED states); None: not written
        self._missing_since: dict[str, float] = {}
        self._conn: Any = None

    def _channel(self) -> Any:
        if self._conn is None:
            self._conn = self.app.connection_for_write()
        return self._conn.default_channel

    def reset(self) -> None:
        """Forget what was seen (Redis failed: an outage must not look like deaths)."""
        self._missing_since.clear()
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def sweep(self, client: Any, now: float | None = None) -> int:
        """One pass; returns how many messages were put back."""
        now = time.monotonic() if now is None else now
        owners = [o.decode() if isinstance(o, bytes) else o for o in client.hkeys(WORKERS_KEY)]
        owners = [o for o in owners if o != self.me]
        if not owners:
            self._missing_since.clear()
            return 0
        pipe = client.pipeline(transaction=False)
        for o in owners:
            pipe.exists(ALIVE_KEY.format(owner=o))
        alive = dict(zip(owners, pipe.execute(), strict=True))
        for o in list(self._missing_since):
            if alive.get(o, 1):
                del self._missing_since[o]
        restored = 0
        for o, is_alive in alive.items():
            if is_alive:
                continue
            first = self._missing_since.setdefault(o, now)
            if now - first >= CONFIRM_S:
                restored += self._restore(client, o)
        return restored

    def _restore(self, client: Any, dead: str) -> int:
        held = HELD_KEY.format(owner=dead)
        tags = [t.decode() if isinstance(t, bytes) else t for t in client.smembers(held)]
        qos = self._channel().qos
        restored = 0
        hostname = dead.rsplit(":", 2)[0]
        for tag in tags:
            raw = client.hget(qos.unacked_key, tag)
            # Front of the queue (RPUSH; consumers pop from the right): the call has waited already.
            qos.restore_by_tag(tag, leftmost=False)
            client.srem(held, tag)
            if raw is not None:
                restored += 1
                self._mark_requeued(raw, hostname)
        if not client.scard(held):
            pipe = client.pipeline(transaction=False)
            pipe.hdel(WORKERS_KEY, dead).delete(held)
            pipe.execute()
            self._missing_since.pop(dead, None)
        if restored:
            log.warning("worker %s died holding %d call(s); put back at the front of their queues", dead, restored)
        return restored


    def _mark_requeued(self, raw: bytes, hostname: str) -> None:
        """Tell the orchestrator (a REQUEUED state) that the call waits in its queue again, with a new queue
        deadline, so it allows the rerun the full time to run rather than what was left of the first."""
        if self.results is None:
            return
        from workers.backend import REQUEUE, REQUEUED

        try:
            payload = json.loads(raw)[0]
            task_id = payload["headers"]["id"]
            body = payload["body"]
            if payload.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            kwargs = json.loads(body)[1] if isinstance(json.loads(body), list) else {}
            queue_s = float((kwargs.get("deadlines") or {}).get("queue_s")
                            or self.app.switchboard_settings.queue_timeout_s)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            log.debug("liveness: cannot read a restored message (%s)", e)
            return
        now = time.time()
        meta = {"status": REQUEUED, "task_id": task_id, "traceback": None, "children": [], "date_done": None,
                "result": {"queue_by": now + queue_s, "worker": hostname, "requeued_at": now}}
        expires = int(self.app.conf.result_expires.total_seconds() if hasattr(self.app.conf.result_expires,
                      "total_seconds") else self.app.conf.result_expires or 0)
        self.results.register_script(REQUEUE)(keys=[self.app.backend.get_key_for_task(task_id)],
                                             args=[json.dumps(meta), expires])


class Heartbeat(bootsteps.StartStopStep):
    """Worker bootstep: the heartbeat and sweep thread (see the module doc)."""

    label = "switchboard liveness"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.owner = new_owner(getattr(parent, "hostname", None) or socket.gethostname())
        # Set before the consumer starts, so every message this worker takes is recorded.
        transport.owner = self.owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        app = parent.app
        settings = app.switchboard_settings
        queues = sorted(getattr(app.amqp.queues, "consume_from", None) or app.amqp.queues)
        info = json.dumps({"hostname": getattr(parent, "hostname", ""), "queues": queues,
                           "concurrency": getattr(parent, "concurrency", None), "pid": os.getpid()})
        ttl_ms = int(settings.worker_liveness_timeout_s * 1000)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(app, info, ttl_ms), name="switchboard-liveness",
                                        daemon=True)
        self._thread.start()

    def _run(self, app: Any, info: str, ttl_ms: int) -> None:
        with _FORK_GUARD:
            self._loop(app, info, ttl_ms, *self._clients(app))

    def _clients(self, app: Any) -> tuple[Any, Any]:
        url = app.conf.broker_url
        # Short timeouts: a fork of a pool process waits for a beat in progress (see _FORK_GUARD).
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1)
        results_url = app.conf.result_backend or url
        results = client if results_url == url else redis.Redis.from_url(results_url, socket_connect_timeout=0.5,
                                                                          socket_timeout=1)
        return client, results

    def _loop(self, app: Any, info: str, ttl_ms: int, client: Any, results: Any) -> None:
        """Runs holding _FORK_GUARD, which it lets go of only while it sleeps between beats."""
        sweeper = Sweeper(app, self.owner, results)
        alive_key = ALIVE_KEY.format(owner=self.owner)
        down = False
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                pipe = client.pipeline(transaction=False)
                pipe.set(alive_key, str(time.time()), px=ttl_ms).hset(WORKERS_KEY, self.owner, info)
                pipe.execute()
                if down:
                    log.info("liveness: Redis is back")
                    down = False
                sweeper.sweep(client)
            except Exception as e:  # Redis down or restarting: try again next beat, seeing nothing as dead
                if not down:
                    log.warning("liveness: Redis unreachable (%s); retrying every %.0f s", e, HEARTBEAT_S)
                down = True
                sweeper.reset()
            _FORK_GUARD.release()
            try:
                self._stop.wait(max(0.05, HEARTBEAT_S - (time.monotonic() - t0)))
            finally:
                _FORK_GUARD.acquire()
        sweeper.reset()
        client.close()

    def stop(self, parent: Any) -> None:
        # The heartbeat goes on until the process exits: during a warm shutdown the pool still runs calls,
        # and a worker that stopped beating would have them rerun elsewhere. Once it exits, its key
        # expires and a sweeper cleans up after it (Celery put back what it had not run).
        pass

    def shutdown(self, parent: Any) -> None:
        self._stop.set()
