"""Auth, limits, bad input, isolation, the page, health and metrics — over a real socket."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from orchestrator.api.app import create_app
from orchestrator.api.protocol import MODEL_ID
from tests.api.conftest import (
    API_KEY,
    LiveServer,
    data_uri,
    image_message,
    make_assistant,
    make_settings,
    png_bytes,
)

CHAT = "/v1/chat/completions"


def hi(**kw) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **kw}


def assert_error(r: httpx.Response, status: int, *words: str, code: str | None = None) -> dict:
    """An error in OpenAI's shape, with a message that says what is wrong."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    for w in words:
        assert w in err["message"], err["message"]
    if code:
        assert err["code"] == code
    return err


# -- auth ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", CHAT), ("GET", "/metrics"),
                                         ("GET", "/openapi.json"), ("GET", "/v1/nothing-here"),
                                         ("GET", "/v1/artifacts/image-" + "0" * 24)])
def test_nothing_is_served_without_a_key(server, method, path) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic " + API_KEY}):
        r = httpx.request(method, server.url + path, headers=headers, json=hi())
        err = assert_error(r, 401, code="invalid_api_key")
        assert "key" in err["message"].lower() and r.headers["www-authenticate"].startswith("Bearer")


def test_artifacts_need_the_key(server, http) -> None:
    art = http.post(CHAT, json={"messages": [image_message("crop the top left")]}).json()
    url = art["choices"][0]["message"]["artifacts"][0]["url"]
    assert_error(httpx.get(url), 401)
    assert http.get(url).status_code == 200


def test_open_paths(server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok", "assistant": "loaded", "detail": None}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    js = httpx.get(server.url + "/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text + js.text  # nothing from a CDN


def test_without_keys_configured_it_is_open(tmp_path: Path) -> None:
    s = make_settings(tmp_path, api_keys=[])
    with LiveServer(create_app(s, assistant=make_assistant(s))) as live:
        assert httpx.get(live.url + "/v1/models").status_code == 200


# -- limits and bad input -------------------------------------------------------------------------

def test_body_too_large(tmp_path: Path) -> None:
    s = make_settings(tmp_path, max_body_bytes=50_000)
    big = hi(messages=[{"role": "user", "content": "x" * 60_000}])
    with LiveServer(create_app(s, assistant=make_assistant(s))) as live, \
            httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        assert_error(http.post(CHAT, json=big), 413, "50000 bytes", code="request_too_large")

        def chunked():  # no Content-Length: counted while reading
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 5_000
            yield b'"}]}'

        r = http.post(CHAT, content=chunked(), headers={"Content-Type": "application/json"})
        assert_error(r, 413, "larger than the limit")
        assert http.post(CHAT, json=hi()).status_code == 200  # still serving


def test_image_limits(tmp_path: Path) -> None:
    s = make_settings(tmp_path, max_image_pixels=1_000_000, max_image_bytes=200_000)
    with LiveServer(create_app(s, assistant=make_assistant(s))) as live, \
            httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        # a decompression bomb: tiny file, 16 million pixels
        buf = io.BytesIO()
        Image.new("1", (4000, 4000)).save(buf, format="PNG")
        assert len(buf.getvalue()) < 10_000
        err = assert_error(http.post(CHAT, json={"messages": [image_message("x", buf.getvalue())]}), 413,
                           "4000x4000", "pixels", code="image_too_large")
        assert err["param"] == "messages.0.content.1.image_url.url"
        # too many bytes, refused before decoding
        noisy = Image.frombytes("RGB", (400, 400), bytes(range(256)) * 1875)
        buf = io.BytesIO()
        noisy.save(buf, format="BMP")
        assert_error(http.post(CHAT, json={"messages": [image_message("x", buf.getvalue())]}), 413, "bytes")


@pytest.mark.parametrize("url,status,words", [
    (data_uri(b"not an image at all"), 400, ["not a supported image"]),
    (data_uri(png_bytes()[:60]), 400, ["corrupt"]),
    (data_uri(png_bytes(), "text/plain"), 400, ["unsupported content type", "text/plain"]),
    ("data:,hello", 400, ["unsupported content type"]),
    ("data:image/png,rawbytes", 400, ["base64"]),
    ("data:image/png;base64,@@@@", 400, ["not valid base64"]),
    ("data:image/png;base64", 400, ["malformed data URI"]),
    ("http://example.com/cat.png", 400, ["remote image URLs are not fetched"]),
    ("ftp://example.com/cat.png", 400, ["unsupported image URL scheme"]),
    ("/v1/artifacts/../../etc/passwd", 400, ["not fetched"]),
    ("/v1/artifacts/image-" + "0" * 24, 404, ["not part of this conversation"]),
])
def test_bad_images(http, no_network, url, status, words) -> None:
    r = http.post(CHAT, json={"messages": [image_message("look", url=url)]})
    err = assert_error(r, status, *words)
    assert err["param"] == "messages.0.content.1.image_url.url"


@pytest.mark.parametrize("body,status,words,code", [
    (hi(model="gpt-4o"), 404, ["gpt-4o", "does not exist"], "model_not_found"),
    (hi(conversation_id="conv-" + "0" * 24), 404, ["no conversation"], "conversation_not_found"),
    (hi(conversation_id="../../etc/passwd"), 404, ["no conversation"], "conversation_not_found"),
    ({"messages": []}, 400, ["messages"], "invalid_request"),
    ({"model": MODEL_ID}, 400, ["messages", "Field required"], "invalid_request"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     ["messages.0"], "invalid_request"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, ["messages.0"], "invalid_request"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, 400,
     ["last message must be the user's"], "invalid_request"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}, {"role": "user", "content": "hi"}]},
     400, ["tool messages are not accepted"], "invalid_request"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, ["empty"], "invalid_request"),
    (hi(n=2), 400, ["n must be 1"], "invalid_request"),
    (hi(tools=[{"type": "function", "function": {"name": "f"}}]), 400, ["tools are not supported"], None),
])
def test_bad_requests(http, body, status, words, code) -> None:
    assert_error(http.post(CHAT, json=body), status, *words, code=code)


def test_bad_bodies(http) -> None:
    assert_error(http.post(CHAT, content=b'{"messages": [', headers={"Content-Type": "application/json"}),
                 400, "not valid JSON")
    assert_error(http.post(CHAT, content=b"hello", headers={"Content-Type": "text/plain"}), 415,
                 "must be JSON", code="unsupported_media_type")
    assert_error(http.post(CHAT, data={"messages": "hi"}), 415, "application/x-www-form-urlencoded")
    assert_error(http.get(CHAT), 405, code="method_not_allowed")
    assert_error(http.get("/v1/nothing"), 404, code="not_found")


def test_conversation_header_and_field_must_agree(http) -> None:
    conv = http.post(CHAT, json=hi()).json()["conversation_id"]
    other = http.post(CHAT, json=hi()).json()["conversation_id"]
    r = http.post(CHAT, json=hi(conversation_id=conv), headers={"X-Conversation-Id": other})
    assert_error(r, 400, "differ")
    assert http.post(CHAT, json=hi(conversation_id=conv), headers={"X-Conversation-Id": conv}).status_code == 200


# -- artifacts and isolation ------------------------------------------------------------------------

def test_get_artifact(http) -> None:
    r = http.post(CHAT, json={"messages": [image_message("crop the top left")]}).json()
    art = r["choices"][0]["message"]["artifacts"][0]
    got = http.get(f"/v1/artifacts/{art['id']}")
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert Image.open(io.BytesIO(got.content)).size == (50, 30)
    assert_error(http.get("/v1/artifacts/image-" + "f" * 24), 404, code="artifact_not_found")
    assert_error(http.get("/v1/artifacts/not-an-id"), 404, code="artifact_not_found")
    assert_error(http.get("/v1/artifacts/..%2F..%2Fsettings.py"), 404)


def test_conversations_are_isolated(http) -> None:
    a = http.post(CHAT, json={"messages": [image_message("crop the top left")]}).json()
    crop = a["choices"][0]["message"]["artifacts"][0]
    b = http.post(CHAT, json=hi()).json()
    # conversation b cannot use a's artifact, by URL or in a new conversation
    ref = image_message("crop this", url=crop["url"])
    err = assert_error(http.post(CHAT, json={"messages": [ref], "conversation_id": b["conversation_id"]}), 404,
                       crop["id"], "not part of this conversation", code="artifact_not_found")
    assert err["param"] == "messages.0.content.1.image_url.url"
    assert_error(http.post(CHAT, json={"messages": [ref]}), 404, "not part of this conversation")
    # …and its core is never offered a's ids: "crop" in b finds no image to crop
    r = http.post(CHAT, json={"messages": [{"role": "user", "content": "crop it"}],
                              "conversation_id": b["conversation_id"]}).json()
    assert r["choices"][0]["message"].get("tool_calls") is None
    # conversation a can attach its own artifact again, by absolute or relative URL
    for url in (crop["url"], f"/v1/artifacts/{crop['id']}"):
        r = http.post(CHAT, json={"messages": [image_message("crop this", url=url)],
                                  "conversation_id": a["conversation_id"]}).json()
        call = r["choices"][0]["message"]["tool_calls"][0]
        assert call["status"] == "done" and crop["id"] in call["function"]["arguments"]


def test_history_seeds_a_new_conversation(http) -> None:
    """A stateless client sends the whole history; its images belong to the new conversation."""
    messages = [{"role": "system", "content": "You are helpful."}, image_message("here is a picture"),
                {"role": "assistant", "content": "Nice picture."},
                {"role": "user", "content": "crop the top left"}]
    r = http.post(CHAT, json={"messages": messages}).json()
    call = r["choices"][0]["message"]["tool_calls"][0]
    assert call["status"] == "done" and call["function"]["name"] == "crop"


# -- operations -----------------------------------------------------------------------------------

def test_metrics(http) -> None:
    http.post(CHAT, json={"messages": [image_message("crop the top left")]})
    http.post(CHAT, json={"messages": [image_message("crop the wrong part")]})
    http.get("/v1/models")
    text = http.get("/metrics").text
    assert 'switchboard_expert_calls_total{expert="crop",status="done"} 1.0' in text
    assert 'switchboard_expert_calls_total{expert="crop",status="invalid"} 1.0' in text
    assert 'switchboard_expert_failures_total{expert="crop"} 1.0' in text
    assert 'switchboard_expert_call_seconds_count{expert="crop"} 1.0' in text
    assert 'switchboard_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 2.0' in text
    assert 'switchboard_http_requests_total{method="GET",route="/v1/models",status="200"} 1.0' in text
    assert "switchboard_chat_turns_in_progress 0.0" in text
    assert "switchboard_queue_depth" not in text  # in-process: no queue


def test_assistant_that_cannot_start(tmp_path: Path, monkeypatch) -> None:
    """Without an injected assistant the real one is built on first use; a failure is a clear 503."""
    import orchestrator.runtime as runtime

    def broken(*a, **k):
        raise FileNotFoundError("models/core/config.json")

    monkeypatch.setattr(runtime, "build_assistant", broken)
    s = make_settings(tmp_path)
    with LiveServer(create_app(s)) as live, \
            httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        assert http.get("/healthz").json()["assistant"] == "not loaded"
        for stream in (False, True):
            assert_error(http.post(CHAT, json=hi(stream=stream)), 503, "could not be started",
                         "models/core/config.json", code="assistant_unavailable")
        health = http.get("/healthz").json()
        assert health["assistant"] == "failed" and "models/core" in health["detail"]
        assert http.get("/v1/models").status_code == 200  # the rest still works


def test_core_failure_is_a_500_in_openai_shape(http) -> None:
    assert_error(http.post(CHAT, json={"messages": [{"role": "user", "content": "explode"}]}), 500,
                 "RuntimeError", code="internal_error")


def test_concurrent_turns_of_one_conversation_lose_nothing(http, assistant) -> None:
    from concurrent.futures import ThreadPoolExecutor

    conv = http.post(CHAT, json=hi()).json()["conversation_id"]

    def turn(i: int) -> int:
        return http.post(CHAT, json=hi(conversation_id=conv, stream=i % 2 == 0)).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(turn, range(4))) == [200] * 4
    messages = assistant.conversations.get(conv).messages
    assert [m["role"] for m in messages] == ["user", "assistant"] * 5
