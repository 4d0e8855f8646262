"""Dynamic batching benchmark: 16 concurrent calls of one expert, batched worker vs one at a time.

    python benchmarks/batching.py [--json] [--experts detect,segment,generate] [--calls 16] [--rounds 4]

It starts its own redis-server and, for each expert, two ``switchboard worker`` processes on the same
queue, both with their model loaded; measured rounds alternate between them (only the measured one
consumes the queue), so a change in the machine's load hits both alike:

- one at a time: the default worker (prefork, ``--concurrency 1``): calls run one after another;
- batched: ``--batch-max 16 --batch-window-ms 10`` (a threads pool of 16; concurrent calls of the
  expert run through its ``run_batch``).

Each round submits ``--calls`` calls at once through the QueuedDispatcher (a fresh shapes-world image,
or prompt and seed, per call and round; the same inputs for both workers) and waits for all of them.
Throughput = calls / wall time of the rounds; latency = submit to result, per call, pooled over the
rounds. Two unmeasured rounds warm each worker up first (model loading, first-call costs).
Targets (issue #9): throughput ratio >= 2 with p95 latency no worse than one at a time.

Experts: ``detect`` (query "everything"), ``segment`` (a point prompt) and ``generate`` (20 steps)
when ``experts/generate.py`` and its model exist; otherwise it is reported as skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib.util
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python benchmarks/batching.py
    sys.path.insert(0, str(REPO_ROOT))

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
    os.environ.setdefault(_var, "1")

WARMUP_ROUNDS = 2
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow hexagon", "a purple circle",
           "an orange square on a grey background", "two blue circles", "a small red triangle"]


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0-1) of values, nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def availability(name: str, registry: Any) -> str | None:
    """None when the expert can be benchmarked here, else why not."""
    from switchboard.settings import get_settings

    s = get_settings()
    if name == "generate":
        if importlib.util.find_spec("experts.generate") is None:
            return "skipped: experts/generate.py not present"
        from experts.generate import model_path

        folder = model_path(s)
        if not folder.is_dir() or not any(folder.iterdir()):
            return f"skipped: no model ({folder})"
        return None
    if name not in registry:
        return "skipped: expert not installed"
    return None


def make_inputs(name: str, store: Any, seed: int, n: int) -> list[dict[str, Any]]:
    """``n`` calls for one round: a new image (or prompt and seed) per call."""
    if name == "generate":
        return [{"prompt": PROMPTS[(seed + i) % len(PROMPTS)], "seed": seed * 1000 + i} for i in range(n)]
    from training.shapes import make_scene

    ids = [store.put_image(make_scene(seed * 1000 + i).image).id for i in range(n)]
    if name == "detect":
        return [{"image": i, "query": "everything"} for i in ids]
    if name == "segment":
        return [{"image": i, "points": [[500, 500]]} for i in ids]
    raise ValueError(f"no inputs for {name}")


def run_round(dispatcher: Any, name: str, calls: list[dict[str, Any]], tag: str) -> tuple[float, list[float]]:
    """Submit every call at once; return (wall seconds, latency of each call in seconds)."""
    lat: list[float] = [0.0] * len(calls)
    done = threading.Event()
    left = [len(calls)]
    lock = threading.Lock()
    errors: list[str] = []

    def finished(i: int, t0: float) -> Callable[[cf.Future], None]:
        def cb(f: cf.Future) -> None:
            lat[i] = time.perf_counter() - t0
            if f.exception() is not None:
                errors.append(str(f.exception()))
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()
        return cb

    start = time.perf_counter()
    for i, args in enumerate(calls):
        t0 = time.perf_counter()
        fut = dispatcher.submit(f"{tag}-{i}", name, args, conversation_id=None, emit=lambda e: None)
        fut.add_done_callback(finished(i, t0))
    if not done.wait(600):
        raise TimeoutError(f"{name}: round {tag} did not finish")
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} call(s) failed, e.g. {errors[0]}")
    return wall, lat


def summarise(walls: list[float], lats: list[float], calls: int) -> dict[str, Any]:
    return {"calls_per_s": calls / sum(walls), "p50_ms": 1000 * statistics.median(lats),
            "p95_ms": 1000 * pct(lats, 0.95), "max_ms": 1000 * max(lats), "round_s": [round(x, 3) for x in walls]}


def compare(name: str, ctx: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Both workers up at once, models loaded; rounds alternate between them (only the measured one
    consumes the queue: Celery's add/cancel consumer), so a change in the machine's load hits both."""
    from workers.testing import WorkerProcess

    a, d = ctx["args"], ctx["dispatcher"]
    modes = {
        "one_at_a_time": {"concurrency": 1},
        "batched": {"concurrency": a.batch_max, "pool": "threads",
                    "extra_args": ["--batch-max", str(a.batch_max), "--batch-window-ms", str(a.window_ms)]},
    }
    workers = {m: WorkerProcess([name], env=ctx["env"], log_path=ctx["tmp"] / f"worker-{name}-{m}.log",
                                name=f"bench-{name}-{m.replace('_', '-')}", loglevel="warning", **kw)
               for m, kw in modes.items()}
    host = socket.gethostname()
    queue = ctx["registry"].get_class(name).queue_name()

    def only(mode: str) -> None:
        for m, w in workers.items():
            node = [f"{w.name}@{host}"]
            if m == mode:
                d.app.control.add_consumer(queue, destination=node, reply=True, timeout=10)
            else:
                d.app.control.cancel_consumer(queue, destination=node, reply=True, timeout=10)

    try:
        for w in workers.values():
            w.start(timeout=120)
        walls: dict[str, list[float]] = {m: [] for m in modes}
        lats: dict[str, list[float]] = {m: [] for m in modes}
        for m in modes:
            only(m)
            for r in range(WARMUP_ROUNDS):
                run_round(d, name, make_inputs(name, ctx["store"], 900 + r, a.calls), f"{m}-w{r}")
        for r in range(a.rounds):
            for m in (modes if r % 2 == 0 else reversed(list(modes))):
                only(m)
                wall, lat = run_round(d, name, ctx["inputs"][name][r], f"{m}-{r}")
                walls[m].append(wall)
                lats[m].extend(lat)
                time.sleep(0.2)
    finally:
        for w in workers.values():
            w.stop()
    rows = {m: summarise(walls[m], lats[m], a.calls * a.rounds) for m in modes}
    for m, row in rows.items():
        log(f"  {name} {m}: {row['calls_per_s']:.2f} calls/s, p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms")
    return rows


def run(a: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from switchboard.artifacts import ArtifactStore
    from switchboard.registry import Registry, get_registry
    from switchboard.settings import Settings
    from workers.dispatch import QueuedDispatcher
    from workers.testing import RedisServer, worker_env

    names = [n.strip() for n in a.experts.split(",") if n.strip()]
    load0 = os.getloadavg()
    figures: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average_start": [round(x, 2) for x in load0],
        "calls": a.calls, "rounds": a.rounds, "batch_max": a.batch_max, "window_ms": a.window_ms,
        "torch_threads": a.threads,
        "experts": {},
    }
    full = get_registry()
    extra = []
    if "generate" in names and "generate" not in full and importlib.util.find_spec("experts.generate") is not None:
        extra.append("experts.generate:GenerateExpert")  # not yet in the installed entry points
    with tempfile.TemporaryDirectory(prefix="sb-batching-") as tmpd:
        tmp = Path(tmpd)
        with RedisServer(tmp / "redis", fsync="no") as redis_server:
            env = worker_env(redis_server.url, tmp / "artifacts", extra_experts=",".join(extra),
                             OMP_NUM_THREADS=str(a.threads))
            store = ArtifactStore(tmp / "artifacts")
            registry = Registry()
            for n in full.names():
                registry.register(full.get_class(n))
            if extra:
                from switchboard.registry import load_extra_experts

                load_extra_experts(registry, ",".join(extra))
            settings = Settings(broker_url=redis_server.url, artifact_dir=tmp / "artifacts", call_timeout_s=600)
            dispatcher = QueuedDispatcher(registry, store, settings=settings)
            try:
                for name in names:
                    why = availability(name, registry)
                    if why:
                        log(f"{name}: {why}")
                        figures["experts"][name] = {"skipped": why}
                        continue
                    inputs = {name: [make_inputs(name, store, r + 1, a.calls) for r in range(a.rounds)]}
                    ctx = {"args": a, "env": env, "tmp": tmp, "store": store, "dispatcher": dispatcher,
                           "inputs": inputs, "registry": registry}
                    log(f"{name}: one at a time vs batched, alternating ({a.calls} concurrent calls x {a.rounds} "
                        "rounds each)")
                    rows = compare(name, ctx, log)
                    single, batched = rows["one_at_a_time"], rows["batched"]
                    ratio = batched["calls_per_s"] / single["calls_per_s"]
                    figures["experts"][name] = {
                        "one_at_a_time": single, "batched": batched,
                        "throughput_ratio": round(ratio, 3),
                        "p95_ratio": round(batched["p95_ms"] / single["p95_ms"], 3),
                        "meets_target": ratio >= 2.0 and batched["p95_ms"] <= single["p95_ms"],
                    }
            finally:
                dispatcher.close()
    figures["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    for row in figures["experts"].values():
        for mode in ("one_at_a_time", "batched"):
            if mode in row:
                row[mode] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row[mode].items()}
    return figures


def print_table(f: dict[str, Any]) -> None:
    print(f"batching: {f['calls']} concurrent calls x {f['rounds']} rounds; batched = --batch-max {f['batch_max']} "
          f"--batch-window-ms {f['window_ms']:g}; {f['torch_threads']} torch thread(s) per worker; {f['machine']}; "
          f"load average {f['load_average_start'][0]} "
          f"-> {f['load_average_end'][0]}")
    print(f"{'expert':<10} {'mode':<14} {'calls/s':>9} {'p50 ms':>9} {'p95 ms':>9}   ratio")
    for name, row in f["experts"].items():
        if "skipped" in row:
            print(f"{name:<10} {row['skipped']}")
            continue
        for mode in ("one_at_a_time", "batched"):
            r = row[mode]
            extra = ""
            if mode == "batched":
                ok = "meets" if row["meets_target"] else "MISSES"
                extra = (f"   throughput x{row['throughput_ratio']:.2f}, p95 x{row['p95_ratio']:.2f} "
                         f"({ok} the target: >= 2x, p95 no worse)")
            print(f"{name:<10} {mode.replace('_', ' '):<14} {r['calls_per_s']:>9.2f} {r['p50_ms']:>9.0f} "
                  f"{r['p95_ms']:>9.0f}{extra}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--experts", default="detect,segment,generate", help="comma-separated (default all three)")
    p.add_argument("--calls", type=int, default=16, help="concurrent calls per round (default 16)")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds per worker (default 4)")
    p.add_argument("--batch-max", type=int, default=16, help="the batched worker's --batch-max (default 16)")
    p.add_argument("--window-ms", type=float, default=10.0, help="the batched worker's window (default 10)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads per worker (OMP_NUM_THREADS; default 1: on a shared 2-core machine "
                        "more threads than free cores make every op wait on busy ones)")
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    figures = run(a, log)
    if a.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
