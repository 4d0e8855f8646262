"""Prometheus metrics of one app (its own registry, so several apps in one process do not clash).

- ``switchboard_http_requests_total{method, route, status}`` and a latency histogram per route;
- ``switchboard_chat_turns_in_progress`` — turns being planned, executed or answered now;
- ``switchboard_expert_calls_total{expert, status}`` (done, failed, skipped, invalid),
  ``switchboard_expert_failures_total{expert}`` and ``switchboard_expert_call_seconds{expert}`` (from
  queued to done or failed, so a Celery queue's wait is included);
- ``switchboard_expert_queue_wait_seconds{expert}`` — from a call's queued event to its started event
  (with Celery: waiting in the broker for a worker; in-process: for a free thread of the dispatcher);
- ``switchboard_core_seconds`` — time a turn spent in the core's passes (plan and answer), and
  ``switchboard_core_tokens{kind}`` — a turn's prompt, cached (of the prompt, taken from the KV cache)
  and completion tokens (what the API reports as ``usage``);
- ``switchboard_queue_depth{queue}`` — messages waiting in each expert's Celery queue, asked of the
  broker at scrape time (workers.config.queue_depths); absent with the in-process dispatcher, which has
  no queue.
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

from orchestrator.events import CallEvent, CallRecord

log = logging.getLogger(__name__)

CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CORE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
OTHER = "other"  # label for experts or routes we do not know, so labels stay a small set


class QueueDepthCollector(Collector):
    """Calls waiting in each expert queue, asked of the broker at scrape time (workers.config.queue_depths)."""

    def __init__(self, depths: Callable[[list[str]], dict[str, int]], queues: Callable[[], list[str]]) -> None:
        self.depths = depths
        self.queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("switchboard_queue_depth", "Calls waiting in each expert queue.",
                                  labels=["queue"])
        up = GaugeMetricFamily("switchboard_broker_up", "1 if the broker answered the last scrape.")
        try:
            for name, n in self.depths(self.queues()).items():
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
        self.queue_wait = Histogram("switchboard_expert_queue_wait_seconds", "Expert call wait, queued to "
                                    "started.", ["expert"], buckets=WAIT_BUCKETS, registry=r)
        self.core_seconds = Histogram("switchboard_core_seconds", "Time a turn spent in the core's passes.",
                                      buckets=CORE_BUCKETS, registry=r)
        self.core_tokens = Histogram("switchboard_core_tokens", "Tokens of a turn's core passes (prompt, cached "
                                     "of the prompt, completion).", ["kind"], buckets=TOKEN_BUCKETS, registry=r)
        self._experts: Callable[[], list[str]] = list

    def watch_queues(self, settings: Any, queues: Callable[[], list[str]]) -> None:
        """Export the depth of the Celery queues (on brokers whose queues can be measured: Redis)."""
        from workers.config import queue_depths, queues_measurable

        if queues_measurable(settings):
            self.registry.register(QueueDepthCollector(lambda names: queue_depths(settings, names), queues))

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
        """An event sink for one turn: observes each call's latency from its queued and final events, and
        its wait from queued to started."""
        queued: dict[str, float] = {}
        waiting: dict[str, float] = {}

        def observe(event: Any) -> None:
            if not isinstance(event, CallEvent):
                return
            now = event.time or time.time()
            if event.stage == "queued":
                queued[event.call_id] = waiting[event.call_id] = now
            elif event.stage == "started" and event.call_id in waiting:
                self.queue_wait.labels(self.expert_label(event.expert)).observe(
                    max(0.0, now - waiting.pop(event.call_id)))
            elif event.stage in ("done", "failed") and event.call_id in queued:
                self.call_seconds.labels(self.expert_label(event.expert)).observe(
                    max(0.0, now - queued.pop(event.call_id)))

        return observe

    def observe_core(self, usage: Any) -> None:
        """One turn's time and tokens in the core (an ``orchestrator.core.loop.TurnUsage``)."""
        if usage is None:
            return
        self.core_seconds.observe(max(0.0, float(usage.core_seconds)))
        self.core_tokens.labels("prompt").observe(usage.prompt_tokens)
        self.core_tokens.labels("cached").observe(usage.cached_tokens)
        self.core_tokens.labels("completion").observe(usage.completion_tokens)

    def count_calls(self, calls: list[CallRecord]) -> None:
        for call in calls:
            expert, status = self.expert_label(call.expert), call.status
            self.calls.labels(expert, status).inc()
            if status != "done":
                self.failures.labels(expert).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
