"""The `switchboard` command, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def sb(*args: str, tmp: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWITCHBOARD_ARTIFACT_DIR": str(tmp / "artifacts")}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def test_help_is_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    proc = sb("--help", tmp=tmp_path)
    assert time.perf_counter() - t0 < 3.0
    assert "experts" in proc.stdout and "worker" in proc.stdout
    # no heavy library was imported for --help
    code = "import sys; from orchestrator.cli import main; main(['--help'])"
    out = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True)
    assert out.returncode == 0


def test_heavy_imports_stay_lazy() -> None:
    code = ("import sys, orchestrator.cli, switchboard.registry as r, orchestrator.commands;"
            "r.get_registry().describe();"
            "print(sorted(m for m in ('torch','ultralytics','diffusers','transformers','celery') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_experts_json(tmp_path: Path) -> None:
    items = json.loads(sb("experts", "--json", tmp=tmp_path).stdout)
    crop = next(i for i in items if i["name"] == "crop")
    assert crop["package"] == "switchboard" and crop["args_schema"]["properties"]["image"]["x-artifact"] == "image"
    assert crop["description"]


def test_run_executes_commands(tmp_path: Path) -> None:
    img = tmp_path / "in.png"
    Image.new("RGB", (100, 80), (10, 200, 30)).save(img)
    text = '<call id="c1" expert="crop" image="{image}" region="[0,0,500,500]"/>'
    out = json.loads(sb("run", text, "--image", str(img), "--json", "--out", str(tmp_path / "o"), tmp=tmp_path).stdout)
    assert out["calls"][0]["status"] == "done"
    art = out["artifacts"][0]
    assert Image.open(art["path"]).size == (50, 40)


def test_run_reports_bad_commands(tmp_path: Path) -> None:
    img = tmp_path / "in.png"
    Image.new("RGB", (10, 10)).save(img)
    proc = sb("run", '<call id="c1" expert="teleport" image="{image}"/>', "--image", str(img), "--json",
              tmp=tmp_path, check=False)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["errors"][0]["code"] == "unknown_expert" and "crop" in out["errors"][0]["message"]


def test_run_refuses_corrupt_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    proc = sb("run", "hi", "--image", str(bad), tmp=tmp_path, check=False)
    assert proc.returncode == 2 and "cannot use" in proc.stderr


def test_demo(tmp_path: Path) -> None:
    proc = sb("demo", "--scripted", "--out", str(tmp_path / "demo"), tmp=tmp_path)
    assert "done" in proc.stdout
    assert list((tmp_path / "demo").glob("*.png"))


def test_missing_recipe_is_clear(tmp_path: Path) -> None:
    proc = sb("train", "nothing", tmp=tmp_path, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr
