"""The served app with nothing injected: the shipped core, the registered experts, in-process dispatch."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.api.app import create_app
from orchestrator.api.protocol import MODEL_ID
from switchboard.settings import REPO_ROOT, Settings
from tests.api.conftest import API_KEY, LiveServer, image_message

# The shipped core, or the one SWITCHBOARD_CORE_MODEL names (e.g. a `switchboard train core --tiny` run).
CORE_DIR = Settings().core_model or REPO_ROOT / "models" / "core"
DEMO_IMAGE = REPO_ROOT / "orchestrator" / "assets" / "demo.png"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not CORE_DIR.is_dir(), reason=f"{CORE_DIR} is absent: the shipped core is not trained yet")
def test_shipped_core_end_to_end(tmp_path: Path) -> None:
    import httpx
    from openai import OpenAI

    # Only the stores go to tmp_path; models_dir and cache_dir stay the repo's (converted base weights).
    settings = Settings(artifact_dir=tmp_path / "artifacts", api_keys=[API_KEY])
    with LiveServer(create_app(settings, preload=True)) as live:
        client = OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=600)
        chunks = list(client.chat.completions.create(
            model=MODEL_ID, stream=True,
            messages=[image_message("crop the left half of the picture", DEMO_IMAGE.read_bytes())]))
        events = [e for c in chunks if (e := (c.model_extra or {}).get("event"))]
        stages = [e["stage"] for e in events if e["type"] == "stage"]
        assert stages[0] == "planning" and stages[-1] == "done"
        assert chunks[-1].choices[0].finish_reason == "stop"
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content.strip(), "the core answered nothing"

        final = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        calls = final[0].tool_calls if final else []
        artifacts = (final[0].model_extra or {}).get("artifacts", []) if final else []
        for call in calls:
            assert (call.model_extra or {})["status"] in ("done", "failed", "skipped", "invalid")
        with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            for art in artifacts:
                r = http.get(art["url"])
                assert r.status_code == 200 and r.headers["content-type"] == art["media_type"]
                if art["kind"] in ("image", "overlay", "mask"):
                    assert Image.open(io.BytesIO(r.content)).size == (art["width"], art["height"])
            health = http.get(f"{live.url}/healthz").json()
        assert health["assistant"] == "loaded"
