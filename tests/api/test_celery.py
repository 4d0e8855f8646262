"""The API with Celery dispatch: a real redis-server and a real `switchboard worker` process."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import pytest
from PIL import Image

from experts.crop import CropExpert
from orchestrator.api.app import create_app
from orchestrator.api.protocol import MODEL_ID
from orchestrator.core.loop import Assistant
from orchestrator.session import ConversationStore
from switchboard.artifacts import ArtifactStore
from switchboard.registry import Registry
from tests.api.conftest import API_KEY, LiveServer, image_message, make_settings, script
from tests.orchestrator.core.test_loop import ScriptedCore


def depth(text: str, queue: str) -> float | None:
    m = re.search(rf'^switchboard_queue_depth{{queue="{queue}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_celery_dispatch_and_queue_depth(tmp_path: Path) -> None:
    from openai import OpenAI

    from workers.dispatch import QueuedDispatcher
    from workers.testing import RedisServer, WorkerProcess, worker_env

    with RedisServer(tmp_path / "redis") as redis_server:
        s = make_settings(tmp_path, broker_url=redis_server.url)
        registry = Registry()
        registry.register(CropExpert, "switchboard")
        store = ArtifactStore.from_settings(s)
        dispatcher = QueuedDispatcher(registry, store, settings=s)
        assistant = Assistant(ScriptedCore(script), registry, store, dispatcher, ConversationStore.from_settings(s))
        auth = {"Authorization": f"Bearer {API_KEY}"}
        try:
            with LiveServer(create_app(s, assistant=assistant)) as live:
                # queue depth is read from the broker at scrape time (kombu keeps a queue as a list)
                r = redis_server.client()
                r.lpush("crop", "waiting-1", "waiting-2")
                text = httpx.get(f"{live.url}/metrics", headers=auth).text
                assert depth(text, "crop") == 2.0 and "switchboard_broker_up 1.0" in text
                r.delete("crop")
                assert depth(httpx.get(f"{live.url}/metrics", headers=auth).text, "crop") == 0.0

                env = worker_env(redis_server.url, s.artifact_dir)
                with WorkerProcess(["crop"], env=env, log_path=tmp_path / "worker.log") as _worker:
                    client = OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
                    chunks = list(client.chat.completions.create(
                        model=MODEL_ID, stream=True, messages=[image_message("crop the top left")]))
                    events = [e for c in chunks if (e := (c.model_extra or {}).get("event"))]
                    calls = [e["stage"] for e in events if e["type"] == "call"]
                    assert calls[0] == "queued" and "started" in calls and calls[-1] == "done"
                    final = next(c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls)
                    art = final.model_extra["artifacts"][0]
                    got = httpx.get(art["url"], headers=auth)  # written by the worker, served by the API
                    assert Image.open(io.BytesIO(got.content)).size == (50, 30)

                # the broker goes away: the scrape still answers and says so
                redis_server.stop()
                text = httpx.get(f"{live.url}/metrics", headers=auth).text
                assert "switchboard_broker_up 0.0" in text
        finally:
            dispatcher.close()
