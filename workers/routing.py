"""Queues and time limits, derived from the expert registry.

Every expert gets the queue named by ``Expert.queue_name()`` (its ``queue`` attribute, else its name),
so an expert that a plugin registers gets a queue without any change here. Time limits come from
``Expert.time_limit`` or, when the expert declares none, ``Settings.call_timeout_s``.
"""

from __future__ import annotations

from typing import Any

from switchboard.expert import Expert

# Added to the soft limit to get the hard one: the expert gets SoftTimeLimitExceeded first and a
# chance to clean up; past the hard limit the worker kills the process running it.
HARD_LIMIT_GRACE_MIN_S = 1.0
HARD_LIMIT_GRACE_MAX_S = 30.0
# Time a result takes from the worker to the orchestrator after the hard limit; the orchestrator
# waits hard + this from a call's start before it gives up on it (queue time is counted apart:
# SWITCHBOARD_QUEUE_TIMEOUT_S).
RESULT_GRACE_S = 2.0
# The longest backoff before a transient error's retry (workers.tasks); the orchestrator allows it on
# top of the queue time of the retry.
RETRY_MAX_S = 8.0


def _with_grace(soft: float) -> tuple[float, float]:
    grace = min(HARD_LIMIT_GRACE_MAX_S, max(HARD_LIMIT_GRACE_MIN_S, 0.1 * soft))
    return soft, soft + grace


def time_limits(cls: type[Expert], call_timeout_s: float) -> tuple[float, float]:
    """(soft, hard) time limits in seconds of one call of ``cls``."""
    return _with_grace(float(cls.time_limit or call_timeout_s))


def orchestrator_deadline(cls: type[Expert], call_timeout_s: float) -> float:
    """Seconds after a call of ``cls`` started when the orchestrator stops waiting for its result."""
    return time_limits(cls, call_timeout_s)[1] + RESULT_GRACE_S


def queue_for(registry: Any, expert: str) -> str:
    """The queue that carries calls of ``expert`` (raises UnknownExpert)."""
    return registry.get_class(expert).queue_name()


def queues_for(registry: Any, experts: list[str]) -> list[str]:
    """The queues a worker serving ``experts`` consumes, in order, without duplicates."""
    out: list[str] = []
    for name in experts:
        q = queue_for(registry, name)
        if q not in out:
            out.append(q)
    return out


def max_hard_limit(registry: Any, call_timeout_s: float) -> float:
    """The longest hard time limit of any registered expert (for the broker's visibility timeout)."""
    limits = [time_limits(registry.get_class(n), call_timeout_s)[1] for n in registry.names()]
    return max(limits, default=_with_grace(float(call_timeout_s))[1])


# Kept here for workers' callers; the registry itself loads SWITCHBOARD_EXTRA_EXPERTS now.
from switchboard.registry import load_extra_experts, parse_extra_experts  # noqa: E402

__all__ = ["RETRY_MAX_S", "load_extra_experts", "parse_extra_experts", "max_hard_limit", "orchestrator_deadline", "queue_for",
           "queues_for", "time_limits"]
