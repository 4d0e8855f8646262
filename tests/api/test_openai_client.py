"""The API as an OpenAI client sees it: the real ``openai`` package against a real uvicorn server."""

from __future__ import annotations

import io
import json

import openai
import pytest
from PIL import Image

from orchestrator.api.protocol import MODEL_ID
from tests.api.conftest import API_KEY, GREETING, image_message


def extra(obj, name):
    """An extra (non-OpenAI) field of an openai SDK object; the SDK keeps them as plain JSON."""
    return (obj.model_extra or {}).get(name)


def fetch_image(http, url: str) -> Image.Image:
    r = http.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


def test_models(client) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_plain(client) -> None:
    resp = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == GREETING and msg.tool_calls is None
    assert resp.choices[0].finish_reason == "stop"
    assert extra(resp, "conversation_id").startswith("conv-")
    assert extra(msg, "artifacts") == []


def test_with_image(client, http) -> None:
    resp = client.chat.completions.create(model=MODEL_ID, messages=[image_message("crop the top left")])
    msg = resp.choices[0].message
    (call,) = msg.tool_calls
    assert call.type == "function" and call.function.name == "crop"
    assert json.loads(call.function.arguments)["region"] == [0, 0, 500, 500]
    assert extra(call, "status") == "done" and "1 crop(s) of 100x60 image" in extra(call, "summary")
    (art,) = extra(msg, "artifacts")
    assert art["kind"] == "image" and art["call_id"] == "c1" and (art["width"], art["height"]) == (50, 30)
    assert extra(call, "artifacts") == [art["id"]]
    # the answer, then a markdown image link to each artifact
    assert msg.content.startswith("Here is the crop.\n\n")
    assert f"]({art['url']})" in msg.content and "![crop 1 (c1)]" in msg.content
    assert fetch_image(http, art["url"]).size == (50, 30)


def test_streamed(client) -> None:
    stream = client.chat.completions.create(model=MODEL_ID, stream=True,
                                            messages=[image_message("crop the top left")])
    chunks = list(stream)  # the client stops at data: [DONE]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({extra(c, "conversation_id") for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"

    events = [extra(c, "event") for c in chunks if extra(c, "event")]
    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert stages == ["planning", "executing", "answering", "done"]
    call_stages = [e["stage"] for e in events if e["type"] == "call"]
    assert call_stages[:2] == ["queued", "started"] and "progress" in call_stages and call_stages[-1] == "done"
    plan = "".join(e["text"] for e in events if e["type"] == "plan")
    assert plan.startswith("Cropping the top left.\n<call id=\"c1\" expert=\"crop\"")
    # the order: planning, the calls, answering, the answer tokens, the result, done
    kinds = [("stage:" + e["stage"]) if e["type"] == "stage" else e["type"] for e in events]
    assert kinds.index("stage:executing") < kinds.index("call") < kinds.index("stage:answering")

    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.startswith("Here is the crop.\n\n![crop 1 (c1)](")
    answer_deltas = [c for c in chunks if c.choices and c.choices[0].delta.content and not
                     c.choices[0].delta.tool_calls]
    # checked against the calls first (orchestrator/core/fusion.py), then streamed word by word
    assert len(answer_deltas) >= len("Here is the crop.".split())
    final = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    (tc,) = final[0].choices[0].delta.tool_calls
    assert tc.index == 0 and tc.function.name == "crop" and extra(tc, "status") == "done"
    assert extra(final[0].choices[0].delta, "artifacts")[0]["kind"] == "image"
    assert chunks[-1].choices[0].finish_reason == "stop" and extra(chunks[-1], "event")["stage"] == "done"


def test_streamed_matches_plain(client) -> None:
    """A reply without calls streams the same content as the non-streamed one."""
    plain = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
    chunks = list(client.chat.completions.create(model=MODEL_ID, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content == GREETING
    assert [e["stage"] for c in chunks if (e := extra(c, "event")) and e["type"] == "stage"] == ["planning", "done"]


def test_two_turn_conversation(client, http) -> None:
    first = client.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[image_message("crop the top left")])
    conv_id = first.headers["x-conversation-id"]
    r1 = first.parse()
    assert extra(r1, "conversation_id") == conv_id
    crop1 = extra(r1.choices[0].message, "artifacts")[0]

    # "now crop that again": the crop made in turn 1 is what the core addresses in turn 2
    r2 = client.chat.completions.create(model=MODEL_ID, extra_body={"conversation_id": conv_id},
                                        messages=[{"role": "user", "content": "now crop that again"}])
    assert extra(r2, "conversation_id") == conv_id
    (call,) = r2.choices[0].message.tool_calls
    assert json.loads(call.function.arguments)["image"] == crop1["id"]
    crop2 = extra(r2.choices[0].message, "artifacts")[0]
    assert fetch_image(http, crop2["url"]).size == (25, 15)

    # the header works as well as the field, streamed too
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, stream=True, extra_headers={"X-Conversation-Id": conv_id},
        messages=[{"role": "user", "content": "crop it once more"}]))
    assert {extra(c, "conversation_id") for c in chunks} == {conv_id}
    art = next(extra(c.choices[0].delta, "artifacts") for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert fetch_image(http, art[0]["url"]).size == (round(25 / 2), round(15 / 2))


def test_failed_call_is_reported(client) -> None:
    resp = client.chat.completions.create(model=MODEL_ID, messages=[image_message("crop the wrong part")])
    msg = resp.choices[0].message
    (call,) = msg.tool_calls
    assert extra(call, "status") == "invalid" and "region" in extra(call, "error")
    assert msg.content == "Sorry, that did not work." and extra(msg, "artifacts") == []


def test_errors_reach_the_client(client, server) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"conversation_id": "conv-" + "0" * 24})
    assert e.value.body["code"] == "conversation_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[image_message("x", data=b"not an image")])
    assert "not a supported image" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    # a failure inside a streamed turn arrives as an error frame, which the client raises
    with pytest.raises(openai.APIError, match="the core fell over"):
        list(client.chat.completions.create(model=MODEL_ID, stream=True,
                                            messages=[{"role": "user", "content": "explode"}]))
    assert API_KEY  # the good key still works after all that
    assert client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
