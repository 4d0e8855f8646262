"""kombu's Redis transport with one change: each channel reuses one Redis client object.

kombu builds a new ``redis.Redis`` for every publish, ack and event it sends
(``Channel.conn_or_acquire``). The connection pool behind it was always shared, so only the wrapper
is rebuilt, but redis-py's constructor registers ~170 response callbacks: 0.1-0.3 ms of CPU each
time, five to seven times per call between the orchestrator and a worker.

``install()`` (called when workers.config is imported) makes it the transport of ``redis://`` URLs
in this process, so the URL and what Flower and the logs show stay ``redis://``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
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
