"""The core's benchmarks, quick, on the shipped core: benchmarks/core_latency.py (jump-forward plans are the
token-by-token plans, with fewer forward passes) and benchmarks/core_answers.py (whole turns give the same
answers with the answer drafts on and off, in fewer passes on). The figures themselves are the
benchmarks', in benchmarks/README.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _benchmark(name: str) -> Any:
    if not (ROOT / "models" / "core" / "core.json").exists():
        pytest.skip("no shipped core")
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_core_latency_quick() -> None:
    out = _benchmark("core_latency").main(["--quick", "--json"])
    for key in ("plan_p50_speedup", "forward_pass_ratio", "concurrent_throughput_ratio", "routing_delta"):
        assert key in out
    assert out["jump_forward_identical"] == 1.0
    # the tag syntax and the only image id are forced (~5x over 16 held-out requests, benchmarks/README.md;
    # these 3 have long free arguments): without jump-forward the ratio is 1
    assert out["forward_pass_ratio"] >= 2
    assert out["routing_delta"] <= 0.01


def test_core_answers_quick() -> None:
    if not (ROOT / "models" / "core" / "phrases.txt").exists():
        pytest.skip("the shipped core has no phrases.txt")
    out = _benchmark("core_answers").main(["--quick", "--json"])
    assert out["conversations"] == 3 and out["identical_answers"] == 3
    assert out["phrases"] > 0 and out["core_passes"]["on"] < out["core_passes"]["off"]
    from orchestrator.core import decode

    assert decode._draft.__name__ == "_draft"  # the benchmark put the real draft function back
