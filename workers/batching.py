"""Dynamic batching: concurrent calls of one expert in a worker process run through ``run_batch`` together.

    switchboard worker --experts detect --batch-max 8 [--batch-window-ms 5] [--concurrency 16]

Such a worker runs Celery's threads pool (``--concurrency`` threads, default the batch size; the worker
prefetches as many messages as it has threads). Every task thread does the per-message work itself
(delivery count, redelivery check, STARTED, validation) and then hands its call to the process's
``Batcher`` of that expert and waits. The batcher's one thread per expert takes the oldest waiting
call, waits until ``window`` after that call arrived or until ``max_size`` calls are waiting, runs them
through ``run_batch`` once and gives each waiting thread its own result. Calls that arrive while a
batch runs wait for the next one, which starts as soon as the running batch ends (their window has
already passed), so a busy expert runs back-to-back full batches and an idle one adds at most the
window to a lone call.

Only experts that override ``run_batch`` are batched; the calls of the others run side by side on
their task threads. Errors: arguments are validated by each caller before its call joins a batch, so bad input fails
alone. A batch that raises is run again one call at a time (``Expert.__call__``), so one call's
error is that call's alone; an expert's ``run_batch`` should therefore have no side effects beyond
artifacts (content-addressed: writing one twice is harmless) and progress events.

Trade-offs of running several calls in one process (documented in ``switchboard worker --help``):

- Time limits are not enforced by the threads pool (Celery cannot interrupt a thread); the
  orchestrator still gives up on a call at its deadline, and a batch holds its threads until done.
- Late acks still hold: each message is acknowledged when its own task returns. If the whole worker
  dies, every call it held (up to ``--concurrency``) is redelivered after the broker's visibility
  timeout, and each counts a death towards ``worker_max_deliveries``; a call that kills its worker can
  take innocent calls of the same batch with it. A redelivered call (one that was held by a worker
  that died) therefore runs on its own, never in a batch, so a poison call does not keep sharing
  batches with the same neighbours; but other batches of the same process still die with it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from switchboard.expert import Expert, ExpertResult, RunContext

log = logging.getLogger(__name__)


@dataclass
class _Call:
    args: Any
    ctx: RunContext
    future: cf.Future = field(default_factory=cf.Future)
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Gathers concurrent calls of one expert and runs them through its ``run_batch``.

    ``run(args, ctx)`` blocks the calling thread until its own result (or error) is ready. ``args``
    must already be validated (an instance of ``expert.Args``).
    """

    def __init__(self, expert: Expert, *, max_size: int, window_s: float) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self.expert = expert
        self.max_size = int(max_size)
        self.window_s = float(window_s)
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        #: how many batches of each size ran (a batch that fell back to one-by-one counts once)
        self.sizes: Counter[int] = Counter()
        self.fallbacks = 0

    # -- callers ----------------------------------------------------------------------------------
    def submit(self, args: Any, ctx: RunContext) -> cf.Future:
        """Queue one call; the future gets its result or the exception it raised."""
        if self._closed:
            raise RuntimeError(f"the batcher of {self.expert.name} is closed")
        call = _Call(args, ctx)
        self._ensure_thread()
        self._queue.put(call)
        return call.future

    def run(self, args: Any, ctx: RunContext) -> ExpertResult:
        """Run one call as part of a batch and return its own result (raises its own error)."""
        return self.submit(args, ctx).result()

    def close(self) -> None:
        """Stop the batcher's thread after the calls already queued."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)

    # -- the batch thread -------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"batcher-{self.expert.name}", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as e:  # never leave a caller waiting, never let the thread die
                log.exception("batcher of %s: unexpected error", self.expert.name)
                for call in batch:
                    if not call.future.done():
                        call.future.set_exception(e)

    def _collect(self) -> list[_Call] | None:
        """The next batch: the oldest call plus whatever arrives until its window ends (or max_size)."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = first.arrived + self.window_s
        while len(batch) < self.max_size:
            left = deadline - time.monotonic()
            try:
                # Past the window: take only what is already waiting.
                call = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if call is None:  # close(): finish this batch, then stop
                self._queue.put(None)
                break
            batch.append(call)
        return batch

    def _run(self, batch: list[_Call]) -> None:
        calls = [c for c in batch if c.future.set_running_or_notify_cancel()]
        if not calls:
            return
        self.sizes[len(calls)] += 1
        if len(calls) == 1:
            self._run_one(calls[0])
            return
        expert = self.expert
        t0 = time.monotonic()
        try:
            with pinned(expert):
                expert.ensure_setup()
                results = expert.run_batch([(c.args, c.ctx) for c in calls])
            log.debug("%s: a batch of %d in %.1f ms (the oldest call waited %.1f ms for it)", expert.name,
                      len(calls), 1000 * (time.monotonic() - t0), 1000 * (t0 - calls[0].arrived))
            if len(results) != len(calls):
                raise TypeError(f"{expert.name}.run_batch returned {len(results)} results for {len(calls)} calls")
        except Exception as e:
            self.fallbacks += 1
            log.warning("%s: a batch of %d failed (%s: %s); running its calls one by one", expert.name,
                        len(calls), type(e).__name__, e)
            for c in calls:
                self._run_one(c)
            return
        for c, r in zip(calls, results, strict=True):
            if isinstance(r, expert.Result):
                c.future.set_result(r)
            else:
                c.future.set_exception(TypeError(
                    f"expert {expert.name}.run_batch returned {type(r).__name__}, not {expert.Result.__name__}"))

    def _run_one(self, call: _Call) -> None:
        try:
            call.future.set_result(self.expert(call.args, call.ctx))
        except BaseException as e:
            call.future.set_exception(e)


@contextmanager
def pinned(expert: Expert) -> Iterator[None]:
    """Keep the memory budget from unloading ``expert`` while a batch runs on it."""
    from switchboard.memory import get_budget

    with get_budget().pinned(expert):
        yield


class ExpertBatchers:
    """The batchers of one process, one per expert instance (made on first use)."""

    def __init__(self, *, max_size: int, window_s: float) -> None:
        self.max_size, self.window_s = max_size, window_s
        self._items: dict[int, Batcher] = {}
        self._lock = threading.Lock()

    def for_expert(self, expert: Expert) -> Batcher:
        with self._lock:
            b = self._items.get(id(expert))
            if b is None or b.expert is not expert:
                b = Batcher(expert, max_size=self.max_size, window_s=self.window_s)
                self._items[id(expert)] = b
            return b

    def all(self) -> list[Batcher]:
        with self._lock:
            return list(self._items.values())

    def close(self) -> None:
        for b in self.all():
            b.close()


class BatchingRegistry:
    """A registry whose experts run their calls through the process's batchers.

    ``orchestrator.dispatch.execute_call(BatchingRegistry(registry, batchers), …)`` validates,
    builds the RunContext and maps errors exactly as for an unbatched call; only the run itself
    joins a batch.
    """

    def __init__(self, registry: Any, batchers: ExpertBatchers) -> None:
        self.registry = registry
        self.batchers = batchers

    def instance(self, name: str) -> Any:
        expert = self.registry.instance(name)
        if not has_batch_implementation(expert):
            # The default run_batch only loops over run(): batching would just serialise the calls
            # (and a failure would run the earlier ones again); they run concurrently on their threads.
            return expert
        return _BatchedExpert(self.batchers.for_expert(expert))


def has_batch_implementation(expert: Expert) -> bool:
    """Whether the expert's class overrides ``Expert.run_batch`` (batches for real)."""
    return type(expert).run_batch is not Expert.run_batch


class _BatchedExpert:
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.Args = batcher.expert.Args

    def __call__(self, args: Any, ctx: RunContext) -> ExpertResult:
        return self.batcher.run(args, ctx)


_process: dict[str, Any] = {}


def process_batchers(max_size: int, window_s: float) -> ExpertBatchers:
    """This process's batchers (a forked child makes its own: threads do not survive a fork)."""
    key = (os.getpid(), max_size, window_s)
    if _process.get("key") != key:
        _process["key"] = key
        _process["batchers"] = ExpertBatchers(max_size=max_size, window_s=window_s)
    return _process["batchers"]


def batching_applies(settings: Any) -> bool:
    """Whether calls in this thread should be batched: batching is on and this is a threads pool.

    Prefork children and the solo pool run tasks on the main thread, one at a time: a batch there
    could only ever hold one call and would add the window to each.
    """
    return settings.batch_max_size > 1 and threading.current_thread() is not threading.main_thread()
