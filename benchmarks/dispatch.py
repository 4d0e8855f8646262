"""Dispatch benchmark: in-process vs Celery, side by side in one run.

    python benchmarks/dispatch.py [--json] [--calls 200] [--workers 1,2,4,8]

It starts its own redis-server (temp dir, AOF on) and ``switchboard worker`` processes, and measures:

1. round trip of a no-op expert call (a one-call plan through ``run_plan``): in-process
   (LocalDispatcher) vs Celery (QueuedDispatcher, prefork worker): p50, p99, their ratio, and the
   Celery overhead (Celery p50 - in-process p50; target < 5 ms). For scale, the same Redis also
   serves a plain Celery task (no events, no Switchboard) and a solo-pool worker;
2. a 1 MB image passed by reference (artifact id in the message, the expert reads the shared
   store): in-process vs Celery, and the Celery overhead with artifacts by reference (Celery p50 -
   in-process p50 of the same call; target < 5 ms); and the same image inlined in the message
   (base64 in the JSON) through Celery;
3. throughput with 1, 2, 4, 8 worker processes on an expert that sleeps 100 ms (a stand-in for
   GPU time): efficiency = throughput / (N x single-process throughput), target >= 0.9 at 8.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python benchmarks/dispatch.py
    sys.path.insert(0, str(REPO_ROOT))

from pydantic import BaseModel  # noqa: E402

from switchboard.expert import Expert, ExpertResult, ImageRef, RunContext  # noqa: E402


# -- the experts measured (workers load them through SWITCHBOARD_EXTRA_EXPERTS) -------------------------
class NoopArgs(BaseModel):
    n: int = 0


class NoopExpert(Expert):
    name = "bench_noop"
    description = "Benchmark: does nothing."
    Args = NoopArgs
    Result = ExpertResult

    def run(self, args: NoopArgs, ctx: RunContext) -> ExpertResult:
        return ExpertResult(summary="ok")


class ByRefArgs(BaseModel):
    image: ImageRef


class ByRefExpert(Expert):
    name = "bench_byref"
    description = "Benchmark: read an image's bytes from the shared store."
    Args = ByRefArgs
    Result = ExpertResult

    def run(self, args: ByRefArgs, ctx: RunContext) -> ExpertResult:
        return ExpertResult(summary=f"{len(ctx.store.read_bytes(args.image))} bytes")


class InlineArgs(BaseModel):
    data: str


class InlineExpert(Expert):
    name = "bench_inline"
    description = "Benchmark: take an image's bytes inlined in the message (base64)."
    Args = InlineArgs
    Result = ExpertResult

    def run(self, args: InlineArgs, ctx: RunContext) -> ExpertResult:
        return ExpertResult(summary=f"{len(base64.b64decode(args.data))} bytes")


class SleepArgs(BaseModel):
    seconds: float = 0.1


class SleepExpert(Expert):
    name = "bench_sleep"
    description = "Benchmark: sleep (stands in for GPU time)."
    Args = SleepArgs
    Result = ExpertResult

    def run(self, args: SleepArgs, ctx: RunContext) -> ExpertResult:
        time.sleep(args.seconds)
        return ExpertResult(summary="slept")


EXPERTS = [NoopExpert, ByRefExpert, InlineExpert, SleepExpert]
SPEC = ",".join(f"benchmarks.dispatch:{cls.__name__}" for cls in EXPERTS)


# -- plain Celery, none of Switchboard: the floor of a Celery round trip on this machine, right now ---
BARE_URL_ENV = "SWITCHBOARD_BENCH_BARE_URL"
BARE_QUEUE = "bench_bare"


def make_bare_app(url: str) -> Any:
    from celery import Celery

    app = Celery("bench-bare", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    task_acks_late=True, worker_prefetch_multiplier=1)

    @app.task(name="bench.bare_noop")
    def bare_noop() -> dict[str, str]:
        return {"summary": "ok"}

    return app


# `celery -A benchmarks.dispatch:bare_app worker` (the benchmark starts it with the URL set)
bare_app = make_bare_app(os.environ[BARE_URL_ENV]) if os.environ.get(BARE_URL_ENV) else None


def bare_round_trips(url: str, env: dict[str, str], calls: int, log_path: Path) -> list[float]:
    import signal
    import subprocess

    app = make_bare_app(url)
    task = app.tasks["bench.bare_noop"]
    cmd = [sys.executable, "-m", "celery", "-A", "benchmarks.dispatch:bare_app", "worker", "--pool", "prefork",
           "--concurrency", "1", "--loglevel", "warning", "--queues", BARE_QUEUE, "--without-mingle",
           "--without-gossip", "--hostname", "bench-bare@%h"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env={**env, BARE_URL_ENV: url}, cwd=str(REPO_ROOT), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                task.apply_async(queue=BARE_QUEUE).get(timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the plain Celery worker did not start; see {log_path}") from None
        out = []
        for i in range(10 + calls):
            t0 = time.perf_counter()
            task.apply_async(queue=BARE_QUEUE).get(timeout=30)
            if i >= 10:
                out.append(time.perf_counter() - t0)
        return out
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        app.close()


# -- measuring ------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in seconds]
    return {"p50_ms": round(_pct(ms, 0.5), 3), "p99_ms": round(_pct(ms, 0.99), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}


def _one_call_plan(registry: Any, expert: str, args: dict[str, Any]) -> Any:
    from orchestrator.commands import Call, ValidCall
    from orchestrator.plan import Plan

    cls = registry.get_class(expert)
    return Plan([ValidCall("c1", expert, cls.Args.model_validate(args), Call("c1", expert, {}))])


def _many_calls_plan(registry: Any, expert: str, args: dict[str, Any], n: int) -> Any:
    from orchestrator.commands import Call, ValidCall
    from orchestrator.plan import Plan

    cls = registry.get_class(expert)
    typed = cls.Args.model_validate(args)
    return Plan([ValidCall(f"c{i}", expert, typed, Call(f"c{i}", expert, {})) for i in range(n)])


def round_trips(dispatcher: Any, plan: Any, calls: int, warmup: int = 10) -> list[float]:
    out = []
    for i in range(warmup + calls):
        t0 = time.perf_counter()
        result = dispatcher.run_plan(plan)
        dt = time.perf_counter() - t0
        if not result.ok:
            raise RuntimeError(f"benchmark call failed: {result.outcomes[0].error}")
        if i >= warmup:
            out.append(dt)
    return out


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _noise_image(nbytes: int) -> bytes:
    """A PNG of random pixels of about ``nbytes`` (noise does not compress)."""
    import io

    import numpy as np
    from PIL import Image

    side = int((nbytes / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def throughput(queued: Any, registry: Any, env: dict[str, str], tmp: Path, worker_counts: list[int],
               calls_per_process: int, layout: str, log: Any) -> dict[str, Any]:
    """Calls per second with N processes on the 100 ms expert; efficiency against N x one process."""
    from workers.testing import WorkerProcess

    out: dict[str, Any] = {}
    base = None
    for n in worker_counts:
        log(f"throughput with {n} worker process(es), {layout} …")
        if layout == "separate":
            workers = [WorkerProcess(["bench_sleep"], env=env, log_path=tmp / f"worker-{layout}-{n}-{i}.log",
                                     name=f"bench-{layout}-{n}-{i}", loglevel="warning") for i in range(n)]
        else:
            workers = [WorkerProcess(["bench_sleep"], env=env, concurrency=n, log_path=tmp / f"worker-{layout}-{n}.log",
                                     name=f"bench-{layout}-{n}", loglevel="warning")]
        try:
            for w in workers:
                w.launch()
            for w in workers:
                w.wait_ready()
            queued.run_plan(_many_calls_plan(registry, "bench_sleep", {"seconds": 0.1}, n))  # warm up
            m = n * calls_per_process
            plan = _many_calls_plan(registry, "bench_sleep", {"seconds": 0.1}, m)
            t0 = time.perf_counter()
            result = queued.run_plan(plan)
            dt = time.perf_counter() - t0
        finally:
            for w in workers:
                w.stop()
        if not result.ok:
            raise RuntimeError(f"throughput run failed: {[o.error for o in result.outcomes if o.error][:3]}")
        rate = m / dt
        base = base or rate / n
        out[str(n)] = {"calls": m, "seconds": round(dt, 3), "calls_per_s": round(rate, 2),
                       "efficiency": round(rate / (n * base), 3)}
    return out


def run(calls: int, worker_counts: list[int], sleep_calls_per_worker: int, log: Any) -> dict[str, Any]:
    from orchestrator.dispatch import LocalDispatcher
    from switchboard.artifacts import ArtifactStore
    from switchboard.registry import Registry
    from switchboard.settings import Settings
    from workers.dispatch import QueuedDispatcher
    from workers.testing import RedisServer, WorkerProcess, worker_env

    registry = Registry()
    for cls in EXPERTS:
        registry.register(cls, "benchmarks")
    figures: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())}}
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as tmp_name:
        tmp = Path(tmp_name)
        store = ArtifactStore(tmp / "artifacts")
        with RedisServer(tmp / "redis", fsync="everysec") as redis_server:
            env = worker_env(redis_server.url, tmp / "artifacts", extra_experts=SPEC)
            settings = Settings(broker_url=redis_server.url, artifact_dir=tmp / "artifacts", call_timeout_s=30)
            local = LocalDispatcher(registry, store, max_workers=4)
            queued = QueuedDispatcher(registry, store, settings=settings)
            try:
                # 1. no-op round trip
                log("round trip of a no-op call: in-process vs Celery …")
                noop = _one_call_plan(registry, "bench_noop", {})
                with WorkerProcess(["bench_noop", "bench_byref", "bench_inline"], env=env, concurrency=1,
                                   log_path=tmp / "worker-rt.log", name="bench-rt", loglevel="warning") as worker:
                    in_proc = round_trips(local, noop, calls)
                    round_trips(queued, noop, 0)  # warm up before counting CPU
                    procs = {"worker_main": worker.pid, "worker_pool": worker.child_pids()[0],
                             "redis": redis_server.pid}
                    cpu0, own0 = {k: _cpu_s(v) for k, v in procs.items()}, time.process_time()
                    celery = round_trips(queued, noop, calls, warmup=0)
                    cpu = {k: round((_cpu_s(v) - cpu0[k]) / calls * 1000, 2) for k, v in procs.items()}
                    cpu["orchestrator"] = round((time.process_time() - own0) / calls * 1000, 2)
                    a, b = _summary(in_proc), _summary(celery)
                    figures["noop_round_trip"] = {
                        "in_process": a, "celery": b, "celery_cpu_ms_per_call": cpu,
                        "ratio_p50": round(b["p50_ms"] / a["p50_ms"], 1),
                        "ratio_p99": round(b["p99_ms"] / a["p99_ms"], 1),
                        "celery_overhead_p50_ms": round(b["p50_ms"] - a["p50_ms"], 3),
                        "target_overhead_p50_ms": 5.0,
                    }
                    # 2. 1 MB image: by reference vs inlined
                    log("1 MB image by reference vs inlined …")
                    data = _noise_image(1_000_000)
                    meta = store.put_bytes(data, kind="image", media_type="image/png")
                    by_ref = _one_call_plan(registry, "bench_byref", {"image": meta.id})
                    inline = _one_call_plan(registry, "bench_inline", {"data": base64.b64encode(data).decode()})
                    n_img = max(20, calls // 4)
                    r_ref_local = _summary(round_trips(local, by_ref, calls))
                    r_ref = _summary(round_trips(queued, by_ref, calls))
                    r_inl = _summary(round_trips(queued, inline, n_img, 3))
                    figures["image_1mb"] = {
                        "image_bytes": len(data),
                        "by_reference_in_process": r_ref_local,
                        "by_reference": {**r_ref, "message_arg_bytes": len(meta.id)},
                        "celery_overhead_by_reference_p50_ms": round(r_ref["p50_ms"] - r_ref_local["p50_ms"], 3),
                        "inlined": {**r_inl, "message_arg_bytes": len(base64.b64encode(data))},
                        "ratio_p50_inlined_over_ref": round(r_inl["p50_ms"] / r_ref["p50_ms"], 1),
                    }
                # the floor: a plain Celery task (no events, no Switchboard) through the same Redis
                log("round trip of a plain Celery task (the floor) …")
                bare = _summary(bare_round_trips(redis_server.url, env, calls, tmp / "worker-bare.log"))
                figures["noop_round_trip"]["plain_celery_task"] = bare
                figures["noop_round_trip"]["switchboard_over_plain_celery_p50_ms"] = round(
                    figures["noop_round_trip"]["celery"]["p50_ms"] - bare["p50_ms"], 3)
                # the same no-op through a solo-pool worker (no parent -> pool process hop; no time limits)
                log("round trip of a no-op call through a solo-pool worker …")
                with WorkerProcess(["bench_noop"], env=env, pool="solo", log_path=tmp / "worker-solo.log",
                                   name="bench-solo", loglevel="warning"):
                    solo = _summary(round_trips(queued, noop, calls))
                    figures["noop_round_trip"]["celery_solo_pool"] = solo
                    figures["noop_round_trip"]["celery_solo_overhead_p50_ms"] = round(
                        solo["p50_ms"] - figures["noop_round_trip"]["in_process"]["p50_ms"], 3)
                # 3. throughput with N worker processes on a 100 ms expert, laid out two ways: N workers
                # of one process each (what `docker-compose up --scale X=N` runs: one per GPU), and one
                # worker with --concurrency N (its main process handles every call's messages).
                figures["throughput_sleep_100ms"] = {
                    "ideal_calls_per_s_per_process": 10.0, "target_efficiency_at_8": 0.9,
                    "separate_workers": throughput(queued, registry, env, tmp, worker_counts, sleep_calls_per_worker,
                                                   "separate", log),
                    "one_worker_concurrency_n": throughput(queued, registry, env, tmp, worker_counts,
                                                           sleep_calls_per_worker, "concurrency", log),
                }
            finally:
                queued.close()
                local.close()
    figures["machine"]["loadavg_end"] = list(os.getloadavg())
    return figures


def print_table(f: dict[str, Any]) -> None:
    rt = f["noop_round_trip"]
    m = f["machine"]
    print(f"machine: {m['cpus']} CPUs, load average {m['loadavg_start'][0]:.1f} at start, "
          f"{m['loadavg_end'][0]:.1f} at end (other processes share the CPUs; latencies scale with it)")
    print("\nno-op call round trip (one-call plan)      p50 ms    p99 ms")
    print(f"  in-process (LocalDispatcher)          {rt['in_process']['p50_ms']:9.3f} {rt['in_process']['p99_ms']:9.3f}")
    print(f"  Celery + Redis, prefork worker        {rt['celery']['p50_ms']:9.3f} {rt['celery']['p99_ms']:9.3f}")
    print(f"  ratio Celery / in-process             {rt['ratio_p50']:9.1f} {rt['ratio_p99']:9.1f}")
    bare = rt["plain_celery_task"]
    print(f"  plain Celery task, no Switchboard     {bare['p50_ms']:9.3f} {bare['p99_ms']:9.3f}   (the floor here)")
    solo = rt["celery_solo_pool"]
    print(f"  Celery + Redis, solo-pool worker      {solo['p50_ms']:9.3f} {solo['p99_ms']:9.3f}")
    ok = "OK" if rt["celery_overhead_p50_ms"] < rt["target_overhead_p50_ms"] else "MISSED"
    cpu = rt["celery_cpu_ms_per_call"]
    print("  CPU per Celery call (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    print(f"  Celery overhead p50: {rt['celery_overhead_p50_ms']:.2f} ms prefork (target < 5 ms: {ok}), "
          f"{rt['celery_solo_overhead_p50_ms']:.2f} ms solo; "
          f"{rt['switchboard_over_plain_celery_p50_ms']:.2f} ms above a plain Celery task")
    im = f["image_1mb"]
    print(f"\n1 MB image ({im['image_bytes']} bytes)                  p50 ms    p99 ms")
    loc = im["by_reference_in_process"]
    print(f"  by reference, in-process              {loc['p50_ms']:9.3f} {loc['p99_ms']:9.3f}")
    print(f"  by reference (artifact id)            {im['by_reference']['p50_ms']:9.3f} {im['by_reference']['p99_ms']:9.3f}")
    ok = "OK" if im["celery_overhead_by_reference_p50_ms"] < rt["target_overhead_p50_ms"] else "MISSED"
    print(f"  Celery overhead by reference (p50)    {im['celery_overhead_by_reference_p50_ms']:9.3f}   (target < 5 ms: {ok})")
    print(f"  inlined (base64 in the message)       {im['inlined']['p50_ms']:9.3f} {im['inlined']['p99_ms']:9.3f}")
    print(f"  inlined / by reference (p50)          {im['ratio_p50_inlined_over_ref']:9.1f}")
    th = f["throughput_sleep_100ms"]
    for key, title in (("separate_workers", "N workers of one process (docker-compose --scale)"),
                       ("one_worker_concurrency_n", "one worker, --concurrency N")):
        print(f"\nthroughput, expert sleeping 100 ms: {title}")
        print("  processes   calls   seconds   calls/s   efficiency")
        for n, row in th[key].items():
            print(f"  {n:>9} {row['calls']:>7} {row['seconds']:>9.2f} {row['calls_per_s']:>9.2f} "
                  f"{row['efficiency']:>12.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--calls", type=int, default=200, help="round trips per measurement (default 200)")
    p.add_argument("--workers", default="1,2,4,8", help="worker process counts (default 1,2,4,8)")
    p.add_argument("--sleep-calls", type=int, default=20, help="100 ms calls per worker process (default 20)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",") if x.strip()]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    figures = run(args.calls, counts, args.sleep_calls, log)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
