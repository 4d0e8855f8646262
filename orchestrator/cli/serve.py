"""``switchboard serve``: the API and the web chat page under uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import sys


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchboard serve",
                                description="Serve the OpenAI-compatible API and the web chat page.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--no-preload", action="store_true",
                   help="load the core on the first request instead of at start")
    p.add_argument("--no-auth", action="store_true",
                   help="allow serving without API keys on a non-loopback address")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from switchboard.settings import get_settings

    settings = get_settings()
    if not settings.api_keys and not _is_loopback(args.host) and not args.no_auth:
        print(f"switchboard serve: refusing to serve {args.host} without API keys; set SWITCHBOARD_API_KEYS "
              "(a JSON list, e.g. '[\"sk-…\"]'), or pass --no-auth if that is really meant", file=sys.stderr)
        return 2

    import uvicorn

    from orchestrator.api.app import create_app

    app = create_app(settings, preload=not args.no_preload)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    auth = "API key required" if settings.api_keys else "open: no API keys set (SWITCHBOARD_API_KEYS)"
    dispatch = "Celery" if settings.broker_url else "in-process"
    print(f"Switchboard on http://{shown}:{args.port}/  ({auth}; {dispatch} dispatch)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
