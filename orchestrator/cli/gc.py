"""``switchboard gc``: apply the retention to the conversation and artifact stores.

Conversations not updated for ``SWITCHBOARD_RETENTION_DAYS`` (or ``--days``) are removed, then every
artifact older than that which no remaining conversation references (``orchestrator.session.collect_garbage``).
Safe to run beside a serving process (a cron job, say): what a turn in progress just made is younger
than the retention and stays.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchboard gc", description=(
        "Remove conversations older than the retention (SWITCHBOARD_RETENTION_DAYS) and the artifacts "
        "no remaining conversation references."))
    p.add_argument("--days", type=float, default=None,
                   help="retention in days (default: SWITCHBOARD_RETENTION_DAYS); 0 removes every conversation")
    p.add_argument("--json", action="store_true", help="print what was removed and kept as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.session import ConversationStore, collect_garbage
    from switchboard.artifacts import ArtifactStore
    from switchboard.settings import get_settings

    settings = get_settings()
    days = args.days if args.days is not None else settings.retention_days
    if days is None:
        print("switchboard gc: no retention set: set SWITCHBOARD_RETENTION_DAYS or pass --days", file=sys.stderr)
        return 2
    if days < 0:
        print("switchboard gc: the retention must be 0 days or more", file=sys.stderr)
        return 2
    report = collect_garbage(ConversationStore.from_settings(settings), ArtifactStore.from_settings(settings), days)
    if args.json:
        print(json.dumps({"retention_days": days, **asdict(report)}))
    else:
        print(f"removed {report.conversations_removed} conversation(s) and {report.artifacts_removed} artifact(s); "
              f"kept {report.conversations_kept} conversation(s) and {report.artifacts_kept} artifact(s) "
              f"(retention {days:g} days)")
    return 0
