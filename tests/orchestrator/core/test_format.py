"""The one rendering of conversations into the core's text (training and inference share it)."""

from __future__ import annotations

import pytest

from orchestrator.core.format import IMAGE_TOKEN, answer_text, images_in, render, tool_line, tool_turn

IMG = "image-3f9a2b1c0d4e5f6a7b8c9d0e"


def test_user_turn_with_image_then_generation_prompt():
    text = render([{"role": "user", "content": "find the red circle", "images": [IMG]}])
    assert text == (f"<|im_start|>user\n{IMAGE_TOKEN} {IMG}\nfind the red circle<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_prompt_plus_answer_is_the_finished_conversation():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    finished = render(msgs, add_generation_prompt=False)
    assert render(msgs[:1]) + answer_text("Hello!") + "\n" == finished


def test_system_turn_only_when_given():
    msgs = [{"role": "user", "content": "hi"}]
    assert "system" not in render(msgs)
    assert render(msgs, system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_images_in_placeholder_order():
    other = "image-" + "1" * 24
    msgs = [{"role": "user", "content": "a", "images": [IMG]}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c", "images": [other, IMG]}]
    assert images_in(msgs) == [IMG, other, IMG]
    assert render(msgs).count(IMAGE_TOKEN) == 3


@pytest.mark.parametrize("bad", [
    {"role": "assistant", "content": "x", "images": [IMG]},
    {"role": "robot", "content": "x"},
    {"role": "user", "content": 3},
])
def test_bad_messages_are_refused(bad):
    with pytest.raises(ValueError):
        render([bad])


def test_tool_turn_one_line_per_call():
    text = tool_turn([
        {"call_id": "c1", "expert": "detect", "status": "done", "summary": "found 2 red circles",
         "artifacts": [{"id": "boxes-" + "a" * 24, "kind": "boxes", "role": "boxes"},
                       {"id": "overlay-" + "b" * 24, "kind": "overlay", "role": "overlay"}]},
        {"call_id": "c2", "expert": "segment", "status": "failed", "error": "timed out\nafter 60 s"},
        {"call_id": "c3", "expert": "crop", "status": "done", "summary": "1 crop",
         "artifacts": [{"id": "image-" + "c" * 24, "kind": "image", "role": "crop 1"}]},
    ])
    assert text.splitlines() == [
        f"c1 detect done: found 2 red circles -> boxes-{'a' * 24}, overlay-{'b' * 24}",
        "c2 segment failed: timed out after 60 s",
        f"c3 crop done: 1 crop -> image-{'c' * 24} (crop 1)",
    ]


def test_tool_line_defaults():
    assert tool_line({"call_id": "c1", "expert": "x", "summary": "ok"}) == "c1 x done: ok"
