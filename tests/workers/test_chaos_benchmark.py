"""``benchmarks/chaos.py`` runs: two of its scenarios, small (``--quick``), through its command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workers.testing import REPO_ROOT

pytestmark = pytest.mark.integration


def test_chaos_benchmark_runs_and_keeps_every_promise() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "chaos.py"), "--quick", "--json",
                          "--only", "overload,poison"], capture_output=True, text=True, timeout=120, env=env,
                         cwd=REPO_ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout)
    assert set(figures["scenarios"]) == {"overload", "poison"}
    for s in figures["scenarios"].values():
        assert {"calls", "lost", "ran_after_failed", "wrong_results", "rerun_s_p95"} <= s.keys()
    assert (figures["lost"], figures["ran_after_failed"], figures["wrong_results"]) == (0, 0, 0), figures
    assert figures["scenarios"]["overload"]["failed"] > 0  # the queue deadline was exercised
    assert figures["scenarios"]["poison"]["poison_dead_lettered"]
