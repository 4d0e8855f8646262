"""``switchboard worker``: start a Celery worker that serves some experts' queues.

    switchboard worker --experts detect,segment [--concurrency N] [--pool prefork|solo|threads]
    switchboard worker --experts detect --batch-max 8 [--batch-window-ms 5]    # dynamic batching

The queues are the experts' ``queue_name()``s, taken from the registry (entry points, plus
``SWITCHBOARD_EXTRA_EXPERTS``), so a plugin's expert is served by naming it. The broker is
``SWITCHBOARD_BROKER_URL``, which must be set (unset means in-process dispatch: no worker is needed).

``--batch-max N`` (``SWITCHBOARD_BATCH_MAX_SIZE``) turns on dynamic batching (workers.batching): the
worker runs a threads pool of ``--concurrency`` threads (default N) and runs concurrent calls of one
expert through its ``run_batch``, up to N at a time, waiting at most ``--batch-window-ms`` for more.
"""

from __future__ import annotations

import argparse
import sys

POOLS = ("prefork", "solo", "threads")
LOGLEVELS = ("debug", "info", "warning", "error", "critical")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="switchboard worker",
        description="Start a Celery worker for some experts' queues (one queue per expert).",
        epilog="Each pool process loads an expert's model on its first call and keeps it. Time limits are "
               "enforced by the prefork pool only (Celery does not enforce them in solo or threads pools). "
               "With --batch-max, every call the worker holds shares one process: if it dies, all of them "
               "are put back in their queues within seconds (its heartbeat stops) and each counts a death.")
    p.add_argument("--experts", default="all",
                   help="comma-separated expert names, or 'all' for every registered expert (default)")
    p.add_argument("--concurrency", "-c", type=int, default=None,
                   help="pool processes (threads for --pool threads); one per GPU model copy "
                        "(default 1; with --batch-max, the batch size)")
    p.add_argument("--pool", "-P", choices=POOLS, default=None,
                   help="execution pool (default prefork; threads with --batch-max)")
    p.add_argument("--batch-max", type=int, default=None,
                   help="run up to N concurrent calls of one expert through its run_batch at once "
                        "(threads pool; default SWITCHBOARD_BATCH_MAX_SIZE, 1 = no batching)")
    p.add_argument("--batch-window-ms", type=float, default=None,
                   help="how long to wait for more calls after the first of a batch arrives "
                        "(default SWITCHBOARD_BATCH_WINDOW_MS, 5)")
    p.add_argument("--loglevel", "-l", choices=LOGLEVELS, default="info", type=str.lower)
    p.add_argument("--hostname", "-n", default=None,
                   help="node name (default <experts>@<host>); must be unique per worker for Flower")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency is not None and args.concurrency < 1:
        print("switchboard worker: --concurrency must be at least 1", file=sys.stderr)
        return 2

    from switchboard.settings import get_settings
    from workers.config import BrokerNotConfigured, broker_url, redacted_url, worker_registry
    from workers.routing import queues_for

    settings = get_settings()
    batch_max = args.batch_max if args.batch_max is not None else settings.batch_max_size
    window_ms = args.batch_window_ms if args.batch_window_ms is not None else settings.batch_window_ms
    if not 1 <= batch_max <= 256 or not 0 <= window_ms <= 1000:
        print("switchboard worker: --batch-max must be within 1-256 and --batch-window-ms within 0-1000",
              file=sys.stderr)
        return 2
    if batch_max > 1:
        if args.pool not in (None, "threads"):
            print(f"switchboard worker: --batch-max needs the threads pool (a {args.pool} pool runs one call "
                  "per process at a time); leave --pool out or use --pool threads", file=sys.stderr)
            return 2
        args.pool = "threads"
        args.concurrency = args.concurrency or batch_max
    # What the tasks of this process read (workers.tasks takes its settings from the app).
    settings = settings.model_copy(update={"batch_max_size": batch_max, "batch_window_ms": window_ms})
    args.pool = args.pool or "prefork"
    args.concurrency = args.concurrency or 1
    try:
        registry = worker_registry(settings)
    except (ImportError, ValueError) as e:
        print(f"switchboard worker: {e}", file=sys.stderr)
        return 2
    if args.experts.strip() == "all":
        experts = registry.names()
    else:
        experts = [e.strip() for e in args.experts.split(",") if e.strip()]
    unknown = [e for e in experts if e not in registry]
    if unknown or not experts:
        what = f"unknown expert(s) {', '.join(unknown)}" if unknown else "no experts given"
        print(f"switchboard worker: {what}; registered experts: {', '.join(registry.names()) or '(none)'}",
              file=sys.stderr)
        return 2
    try:
        url = broker_url(settings)
    except BrokerNotConfigured as e:
        print(f"switchboard worker: {e}", file=sys.stderr)
        return 2
    queues = queues_for(registry, experts)
    hostname = args.hostname or f"{'+'.join(experts)}@%h"
    if args.pool != "prefork":
        print(f"switchboard worker: note: the {args.pool} pool does not enforce time limits; the orchestrator "
              "still gives up on a call at its deadline", file=sys.stderr)
    batching = (f"; batches of up to {batch_max} calls per expert, window {window_ms:g} ms"
                if batch_max > 1 else "")
    print(f"switchboard worker: experts {', '.join(experts)} on queues {', '.join(queues)} "
          f"via {redacted_url(url)}{batching}", file=sys.stderr, flush=True)

    from workers.app import app

    app.switchboard_settings = settings

    celery_argv = [
        "worker", "--queues", ",".join(queues), "--concurrency", str(args.concurrency), "--pool", args.pool,
        "--loglevel", args.loglevel, "--hostname", hostname,
        # Mingle (revoked-id sync at start) and gossip cost start-up time and broker traffic; calls
        # carry an expiry instead, so a worker that starts late still drops abandoned calls.
        "--without-mingle", "--without-gossip",
    ]
    try:
        rc = app.start(celery_argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
