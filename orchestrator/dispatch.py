"""Dispatchers run plans. The in-process one is the embedded default; workers.dispatch has the Celery one.

Both share the scheduling here (``Dispatcher.run_plan``): independent calls run concurrently,
references are resolved from earlier results, each call has a time limit, and a failed call is
reported without losing the results of the others. A subclass only implements ``submit``.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from orchestrator.events import CallEvent, CallRecord, EventSink
from orchestrator.plan import Plan, resolve_args
from switchboard.artifacts import ArtifactStore
from switchboard.errors import SwitchboardError
from switchboard.expert import RunContext, call_expert

#: how often a running plan asks ``should_stop`` (seconds)
STOP_POLL_S = 0.1
CANCELLED = "the turn was cancelled (the client went away)"

__all__ = ["CallEvent", "CallFailed", "CallRecord", "Dispatcher", "EventSink", "LocalDispatcher", "PlanResult",
           "execute_call"]


@dataclass
class PlanResult:
    """The record of every call of a plan, in the plan's order."""

    outcomes: list[CallRecord]

    def by_id(self) -> dict[str, CallRecord]:
        return {o.call_id: o for o in self.outcomes}

    @property
    def ok(self) -> bool:
        return all(o.status == "done" for o in self.outcomes)

    def artifacts(self) -> list[dict[str, Any]]:
        return [{**a, "call_id": o.call_id} for o in self.outcomes for a in o.artifacts]


class CallFailed(Exception):
    """An expert call failed; the message is what the user and the core see."""


def execute_call(registry: Any, store: ArtifactStore, expert: str, args: dict[str, Any], *, call_id: str,
                 conversation_id: str | None = None,
                 progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Run one call in this process and return its result as JSON. Used by every dispatcher and worker.

    Raises CallFailed with a message fit for the user on any error inside the expert.
    The expert may run others (``RunContext.call``): they run here too, on the same registry and store,
    under the same call and conversation, validated alike; their errors are this call's errors.
    """

    def caller(name: str, nested_args: dict[str, Any]) -> dict[str, Any]:
        nested = RunContext(store, call_id=call_id, conversation_id=conversation_id, caller=caller)
        return call_expert(registry, name, nested_args, nested)

    try:
        inst = registry.instance(expert)
        typed = inst.Args.model_validate(args)
        ctx = RunContext(store, call_id=call_id, conversation_id=conversation_id, progress=progress, caller=caller)
        result = inst(typed, ctx)
        return result.model_dump(mode="json")
    except SwitchboardError as e:
        raise CallFailed(f"{expert}: {e.message}") from e
    except ValidationError as e:
        raise CallFailed(f"{expert}: invalid arguments: {e.errors()[0].get('msg')}") from e
    except CallFailed:
        raise
    except Exception as e:  # an expert bug must not take the orchestrator down
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        raise CallFailed(f"{expert} failed: {tb}") from e


class Dispatcher:
    """Runs a Plan. Subclasses implement ``submit`` (start one call, return a Future of its result)."""

    def __init__(self, registry: Any, store: ArtifactStore, *, default_timeout: float = 120.0) -> None:
        self.registry = registry
        self.store = store
        self.default_timeout = default_timeout

    def submit(self, call_id: str, expert: str, args: dict[str, Any], *, conversation_id: str | None,
               emit: EventSink) -> cf.Future:
        raise NotImplementedError

    def timeout_for(self, expert: str) -> float:
        cls = self.registry.get_class(expert)
        return float(cls.time_limit or self.default_timeout)

    def close(self) -> None:
        """Release threads/connections."""

    def run_plan(self, plan: Plan, *, conversation_id: str | None = None,
                 on_event: EventSink | None = None, should_stop: Callable[[], bool] | None = None) -> PlanResult:
        """Run every call of the plan, dependencies first, independent calls concurrently.

        ``should_stop`` (asked every ``STOP_POLL_S`` while calls run) cancels the turn: from then on no
        call is started, calls still queued are taken back (``cancel_queued``: a thread-pool future not
        yet started, a Celery task no worker has taken), and each is reported ``skipped`` ("not run:
        the turn was cancelled"); calls already running are waited for (what they make is kept).
        """
        emit: EventSink = on_event or (lambda e: None)
        stopped = False
        outcomes: dict[str, CallRecord] = {}
        results: dict[str, dict[str, Any]] = {}
        pending = {c.id: c for c in plan.calls}
        running: dict[cf.Future, tuple[Any, float, float, dict[str, Any]]] = {}

        def fail(call, status, msg, args=None, started=None):
            outcomes[call.id] = CallRecord(call_id=call.id, expert=call.expert, status=status, args=args or {},
                                           error=msg, seconds=time.monotonic() - started if started else 0.0,
                                           tool_call=call.to_tool_call())
            emit(CallEvent(call_id=call.id, expert=call.expert, stage="failed", message=msg, time=time.time()))

        while pending or running:
            if not stopped and should_stop is not None and should_stop():
                stopped = True
                for call in pending.values():
                    fail(call, "skipped", f"{call.expert}: not run: {CANCELLED}")
                pending.clear()
                for fut, (call, started, _, args) in list(running.items()):
                    if self.cancel_queued(fut):
                        running.pop(fut)
                        fail(call, "skipped", f"{call.expert}: not run: {CANCELLED}", args, started)
            # start every call whose dependencies are settled
            for cid, call in list(pending.items()):
                deps = set(call.depends_on.values())
                if not deps <= outcomes.keys():
                    continue
                del pending[cid]
                failed_deps = [d for d in deps if outcomes[d].status != "done"]
                if failed_deps:
                    fail(call, "skipped", f"{call.expert}: not run because {failed_deps[0]} did not succeed")
                    continue
                try:
                    args = resolve_args(call, self.registry, results)
                except LookupError as e:
                    fail(call, "failed", f"{call.expert}: {e}")
                    continue
                emit(CallEvent(call_id=cid, expert=call.expert, stage="queued", time=time.time()))
                started = time.monotonic()
                try:
                    fut = self.submit(cid, call.expert, args, conversation_id=conversation_id, emit=emit)
                except Exception as e:
                    fail(call, "failed", f"{call.expert}: could not be dispatched: {e}", args, started)
                    continue
                running[fut] = (call, started, started + self.timeout_for(call.expert), args)
            if not running:
                if pending:  # dependencies that can never settle (guarded by validate())
                    for call in pending.values():
                        fail(call, "skipped", f"{call.expert}: dependencies never completed")
                    pending.clear()
                break
            now = time.monotonic()
            next_deadline = min(d for _, _, d, _ in running.values())
            wait_s = max(0.0, next_deadline - now)
            if should_stop is not None and not stopped:
                wait_s = min(wait_s, STOP_POLL_S)
            done, _ = cf.wait(list(running), timeout=wait_s, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                call, started, _, args = running.pop(fut)
                try:
                    res = fut.result()
                except CallFailed as e:
                    fail(call, "failed", str(e), args, started)
                    continue
                except Exception as e:
                    fail(call, "failed", f"{call.expert} failed: {type(e).__name__}: {e}", args, started)
                    continue
                results[call.id] = res
                outcomes[call.id] = CallRecord(call_id=call.id, expert=call.expert, status="done", args=args,
                                               result=res, seconds=time.monotonic() - started,
                                               tool_call=call.to_tool_call())
                emit(CallEvent(call_id=call.id, expert=call.expert, stage="done", progress=1.0,
                               message=res.get("summary", ""), time=time.time()))
            now = time.monotonic()
            for fut, (call, started, deadline, args) in list(running.items()):
                if now >= deadline and not fut.done():
                    running.pop(fut)
                    fut.cancel()
                    self.on_timeout(fut)
                    fail(call, "failed", f"{call.expert}: timed out after {deadline - started:.0f} s", args, started)
        order = {c.id: i for i, c in enumerate(plan.calls)}
        return PlanResult(sorted(outcomes.values(), key=lambda o: order.get(o.call_id, 1 << 30)))

    def on_timeout(self, fut: cf.Future) -> None:
        """Hook: a call ran past its limit (the queued dispatcher revokes the task)."""

    def cancel_queued(self, fut: cf.Future) -> bool:
        """Take back a submitted call that has not started; True when it will never run. Default: cancel
        the future (a thread pool's queued job); a call already running is left to finish."""
        return fut.cancel()


class LocalDispatcher(Dispatcher):
    """Runs experts in this process on a thread pool (the embedded default).

    A call past its time limit is reported as failed at once; its thread cannot be killed and
    finishes in the background (its result is dropped).
    """

    def __init__(self, registry: Any, store: ArtifactStore, *, max_workers: int = 4,
                 default_timeout: float = 120.0) -> None:
        super().__init__(registry, store, default_timeout=default_timeout)
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="expert")

    def submit(self, call_id: str, expert: str, args: dict[str, Any], *, conversation_id: str | None,
               emit: EventSink) -> cf.Future:
        def progress(fraction: float, message: str) -> None:
            emit(CallEvent(call_id=call_id, expert=expert, stage="progress", progress=fraction, message=message,
                           time=time.time()))

        def job() -> dict[str, Any]:
            emit(CallEvent(call_id=call_id, expert=expert, stage="started", time=time.time()))
            return execute_call(self.registry, self.store, expert, args, call_id=call_id,
                                conversation_id=conversation_id, progress=progress)

        return self._pool.submit(job)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

