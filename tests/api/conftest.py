"""A real uvicorn server on a free loopback port, serving an assistant with a scripted stand-in core.

The API is under test here, not the model: the scripted core writes chosen replies through the real
grammar processor (as in tests/orchestrator/core/test_loop.py), and everything else — the loop, the
crop expert, the dispatcher, the artifact and conversation stores — is the real thing.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from experts.crop import CropExpert
from orchestrator.api.app import create_app
from orchestrator.core.loop import Assistant
from orchestrator.dispatch import LocalDispatcher
from orchestrator.session import ConversationStore
from switchboard.artifacts import ArtifactStore
from switchboard.registry import Registry
from switchboard.settings import Settings
from tests.orchestrator.core.test_loop import ScriptedCore

API_KEY = "sk-test-switchboard"
IMAGE_ID = re.compile(r"\b(?:image|overlay|mask)-[0-9a-f]{24}\b")
GREETING = "Hello! Attach an image and ask me to crop it."


def script(messages: list[dict[str, Any]]) -> str:
    """The stand-in core: crops the latest image it knows of when asked to, answers after the tool turn."""
    last = messages[-1]
    if last["role"] == "tool":
        return "Here is the crop." if " done" in last["content"] else "Sorry, that did not work."
    text = last["content"].lower()
    if "explode" in text:
        raise RuntimeError("the core fell over")
    ids: list[str] = []
    for m in messages:  # images attached, and artifacts named in tool turns, oldest first
        ids += m.get("images") or []
        if m["role"] == "tool":
            ids += IMAGE_ID.findall(m["content"])
    if "crop" in text and ids:
        region = "[600,0,500,500]" if "wrong" in text else "[0,0,500,500]"
        return f'Cropping the top left.\n<call id="c1" expert="crop" image="{ids[-1]}" region="{region}"/>'
    return GREETING


def png_bytes(size: tuple[int, int] = (100, 60), colour: tuple[int, int, int] = (0, 128, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, data: bytes | None = None, url: str | None = None) -> dict[str, Any]:
    return {"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": url or data_uri(data or png_bytes())}},
    ]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` in a thread of this process (so a test can inject the assistant)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def make_settings(tmp_path: Path, **kw: Any) -> Settings:
    kw.setdefault("api_keys", [API_KEY])
    return Settings(artifact_dir=tmp_path / "artifacts", cache_dir=tmp_path / "cache", **kw)


def make_assistant(settings: Settings, core_script: Any = script) -> Assistant:
    registry = Registry()
    registry.register(CropExpert, "switchboard")
    store = ArtifactStore.from_settings(settings)
    return Assistant(ScriptedCore(core_script), registry, store, LocalDispatcher(registry, store),
                     ConversationStore.from_settings(settings))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def assistant(settings: Settings) -> Iterator[Assistant]:
    a = make_assistant(settings)
    yield a
    a.dispatcher.close()


@pytest.fixture
def server(settings: Settings, assistant: Assistant) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings, assistant=assistant)) as live:
        yield live


@pytest.fixture
def client(server: LiveServer):
    """The real openai client, pointed at the live server."""
    from openai import OpenAI

    c = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture
def http(server: LiveServer):
    """httpx against the live server, with the key."""
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c
