"""Tenancy and request bounds over a real socket: each API key sees only its own artifacts and
conversations (404 otherwise, since ids are content hashes), a request carries a bounded number of
images, and only the history the core reads is imported."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from orchestrator.api.app import create_app
from orchestrator.api.protocol import MODEL_ID
from tests.api.conftest import LiveServer, data_uri, image_message, make_assistant, make_settings, png_bytes

CHAT = "/v1/chat/completions"
KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"


@pytest.fixture
def two_keys(tmp_path: Path):
    settings = make_settings(tmp_path, api_keys=[KEY_A, KEY_B], max_images_per_request=40)
    assistant = make_assistant(settings)
    with LiveServer(create_app(settings, assistant=assistant)) as live:
        clients = [httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {k}"}, timeout=60)
                   for k in (KEY_A, KEY_B)]
        yield (*clients, assistant)
        for c in clients:
            c.close()
    assistant.dispatcher.close()


def _crop(client: httpx.Client, data: bytes) -> dict:
    r = client.post(CHAT, json={"model": MODEL_ID, "messages": [image_message("crop the top left", data)]})
    assert r.status_code == 200, r.text
    return r.json()


def test_artifacts_belong_to_the_key_that_made_them(two_keys) -> None:
    a, b, assistant = two_keys
    picture = png_bytes((100, 60), (10, 200, 30))
    out = _crop(a, picture)
    made = out["choices"][0]["message"]["artifacts"]
    assert made and all(a.get(f"/v1/artifacts/{m['id']}").status_code == 200 for m in made)
    uploaded = next(iter(assistant.conversations.get(out["conversation_id"]).artifacts))
    assert uploaded.startswith("image-") and a.get(f"/v1/artifacts/{uploaded}").status_code == 200

    # the other key: the same ids are simply not there, whether uploaded or made by a call
    for artifact_id in [uploaded, *(m["id"] for m in made)]:
        r = b.get(f"/v1/artifacts/{artifact_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_not_found", r.text
    # and it cannot be told apart from an id nobody ever stored
    never = b.get("/v1/artifacts/image-" + "0" * 24).json()["error"]
    theirs = b.get(f"/v1/artifacts/{uploaded}").json()["error"]
    assert theirs == {**never, "message": never["message"].replace("image-" + "0" * 24, uploaded)}

    # uploading the same bytes makes the (same, content-addressed) id B's too; A keeps it
    out_b = _crop(b, picture)
    assert uploaded in assistant.conversations.get(out_b["conversation_id"]).artifacts
    assert b.get(f"/v1/artifacts/{uploaded}").status_code == 200
    assert a.get(f"/v1/artifacts/{uploaded}").status_code == 200


def test_a_conversation_belongs_to_its_key(two_keys) -> None:
    a, b, _ = two_keys
    conv = _crop(a, png_bytes())["conversation_id"]
    follow = {"model": MODEL_ID, "messages": [{"role": "user", "content": "now crop that again"}]}
    for kw in ({"json": {**follow, "conversation_id": conv}}, {"json": follow, "headers": {"X-Conversation-Id": conv}}):
        r = b.post(CHAT, **kw)
        assert r.status_code == 404 and r.json()["error"]["code"] == "conversation_not_found", r.text
        r = b.post(CHAT, **{**kw, "json": {**kw["json"], "stream": True}})
        assert r.status_code == 404, r.text
    r = a.post(CHAT, json={**follow, "conversation_id": conv})
    assert r.status_code == 200 and r.json()["conversation_id"] == conv
    # B's attempts changed nothing: A's conversation has its two turns only
    assert r.json()["choices"][0]["message"]["artifacts"]


def test_without_keys_there_is_one_tenant(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys=[])
    assistant = make_assistant(settings)
    with LiveServer(create_app(settings, assistant=assistant)) as live, httpx.Client(base_url=live.url) as c:
        out = c.post(CHAT, json={"model": MODEL_ID, "messages": [image_message("crop the top left")]}).json()
        url = out["choices"][0]["message"]["artifacts"][0]["url"]
        assert httpx.get(url, headers={"Authorization": "Bearer anything"}).status_code == 200
        r = c.post(CHAT, json={"model": MODEL_ID, "conversation_id": out["conversation_id"],
                               "messages": [{"role": "user", "content": "now crop that again"}]})
        assert r.status_code == 200, r.text
    assistant.dispatcher.close()


def test_images_per_request_are_bounded(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys=[], max_images_per_request=3)
    assistant = make_assistant(settings)
    with LiveServer(create_app(settings, assistant=assistant)) as live, httpx.Client(base_url=live.url) as c:
        history = [image_message(f"look {i}", png_bytes((8, 8), (i, i, i))) for i in range(3)]
        r = c.post(CHAT, json={"model": MODEL_ID, "messages": [*history, image_message("crop the top left")]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "4 images" in err["message"] and "at most 3" in err["message"] and err["param"] == "messages"
        assert not assistant.store.list()  # refused before anything was stored
        r = c.post(CHAT, json={"model": MODEL_ID, "messages": [*history[:2], image_message("crop the top left")]})
        assert r.status_code == 200, r.text
    assistant.dispatcher.close()


def test_only_the_history_the_core_reads_is_imported(two_keys) -> None:
    a, _, assistant = two_keys
    history = []
    for i in range(30):  # 30 user turns, each with a distinct 1x1 image, and the assistant's replies
        history.append({"role": "user", "content": [
            {"type": "text", "text": f"picture {i}"},
            {"type": "image_url", "image_url": {"url": data_uri(png_bytes((1, 1), (i, 0, 0)))}}]})
        history.append({"role": "assistant", "content": f"seen {i}"})
    r = a.post(CHAT, json={"model": MODEL_ID, "messages": [*history, {"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    window = assistant.history_messages  # the newest messages the core reads, the new one included
    stored = [m for m in assistant.store.list() if m.kind == "image"]
    assert 0 < len(stored) <= window // 2, len(stored)
    conv = assistant.conversations.get(r.json()["conversation_id"])
    assert conv.messages[0]["content"] == f"picture {30 - len(stored)}"  # the newest ones, oldest first
    assert sorted(conv.artifacts) == sorted(m.id for m in stored)
    assert r.json()["trimmed_messages"] == 60 - 2 * len(stored)  # said, as when the loop trims


def test_a_large_upload_is_downscaled_once_and_that_is_what_experts_read(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, api_keys=[], import_max_side=64)
    assistant = make_assistant(settings)
    with LiveServer(create_app(settings, assistant=assistant)) as live, httpx.Client(base_url=live.url) as c:
        r = c.post(CHAT, json={"model": MODEL_ID, "messages": [image_message("crop the top left", png_bytes((320, 160)))]})
        assert r.status_code == 200, r.text
        (crop,) = r.json()["choices"][0]["message"]["artifacts"]
        assert (crop["width"], crop["height"]) == (32, 16)  # the top-left quarter of the 64x32 copy
        (image_id,) = assistant.conversations.get(r.json()["conversation_id"]).messages[0]["images"]
        meta = assistant.store.get(image_id)
        assert (meta.width, meta.height) == (64, 32)
        assert assistant.store.get(meta.extra["original"]).width == 320
        assert c.get(f"/v1/artifacts/{image_id}").status_code == 200
    assistant.dispatcher.close()
