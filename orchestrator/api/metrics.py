"""Prometheus metrics of one app (its own registry, so several apps in one process do not clash).

- ``switchboard_http_requests_total{method, route, status}`` and a latency histogram per route;
- ``switchboard_chat_turns_in_progress`` — turns being planned, executed or answered now;
- ``switchboard_expert_calls_total{expert, status}`` (done, failed, skipped, invalid),
  ``switchboard_expert_failures_total{expert}`` and ``switchboard_expert_call_seconds{expert}`` (from
  queued to done or failed, so a Celery queue's wait is included);
- ``switchboard_queue_depth{queue}`` — messages waiting in each expert's Celery queue, read from Redis
  at scrape time; absent with the in-process dispatcher, which has no queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.dispatch import CallEvent

log = logging.getLogger(__name__)

CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OTHER = "other"  # label for experts or routes we do not know, so labels stay a small set


class QueueDepthCollector(Collector):
    """Length of each expert queue on a Redis broker (kombu keeps a queue as a Redis list of its name)."""

    def __init__(self, broker_url: str, queues: Callable[[], list[str]]) -> None:
        self.broker_url = broker_url
        self.queues = queues
        self._client: Any = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("switchboard_queue_depth", "Calls waiting in each expert queue.",
                                  labels=["queue"])
        up = GaugeMetricFamily("switchboard_broker_up", "1 if the broker answered the last scrape.")
        try:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.broker_url, socket_connect_timeout=1, socket_timeout=1)
            names = self.queues()
            pipe = self._client.pipeline()
            for name in names:
                pipe.llen(name)
            for name, n in zip(names, pipe.execute(), strict=True):
                depth.add_metric([name], float(n))
            up.add_metric([], 1.0)
        except Exception as e:  # a scrape must not fail because the broker is down
            log.warning("queue depth unavailable: %s", e)
            up.add_metric([], 0.0)
        yield depth
        yield up


class Metrics:
    """The counters and histograms the API updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("switchboard_http_requests", "HTTP requests served.",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("switchboard_http_request_seconds", "HTTP request latency.",
                                         ["method", "route"], registry=r)
        self.turns = Gauge("switchboard_chat_turns_in_progress", "Chat turns running now.", registry=r)
        self.calls = Counter("switchboard_expert_calls", "Expert calls by outcome.", ["expert", "status"],
                             registry=r)
        self.failures = Counter("switchboard_expert_failures", "Expert calls that failed, were skipped or "
                                "were invalid.", ["expert"], registry=r)
        self.call_seconds = Histogram("switchboard_expert_call_seconds", "Expert call latency, queued to "
                                      "finished.", ["expert"], buckets=CALL_BUCKETS, registry=r)
        self._experts: Callable[[], list[str]] = list

    def watch_queues(self, broker_url: str, queues: Callable[[], list[str]]) -> None:
        """Export the depth of the Celery queues (Redis brokers only)."""
        if broker_url.startswith(("redis://", "rediss://", "unix://")):
            self.registry.register(QueueDepthCollector(broker_url, queues))

    def know_experts(self, names: Callable[[], list[str]]) -> None:
        self._experts = names

    def expert_label(self, name: str) -> str:
        try:
            return name if name in self._experts() else OTHER
        except Exception:
            return OTHER

    @contextmanager
    def turn(self) -> Iterator[None]:
        self.turns.inc()
        try:
            yield
        finally:
            self.turns.dec()

    def call_timer(self) -> Callable[[Any], None]:
        """An event sink for one turn: observes each call's latency from its queued and final events."""
        queued: dict[str, float] = {}

        def observe(event: Any) -> None:
            if not isinstance(event, CallEvent):
                return
            now = event.time or time.time()
            if event.stage == "queued":
                queued[event.call_id] = now
            elif event.stage in ("done", "failed") and event.call_id in queued:
                self.call_seconds.labels(self.expert_label(event.expert)).observe(
                    max(0.0, now - queued.pop(event.call_id)))

        return observe

    def count_calls(self, calls: list[dict[str, Any]]) -> None:
        for call in calls:
            expert, status = self.expert_label(str(call.get("expert"))), str(call.get("status"))
            self.calls.labels(expert, status).inc()
            if status != "done":
                self.failures.labels(expert).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
