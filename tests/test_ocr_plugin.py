"""The switchboard-ocr example plugin, installed into this environment the way a third party's would be.

Installing leaves the plugin in the venv (the install is idempotent); the rest of the suite does not care,
because its tests use the ``registry`` fixture, which ignores plugins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from switchboard.expert import RunContext
from switchboard.registry import get_registry, reset_registry

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "examples" / "plugins" / "switchboard-ocr"
FONT = REPO / "experts" / "assets" / "DejaVuSans.ttf"

pytestmark = pytest.mark.slow


def _installed_from_this_checkout() -> bool:
    try:
        dist = distribution("switchboard-ocr")
    except PackageNotFoundError:
        return False
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    return (direct_url.get("dir_info", {}).get("editable", False)
            and direct_url.get("url", "").rstrip("/") == PLUGIN.as_uri()
            and any(ep.group == "switchboard.experts" and ep.name == "ocr" for ep in dist.entry_points))


@pytest.fixture(scope="module")
def installed_plugin() -> Iterator[Path]:
    """Install the plugin (editable, no dependencies, no network) unless this checkout's copy already is."""
    if not _installed_from_this_checkout():
        env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e",
             str(PLUGIN)],
            capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
        assert _installed_from_this_checkout()
    # New processes import the plugin through the editable install's .pth file; this one read its .pth
    # files at start-up, so make the package importable here by hand.
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(PLUGIN))
        yield PLUGIN
    reset_registry()


def _render(lines: list[str], size: tuple[int, int] = (480, 200)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(str(FONT), 48)
    for i, line in enumerate(lines):
        draw.text((20, 20 + i * 86), line, fill="black", font=font)
    return img


def _switchboard() -> list[str]:
    script = Path(sys.executable).parent / "switchboard"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]


def test_cli_lists_the_plugin(installed_plugin: Path) -> None:
    proc = subprocess.run([*_switchboard(), "experts", "--json"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    experts = {item["name"]: item for item in json.loads(proc.stdout)}
    assert "crop" in experts, "built-ins are listed next to plugins"
    ocr = experts["ocr"]
    assert ocr["package"] == "switchboard-ocr"
    assert ocr["queue"] == "ocr"
    assert ocr["description"]
    schema = ocr["args_schema"]
    assert schema["required"] == ["image"]
    assert set(schema["properties"]) == {"image", "region", "min_confidence"}
    assert schema["properties"]["image"]["x-artifact"] == "image"
    assert {"request": "what does the sign say", "args": {"image": "{image}"}} in ocr["examples"]


def test_registry_runs_the_plugin(installed_plugin: Path, store, no_network) -> None:
    reset_registry()
    try:
        reg = get_registry()
        assert reg.package_of("ocr") == "switchboard-ocr"
        expert = reg.instance("ocr")
        assert not expert.is_setup, "the registry constructs experts without loading models"

        image = store.put_image(_render(["EXIT 12", "NO PARKING"]))
        result = expert({"image": image.id}, RunContext(store, call_id="c1"))
        assert expert.is_setup
        assert result.text.upper() == "EXIT 12\nNO PARKING"
        assert [line.text.upper() for line in result.lines] == ["EXIT 12", "NO PARKING"]
        assert result.summary.upper().startswith('READ 2 LINES: "EXIT 12 / NO PARKING"')
        assert sorted(a.kind for a in result.artifacts) == ["overlay", "text"]
        for art in result.artifacts:
            assert store.get(art.id).call_id == "c1"
    finally:
        reset_registry()
