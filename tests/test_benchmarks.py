"""The in-process batching ceiling benchmark runs and reports what it claims (tiny settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_batch_ceiling_prints_ratios_for_run_and_model():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "batch_ceiling.py"), "--json",
                           "--experts", "detect,segment", "--calls", "2", "--rounds", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["calls"] == 2 and out["device"] == "cpu"
    for name in ("detect", "segment"):
        row = out["experts"][name]
        assert row["single_calls_per_s"] > 0 and row["batch_calls_per_s"] > 0
        assert row["ceiling_ratio"] == pytest.approx(row["batch_calls_per_s"] / row["single_calls_per_s"], rel=0.05)
        model = row["model_only"]
        assert "skipped" not in model, model
        assert model["batch1_ms_per_item"] > 0 and model["batch2_ms_per_item"] > 0
