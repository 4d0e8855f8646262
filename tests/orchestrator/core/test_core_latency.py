"""benchmarks/core_latency.py --quick on the shipped core: jump-forward plans are the token-by-token
plans, with fewer forward passes (the figures themselves are the benchmark's, in benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_core_latency_quick() -> None:
    if not (ROOT / "models" / "core" / "core.json").exists():
        pytest.skip("no shipped core")
    spec = importlib.util.spec_from_file_location("core_latency", ROOT / "benchmarks" / "core_latency.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--json"])
    for key in ("plan_p50_speedup", "forward_pass_ratio", "concurrent_throughput_ratio", "routing_delta"):
        assert key in out
    assert out["jump_forward_identical"] == 1.0
    # the tag syntax and the only image id are forced (~5x over 16 held-out requests, benchmarks/README.md;
    # these 3 have long free arguments): without jump-forward the ratio is 1
    assert out["forward_pass_ratio"] >= 2
    assert out["routing_delta"] <= 0.01
