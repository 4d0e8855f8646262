"""kombu's Redis transport with two changes that take CPU time off every call:

1. Each channel reuses one Redis client object. kombu builds a new ``redis.Redis`` for every
   publish, ack and event it sends (``Channel.conn_or_acquire``). The connection pool behind it was
   always shared, so only the wrapper is rebuilt, but redis-py's constructor registers ~170 response
   callbacks: 0.1-0.3 ms of CPU each time, five to seven times per call between the orchestrator and
   a worker.
2. The two writes that track an unacknowledged message (when it is received, and when it is
   acked) go in a plain pipeline rather than MULTI/EXEC: one round trip either way, but four commands
   to pack and four replies to parse instead of two. Atomicity is not needed there: the commands go
   in one write on one connection and Redis runs them in order; the only other client that reads
   these keys is a worker restoring messages unacknowledged for longer than the visibility timeout, or
   those of a dead worker (workers.liveness), and it does so in a WATCH transaction on the hash that
   the ack's HDEL invalidates.

Two more change what happens when things fail:

3. A call whose pool process died goes back to the *front* of its queue (kombu's ``reject(requeue=True)``
   LPUSHes it to the back, behind the whole backlog, where the orchestrator's deadline can expire it;
   consumers BRPOP from the right, so RPUSH is the front).
4. Every message a worker takes is also recorded under that worker's liveness id
   (``switchboard:held:<id>``, workers.liveness) until it is acked or put back, so a worker that dies
   has the calls it held put back by another worker within seconds, not after the visibility timeout.

``install()`` (called when workers.config is imported) makes it the transport of ``redis://`` URLs
in this process, so the URL and what Flower and the logs show stay ``redis://``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

# The liveness id of this worker process (workers.liveness sets it when the worker starts); None in
# processes that only send calls.
owner: str | None = None
HELD_KEY = "switchboard:held:{owner}"


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: Any) -> None:
        # kombu's append, with the holder recorded in the same round trip.
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            if owner is not None:
                pipe.sadd(HELD_KEY.format(owner=owner), delivery_tag)
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                self.unacked_key, delivery_tag,
                dumps([message._raw, delivery["exchange"], delivery["routing_key"]])).execute()
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        if owner is not None:
            pipe = pipe.srem(HELD_KEY.format(owner=owner), delivery_tag)
        return pipe

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            # kombu's leftmost=True means LPUSH: the back of the queue. The front is RPUSH.
            self.restore_by_tag(delivery_tag, leftmost=False)
        else:
            self._remove_from_indices(delivery_tag).execute()
        virtual.QoS.ack(self, delivery_tag)

    @contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        if pipe:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as client:
                yield client.pipeline(transaction=False)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _reused_client: Any = None
    _reused_for_pool: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        if self._reused_client is None or self._reused_for_pool is not pool:
            # A redis.Redis on a connection pool is thread-safe: each command takes a pooled connection.
            self._reused_client, self._reused_for_pool = self._create_client(), pool
        yield self._reused_client


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Use this transport for ``redis://`` URLs in this process."""
    path = f"{__name__}:Transport"
    if kombu.transport.TRANSPORT_ALIASES.get("redis") != path:
        kombu.transport.TRANSPORT_ALIASES["redis"] = path
        kombu.transport._transport_cache.pop("redis", None)
