"""The soak benchmark runs against a real server process and reports what it claims (tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_soak_reports_errors_rss_and_gc(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--json", "--turns", "6",
                           "--concurrency", "3", "--keep", str(tmp_path / "soak")],
                          capture_output=True, text=True, timeout=880, cwd=REPO)
    out = json.loads(proc.stdout)
    assert proc.returncode == 0, (out, proc.stderr[-2000:])
    assert out["turns"] == 6 and out["errors"] == 0, out["error_samples"]
    assert sum(v["n"] for k, v in out["turn_s"].items() if isinstance(v, dict)) == 6
    assert out["rss_turn30_mb"] > 0 and out["rss_last_over_turn30"] == pytest.approx(
        out["rss_last_mb"] / out["rss_turn30_mb"], rel=0.01)
    # retention 0: every conversation and every artifact is gone, and the report says so
    assert out["artifacts_before_gc"] > 0 and out["conversations_before_gc"] == 6 - (out["turn_s"].get(
        "follow-up", {}).get("n", 0))
    assert out["artifacts_after_gc"] == out["artifacts_of_live_conversations"] == 0
    assert out["gc"]["artifacts_removed"] == out["artifacts_before_gc"] and out["gc_ok"]
    assert (tmp_path / "soak" / "server.log").exists()
