"""Bounded turns over HTTP: a message longer than the core's prompt limit is a 400
``context_length_exceeded`` in OpenAI's shape, ``max_tokens`` gives ``finish_reason: "length"``, and a
streamed turn whose client disconnects stops decoding."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

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
from switchboard.settings import Settings
from tests.api.conftest import API_KEY, LiveServer, script
from tests.api.test_http import assert_error
from tests.orchestrator.core.test_bounded import DecodingCore


def chatty(messages: list[dict[str, Any]]) -> str:
    """The conftest script, with long plain answers (so max_tokens and disconnects have text to cut)."""
    if "essay" in messages[-1]["content"]:
        return "Circles are round. " * 40
    return script(messages)


@pytest.fixture
def core() -> DecodingCore:
    return DecodingCore(chatty, step_s=0.02)


@pytest.fixture
def bounded(settings: Settings, core: DecodingCore) -> Iterator[Assistant]:
    registry = Registry()
    registry.register(CropExpert, "switchboard")
    store = ArtifactStore.from_settings(settings)
    a = Assistant(core, registry, store, LocalDispatcher(registry, store), ConversationStore.from_settings(settings),
                  max_prompt_tokens=500, max_new_tokens=1000)
    yield a
    a.dispatcher.close()


@pytest.fixture
def api(settings: Settings, bounded: Assistant) -> Iterator[httpx.Client]:
    with LiveServer(create_app(settings, assistant=bounded)) as live, httpx.Client(
            base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def ask(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": text}], **kw}


def test_a_message_over_the_prompt_limit_is_a_400(api: httpx.Client, core: DecodingCore) -> None:
    for stream in (False, True):
        r = api.post("/v1/chat/completions", json=ask("x" * 9000, stream=stream))
        assert_error(r, 400, "maximum context length", "500 tokens", code="context_length_exceeded")
    assert core.prompts == []


def test_max_tokens_gives_finish_reason_length(api: httpx.Client) -> None:
    r = api.post("/v1/chat/completions", json=ask("write an essay", max_tokens=12))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["message"]["content"]) <= 12
    r = api.post("/v1/chat/completions", json=ask("hello there"))
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    with api.stream("POST", "/v1/chat/completions", json=ask("write an essay", max_tokens=12, stream=True)) as s:
        body = "".join(s.iter_text())
    assert '"finish_reason":"length"' in body


def test_long_history_is_trimmed_and_said(api: httpx.Client) -> None:
    history = [{"role": "user", "content": "old question " + "y" * 150}, {"role": "assistant", "content": "z" * 150},
               {"role": "user", "content": "another " + "w" * 150}, {"role": "assistant", "content": "v" * 150}]
    r = api.post("/v1/chat/completions", json={"model": MODEL_ID,
                                                "messages": [*history, {"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    assert r.json()["trimmed_messages"] >= 2


def test_a_disconnected_stream_stops_the_turn(api: httpx.Client, core: DecodingCore) -> None:
    with api.stream("POST", "/v1/chat/completions", json=ask("write an essay", stream=True)) as s:
        for line in s.iter_lines():
            if '"type":"plan"' in line:  # the core is writing: go away
                break
    deadline = time.monotonic() + 10
    while not core.stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert core.stopped, "the turn went on decoding after the client left"
