"""A non-streamed request whose client goes away stops its turn (over live HTTP, the real server)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from experts.crop import CropExpert
from orchestrator.api.app import create_app
from orchestrator.api.protocol import MODEL_ID
from orchestrator.core.loop import Assistant
from orchestrator.dispatch import LocalDispatcher
from orchestrator.session import ConversationStore
from switchboard.artifacts import ArtifactStore
from switchboard.registry import Registry
from tests.api.conftest import API_KEY, LiveServer, make_settings
from tests.orchestrator.core.test_bounded import DecodingCore


def essay(messages: list[dict]) -> str:
    return "Circles are round. " * 60  # 1,140 characters at 20 ms each: ~23 s if nobody stops it


@pytest.mark.parametrize("leave", [True, False])
def test_a_client_that_leaves_a_plain_request_stops_the_turn(tmp_path: Path, leave: bool) -> None:
    settings = make_settings(tmp_path)
    registry = Registry()
    registry.register(CropExpert, "switchboard")
    store = ArtifactStore.from_settings(settings)
    core = DecodingCore(essay if leave else (lambda m: "Short answer."), step_s=0.02)
    a = Assistant(core, registry, store, LocalDispatcher(registry, store), ConversationStore.from_settings(settings),
                  max_new_tokens=2000)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "write an essay"}]}
    try:
        with LiveServer(create_app(settings, assistant=a)) as live, httpx.Client(
                base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1.5) as c:
            if leave:
                with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                    c.post("/v1/chat/completions", json=body)
                deadline = time.monotonic() + 10
                while not core.stopped and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert core.stopped, "the turn went on decoding after the client left"
            else:  # a client that stays gets its answer (the watch does not stop it)
                r = c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Short answer."
                assert not core.stopped
    finally:
        a.dispatcher.close()
