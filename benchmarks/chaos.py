"""Chaos benchmark: the job layer under failure, with real Redis and real worker processes.

    python benchmarks/chaos.py [--json] [--quick] [--only pool_kill,worker_kill,…] [--keep DIR]

Every scenario starts its own redis-server (AOF on) and ``switchboard worker`` processes (prefork,
default settings: the visibility timeout is the default, longest hard limit + 60 s), runs plans of
calls of ``chaos_work`` (sleeps, then saves an artifact holding ``2 * n``) through a QueuedDispatcher,
breaks something meanwhile, and checks every call against the journal the expert writes (a line when
a run starts and one when it ends, with pid and time):

- ``pool_kill``: kill -9 a random pool process every second;
- ``worker_kill``: kill -9 a whole worker (main process and pool) every ~3 s, starting a new one;
- ``overload``: 800 calls on 2 busy workers, more than they can run within the queue timeout;
- ``redis_down_2s`` / ``redis_down_40s``: Redis killed (SIGKILL) with calls in flight, back after 2 / 40 s;
  during the long outage a second plan is submitted;
- ``poison``: a call that kills every process that runs it, among ordinary calls;
- ``late_worker``: calls for a queue no worker serves, and a worker that starts around their deadline.

Per scenario: ``calls``, ``done``, ``failed`` (and the errors, grouped), ``lost`` (no outcome, or done
with a result that has no artifact), ``ran_after_failed`` (a run that started, or ended, after its call
was reported failed), ``wrong_results`` (a result other than ``2 * n``, or runs of one call that ended
with different values), ``ran_to_the_end_twice`` (calls whose expert completed twice: allowed, with the
same result, but a sign of a worker wrongly taken for dead), ``rerun_s_p95`` (from a kill to the start of the rerun of each call the killed
process was running). Totals: ``lost``, ``ran_after_failed``, ``wrong_results`` (all must be 0) and
``worker_kill_rerun_s_p95`` (target ≤ 15 s under the default settings).

``--quick`` runs every scenario small and short (a test in tests/ runs it); the default sizes are the
issue's (#28).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python benchmarks/chaos.py
    sys.path.insert(0, str(REPO_ROOT))

from pydantic import BaseModel  # noqa: E402

from switchboard.expert import Expert, ExpertResult, RunContext  # noqa: E402

EXPERT = "chaos_work"
TIME_LIMIT_S = 30.0  # soft limit; hard 33 s, run allowance 35 s (like crop in the issue)


# -- the expert (workers load it through SWITCHBOARD_EXTRA_EXPERTS) ------------------------------------
class WorkArgs(BaseModel):
    key: str
    n: int
    seconds: float = 0.2
    poison: bool = False


class WorkResult(ExpertResult):
    value: int


class WorkExpert(Expert):
    name = EXPERT
    description = "Chaos benchmark: sleep, then save 2*n as an artifact; journal every run's start and end."
    Args = WorkArgs
    Result = WorkResult
    time_limit = TIME_LIMIT_S

    def run(self, args: WorkArgs, ctx: RunContext) -> WorkResult:
        _journal("start", args.key, "")
        if args.poison:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(args.seconds)
        value = 2 * args.n
        art = ctx.save_json({"key": args.key, "value": value}, kind="json", role="value")
        _journal("end", args.key, str(value))
        return WorkResult(summary=f"{args.key} {value}", artifacts=[art], value=value)


def _journal(what: str, key: str, extra: str) -> None:
    path = Path(os.environ["CHAOS_JOURNAL_DIR"]) / f"journal-{os.getpid()}.log"
    with open(path, "a", encoding="utf-8") as f:  # one write() per line: survives a kill -9
        f.write(f"{what} {key} {os.getpid()} {time.time():.4f} {extra}\n")


SPEC = f"benchmarks.chaos:{WorkExpert.__name__}"


# -- running a scenario ------------------------------------------------------------------------------
@dataclass
class Run:
    """What one plan did: outcomes by key, and when each failure was reported."""

    keys: list[str]
    values: dict[str, int]
    outcomes: dict[str, Any] = field(default_factory=dict)
    failed_at: dict[str, float] = field(default_factory=dict)  # key -> epoch s of the "failed" event
    thread: threading.Thread | None = None
    error: BaseException | None = None
    t0: float = 0.0  # epoch s when the plan was started


def _plan(registry: Any, calls: list[dict[str, Any]]) -> Any:
    from orchestrator.commands import Call, ValidCall
    from orchestrator.plan import Plan

    cls = registry.get_class(EXPERT)
    return Plan([ValidCall(c["key"], EXPERT, cls.Args.model_validate(c), Call(c["key"], EXPERT, {})) for c in calls])


def start_plan(dispatcher: Any, registry: Any, prefix: str, count: int, seconds: float,
               poison: set[int] = frozenset()) -> Run:  # type: ignore[assignment]
    calls = [{"key": f"{prefix}{i}", "n": random.randrange(1_000_000), "seconds": seconds, "poison": i in poison}
             for i in range(count)]
    run = Run([c["key"] for c in calls], {c["key"]: c["n"] for c in calls}, t0=time.time())
    plan = _plan(registry, calls)

    def on_event(ev: Any) -> None:
        if ev.stage == "failed":
            run.failed_at[ev.call_id] = ev.time

    def go() -> None:
        try:
            result = dispatcher.run_plan(plan, on_event=on_event)
            run.outcomes = {o.call_id: o for o in result.outcomes}
        except BaseException as e:  # reported in the figures
            run.error = e

    run.thread = threading.Thread(target=go, daemon=True)
    run.thread.start()
    return run


def read_journal(directory: Path) -> dict[str, list[tuple[str, int, float, str]]]:
    """key -> [(start|end, pid, time, value)] in time order."""
    out: dict[str, list[tuple[str, int, float, str]]] = defaultdict(list)
    for path in directory.glob("journal-*.log"):
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) >= 4:
                out[parts[1]].append((parts[0], int(parts[2]), float(parts[3]), parts[4] if len(parts) > 4 else ""))
    for events in out.values():
        events.sort(key=lambda e: e[2])
    return out


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))], 2)


def judge(runs: list[Run], journal: dict[str, list[tuple[str, int, float, str]]], store: Any,
          kills: list[tuple[float, set[int]]], poison_keys: set[str] = frozenset(),  # type: ignore[assignment]
          ) -> dict[str, Any]:
    """The figures of a scenario (see the module doc)."""
    calls = done = failed = lost = ran_after = wrong = twice = 0
    errors: Counter[str] = Counter()
    for run in runs:
        for key in run.keys:
            calls += 1
            o = run.outcomes.get(key)
            events = journal.get(key, [])
            ends = [v for kind, _, _, v in events if kind == "end"]
            if len(set(ends)) > 1:
                wrong += 1  # two runs of one call ended with different values
            twice += len(ends) > 1
            if o is None or o.status not in ("done", "failed"):
                lost += 1
                continue
            if o.status == "done":
                done += 1
                expected = 2 * run.values[key]
                if o.result.get("value") != expected or o.result.get("summary") != f"{key} {expected}":
                    wrong += 1
                arts = o.result.get("artifacts") or []
                try:
                    if not arts or store.read_json(arts[0]["id"]).get("value") != expected:
                        wrong += 1
                except Exception:
                    lost += 1  # reported done, but its artifact is not there
                continue
            failed += 1
            errors[_error_kind(o.error or "")] += 1
            t_fail = run.failed_at.get(key)
            if t_fail is not None and any(t > t_fail for _, _, t, _ in events):
                ran_after += 1
    reruns = []
    for t_kill, pids in kills:
        for events in journal.values():
            before = [e for e in events if e[2] <= t_kill]
            if not before or before[-1][0] != "start" or before[-1][1] not in pids:
                continue  # this call was not running in a killed process
            after = [e for e in events if e[2] > t_kill and e[0] == "start"]
            if after:
                reruns.append(after[0][2] - t_kill)
    return {"calls": calls, "done": done, "failed": failed, "lost": lost, "ran_after_failed": ran_after,
            "wrong_results": wrong, "ran_to_the_end_twice": twice, "rerun_s_p95": _p95(reruns), "reruns": len(reruns),
            "rerun_s_max": round(max(reruns), 2) if reruns else None, "errors": dict(errors.most_common(6))}


def _error_kind(error: str) -> str:
    """An error without its numbers, so that the same failure groups together."""
    import re

    return re.sub(r"\d+(\.\d+)?", "N", error)[:160]


def wait_runs(runs: list[Run], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for run in runs:
        assert run.thread is not None
        run.thread.join(max(0.0, deadline - time.monotonic()))


class Scenario:
    """One scenario's Redis, workers, dispatcher and journal."""

    def __init__(self, name: str, tmp: Path, log: Callable[[str], None], *, queue_timeout_s: float | None = None,
                 env_extra: dict[str, str] | None = None) -> None:
        from switchboard.artifacts import ArtifactStore
        from switchboard.registry import Registry
        from switchboard.settings import Settings
        from workers.testing import RedisServer, worker_env

        self.name, self.log = name, log
        self.dir = tmp / name
        self.journal = self.dir / "journal"
        self.journal.mkdir(parents=True)
        self.redis = RedisServer(self.dir / "redis", fsync="everysec").start()
        extra = {"CHAOS_JOURNAL_DIR": str(self.journal), **(env_extra or {})}
        if queue_timeout_s is not None:
            extra["SWITCHBOARD_QUEUE_TIMEOUT_S"] = str(queue_timeout_s)
        self.env = worker_env(self.redis.url, self.dir / "artifacts", extra_experts=SPEC, **extra)
        self.registry = Registry()
        self.registry.register(WorkExpert, "benchmarks")
        self.store = ArtifactStore(self.dir / "artifacts")
        kw = {"queue_timeout_s": queue_timeout_s} if queue_timeout_s is not None else {}
        self.settings = Settings(broker_url=self.redis.url, artifact_dir=self.dir / "artifacts", **kw)
        self.workers: list[Any] = []
        self._n = 0
        self.dispatcher: Any = None

    def worker(self, *, concurrency: int = 2, wait: bool = True) -> Any:
        from workers.testing import WorkerProcess

        self._n += 1
        w = WorkerProcess([EXPERT], env=self.env, concurrency=concurrency, name=f"{self.name}-{self._n}",
                          log_path=self.dir / f"worker-{self._n}.log", loglevel="warning")
        self.workers.append(w)
        if wait:
            w.start()
        else:
            w.launch()
        return w

    def open(self) -> Any:
        from workers.dispatch import QueuedDispatcher

        self.dispatcher = QueuedDispatcher(self.registry, self.store, settings=self.settings)
        return self.dispatcher

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        if self.dispatcher is not None:
            self.dispatcher.close()
        self.redis.stop(signal.SIGKILL)


def _pool_pids(workers: list[Any]) -> list[int]:
    return [pid for w in workers if w.proc is not None and w.proc.poll() is None for pid in w.child_pids()]


# -- the scenarios -----------------------------------------------------------------------------------
def pool_kill(tmp: Path, log: Callable[[str], None], size: dict[str, Any]) -> dict[str, Any]:
    sc = Scenario("pool_kill", tmp, log)
    try:
        ws = [sc.worker(), sc.worker()]
        d = sc.open()
        run = start_plan(d, sc.registry, "p", size["calls"], size["seconds"])
        kills: list[tuple[float, set[int]]] = []
        time.sleep(1.0)
        while run.thread.is_alive() and len(kills) < size["kills"]:
            pids = _pool_pids(ws)
            if pids:
                victim = random.choice(pids)
                t = time.time()
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append((t, {victim}))
                except ProcessLookupError:
                    pass
            time.sleep(size["every_s"])
        wait_runs([run], size["wait_s"])
        return {**judge([run], read_journal(sc.journal), sc.store, kills), "kills": len(kills)}
    finally:
        sc.close()


def worker_kill(tmp: Path, log: Callable[[str], None], size: dict[str, Any]) -> dict[str, Any]:
    sc = Scenario("worker_kill", tmp, log)
    try:
        live = [sc.worker(), sc.worker()]
        d = sc.open()
        run = start_plan(d, sc.registry, "w", size["calls"], size["seconds"])
        kills: list[tuple[float, set[int]]] = []
        time.sleep(1.5)
        while run.thread.is_alive() and len(kills) < size["kills"]:
            ready = [w for w in live if w.proc.poll() is None and w.child_pids()]
            if ready:
                victim = ready[0]
                pids = {victim.pid, *victim.child_pids()}
                t = time.time()
                victim.kill()
                kills.append((t, pids))
                live.remove(victim)
                live.append(sc.worker(wait=False))  # a replacement, as an orchestrator of processes would
            time.sleep(size["every_s"])
        wait_runs([run], size["wait_s"])
        return {**judge([run], read_journal(sc.journal), sc.store, kills), "kills": len(kills)}
    finally:
        sc.close()


def overload(tmp: Path, log: Callable[[str], None], size: dict[str, Any]) -> dict[str, Any]:
    sc = Scenario("overload", tmp, log, queue_timeout_s=size.get("queue_timeout_s"))
    try:
        sc.worker(concurrency=1)
        sc.worker(concurrency=1)
        d = sc.open()
        run = start_plan(d, sc.registry, "o", size["calls"], size["seconds"])
        wait_runs([run], size["wait_s"])
        time.sleep(2.0)  # anything that would run after being reported failed has had time to start
        return judge([run], read_journal(sc.journal), sc.store, [])
    finally:
        sc.close()


def redis_down(tmp: Path, log: Callable[[str], None], size: dict[str, Any], down_s: float,
               long: bool) -> dict[str, Any]:
    name = "redis_down_40s" if long else "redis_down_2s"
    sc = Scenario(name, tmp, log, queue_timeout_s=size.get("queue_timeout_s"))
    try:
        sc.worker()
        sc.worker()
        d = sc.open()
        runs = [start_plan(d, sc.registry, "r", size["calls"], size["seconds"])]
        time.sleep(0.5)
        t_down = time.time()
        sc.redis.stop(signal.SIGKILL)
        extra: dict[str, Any] = {}
        if long:  # a plan submitted during the outage: its calls fail together, quickly
            time.sleep(1.0)
            t0 = time.monotonic()
            during = start_plan(d, sc.registry, "d", 8, size["seconds"])
            wait_runs([during], 60)
            extra["plan_during_outage_s"] = round(time.monotonic() - t0, 2)
            extra["plan_during_outage_failed"] = sum(o.status == "failed" for o in during.outcomes.values())
            runs.append(during)
        time.sleep(max(0.0, down_s - (time.time() - t_down)))
        sc.redis.start()
        t_up = time.time()
        wait_runs(runs, size["wait_s"] + down_s)
        time.sleep(2.0)
        journal = read_journal(sc.journal)
        starts_after = sorted(t for events in journal.values() for kind, _, t, _ in events
                              if kind == "start" and t > t_up)
        extra["first_start_after_redis_back_s"] = round(starts_after[0] - t_up, 2) if starts_after else None
        # How late the calls whose queue deadline passed during the outage were reported (0: on time).
        queue_s = size.get("queue_timeout_s") or sc.settings.queue_timeout_s
        overdue = [t - runs[0].t0 - queue_s for k, t in runs[0].failed_at.items()
                   if "queued" in (runs[0].outcomes[k].error or "")]
        extra["queue_failures_reported_late_s_max"] = round(max(overdue), 2) if overdue else None
        extra["down_s"] = down_s
        return {**judge(runs, journal, sc.store, []), **extra}
    finally:
        sc.close()


def poison(tmp: Path, log: Callable[[str], None], size: dict[str, Any]) -> dict[str, Any]:
    sc = Scenario("poison", tmp, log)
    try:
        sc.worker()
        sc.worker()
        d = sc.open()
        run = start_plan(d, sc.registry, "x", size["calls"], size["seconds"], poison={0})
        wait_runs([run], size["wait_s"])
        out = judge([run], read_journal(sc.journal), sc.store, [])
        o = run.outcomes.get("x0")
        out["poison_dead_lettered"] = bool(o is not None and "dead-lettered" in (o.error or ""))
        out["poison_runs"] = sum(1 for e in read_journal(sc.journal).get("x0", []) if e[0] == "start")
        return out
    finally:
        sc.close()


def late_worker(tmp: Path, log: Callable[[str], None], size: dict[str, Any]) -> dict[str, Any]:
    q = size["queue_timeout_s"]
    sc = Scenario("late_worker", tmp, log, queue_timeout_s=q)
    try:
        d = sc.open()
        # Measure how long a worker takes to start here, so the next ones become ready about at the deadline.
        t0 = time.monotonic()
        probe = sc.worker(concurrency=1)
        ready_s = time.monotonic() - t0
        probe.stop()
        runs = []
        for rnd in range(size["rounds"]):
            run = start_plan(d, sc.registry, f"l{rnd}-", size["calls"], size["seconds"])
            runs.append(run)
            lead = ready_s + random.uniform(-0.5, 0.5)
            time.sleep(max(0.0, q - lead))
            w = sc.worker(concurrency=1, wait=False)
            wait_runs([run], q + 30)
            time.sleep(2.0)
            w.stop()
        return {**judge(runs, read_journal(sc.journal), sc.store, []), "worker_ready_s": round(ready_s, 2)}
    finally:
        sc.close()


FULL = {
    "pool_kill": {"calls": 300, "seconds": 0.3, "kills": 20, "every_s": 1.0, "wait_s": 300},
    "worker_kill": {"calls": 300, "seconds": 0.3, "kills": 10, "every_s": 3.0, "wait_s": 300},
    "overload": {"calls": 800, "seconds": 0.2, "wait_s": 400},
    "redis_down_2s": {"calls": 100, "seconds": 0.3, "wait_s": 200},
    "redis_down_40s": {"calls": 100, "seconds": 0.3, "queue_timeout_s": 15.0, "wait_s": 200},
    "poison": {"calls": 40, "seconds": 0.2, "wait_s": 200},
    "late_worker": {"calls": 10, "seconds": 0.1, "queue_timeout_s": 6.0, "rounds": 4},
}
QUICK = {
    "pool_kill": {"calls": 24, "seconds": 0.3, "kills": 3, "every_s": 1.0, "wait_s": 90},
    "worker_kill": {"calls": 24, "seconds": 0.3, "kills": 1, "every_s": 3.0, "wait_s": 90},
    "overload": {"calls": 40, "seconds": 0.2, "queue_timeout_s": 2.0, "wait_s": 90},
    "redis_down_2s": {"calls": 24, "seconds": 0.5, "wait_s": 90},
    "redis_down_40s": {"calls": 24, "seconds": 0.5, "queue_timeout_s": 3.0, "wait_s": 90},
    "poison": {"calls": 4, "seconds": 0.1, "wait_s": 90},
    "late_worker": {"calls": 3, "seconds": 0.1, "queue_timeout_s": 4.0, "rounds": 1},
}
QUICK_OUTAGE_S = 5.0


def run_all(sizes: dict[str, dict[str, Any]], only: list[str], log: Callable[[str], None],
            long_outage_s: float, keep: Path | None = None) -> dict[str, Any]:
    scenarios: dict[str, Callable[[Path, Callable[[str], None], dict[str, Any]], dict[str, Any]]] = {
        "pool_kill": pool_kill, "worker_kill": worker_kill, "overload": overload,
        "redis_down_2s": lambda t, lg, s: redis_down(t, lg, s, 2.0, long=False),
        "redis_down_40s": lambda t, lg, s: redis_down(t, lg, s, long_outage_s, long=True),
        "poison": poison, "late_worker": late_worker,
    }
    figures: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
                               "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="sb-chaos-") as tmp_name:
        if keep is not None:
            tmp_name = str(keep)
            Path(tmp_name).mkdir(parents=True, exist_ok=True)
        for name, fn in scenarios.items():
            if only and name not in only:
                continue
            log(f"{name} …")
            t0 = time.monotonic()
            out = fn(Path(tmp_name), log, sizes[name])
            out["seconds"] = round(time.monotonic() - t0, 1)
            figures["scenarios"][name] = out
            log(f"  {json.dumps({k: v for k, v in out.items() if k != 'errors'})}")
    sc = figures["scenarios"]
    figures["lost"] = sum(s["lost"] for s in sc.values())
    figures["ran_after_failed"] = sum(s["ran_after_failed"] for s in sc.values())
    figures["wrong_results"] = sum(s["wrong_results"] for s in sc.values())
    figures["worker_kill_rerun_s_p95"] = sc.get("worker_kill", {}).get("rerun_s_p95")
    figures["machine"]["loadavg_end"] = list(os.getloadavg())
    return figures


def print_table(f: dict[str, Any]) -> None:
    print(f"{'scenario':<16} {'calls':>6} {'done':>6} {'failed':>6} {'lost':>5} {'ran_after_failed':>17} "
          f"{'wrong':>6} {'rerun_s_p95':>12} {'seconds':>8}")
    for name, s in f["scenarios"].items():
        rerun = "-" if s["rerun_s_p95"] is None else f"{s['rerun_s_p95']:.2f}"
        print(f"{name:<16} {s['calls']:>6} {s['done']:>6} {s['failed']:>6} {s['lost']:>5} "
              f"{s['ran_after_failed']:>17} {s['wrong_results']:>6} {rerun:>12} {s['seconds']:>8}")
        for err, n in s["errors"].items():
            print(f"    {n:>4} × {err}")
    print(f"\ntotals: lost {f['lost']}, ran_after_failed {f['ran_after_failed']}, wrong_results "
          f"{f['wrong_results']}, worker_kill_rerun_s_p95 {f['worker_kill_rerun_s_p95']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--quick", action="store_true", help="small, short scenarios (a smoke test)")
    p.add_argument("--only", default="", help="comma-separated scenarios to run (default: all)")
    p.add_argument("--seed", type=int, default=28)
    p.add_argument("--keep", type=Path, default=None,
                   help="keep each scenario's worker logs, Redis files and journal under this directory")
    args = p.parse_args(argv)
    random.seed(args.seed)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    only = [x.strip() for x in args.only.split(",") if x.strip()]
    figures = run_all(QUICK if args.quick else FULL, only, log, QUICK_OUTAGE_S if args.quick else 40.0, args.keep)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
