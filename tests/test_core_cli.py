"""`switchboard plan`, `switchboard chat` and `make demo` end to end with the shipped core (real models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "orchestrator" / "assets" / "demo.png"

pytestmark = pytest.mark.slow


def sb(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWITCHBOARD_ARTIFACT_DIR": str(tmp / "artifacts"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc


def test_plan_jsonl_loads_once_and_routes(tmp_path: Path) -> None:
    lines = tmp_path / "requests.jsonl"
    lines.write_text("\n".join(json.dumps(x) for x in [
        {"request": "find the red circle", "image": str(IMAGE)},
        {"request": "hello! what can you do?"},
    ]) + "\n")
    out = [json.loads(line) for line in sb("plan", "--jsonl", str(lines), tmp=tmp_path).stdout.splitlines()]
    assert len(out) == 2 and all(set(o) >= {"text", "calls", "errors"} for o in out)
    assert [c["expert"] for c in out[0]["calls"]] == ["detect"]
    assert out[0]["calls"][0]["args"]["query"] == "red circle" and not out[0]["errors"]
    assert out[1]["calls"] == [] and out[1]["text"]


def test_chat_runs_the_whole_loop(tmp_path: Path) -> None:
    res = json.loads(sb("chat", "--json", "--image", str(IMAGE), "--out", str(tmp_path / "out"),
                        "find the red circle", tmp=tmp_path).stdout)
    assert set(res) >= {"answer", "calls", "errors", "artifacts"}
    assert res["calls"][0]["expert"] == "detect" and res["calls"][0]["status"] == "done"
    assert "1" in res["answer"] and "circle" in res["answer"]
    kinds = {a["kind"] for a in res["artifacts"]}
    assert {"boxes", "overlay"} <= kinds and all(Path(a["path"]).exists() for a in res["artifacts"])
    boxes = json.loads(Path(next(a["path"] for a in res["artifacts"] if a["kind"] == "boxes")).read_text())
    # the bundled scene's red circle (shapes-world seed 1025) is near (195, 111) in pixels
    (x1, y1, x2, y2), = [b["xyxy"] for b in boxes["boxes"]]
    assert x1 < 195 < x2 and y1 < 111 < y2


def test_demo_is_a_real_conversation(tmp_path: Path) -> None:
    out = sb("demo", "--out", str(tmp_path / "demo"), tmp=tmp_path).stdout
    assert "[planning]" in out and "detect: done" in out and "segment: done" in out
    assert list((tmp_path / "demo").glob("turn2-*mask*.png"))
