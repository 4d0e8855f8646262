"""Bounded turns: the prompt limit (oldest turns left out, a too-long message refused), ``max_tokens``
(``finish_reason="length"``) and stopping a turn whose client went away (no calls started after)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from experts.crop import CropExpert
from orchestrator.core.format import render
from orchestrator.core.loop import Assistant, ContextLengthExceeded
from orchestrator.dispatch import LocalDispatcher
from orchestrator.session import ConversationStore
from switchboard.registry import Registry
from tests.orchestrator.core.test_loop import ScriptedCore


@dataclass
class Decoded:
    text: str
    finish_reason: str = "stop"
    passes: int = 0


class CharCodec:
    """One token per character (what ``max_tokens`` counts for the stand-in core)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


class DecodingCore(ScriptedCore):
    """A scripted core with the shipped core's ``decode`` interface: one token per character, the
    grammar's forced text appended whole (and checked against the script), a token count per prompt
    character, ``max_new_tokens`` and ``should_stop`` honoured."""

    def __init__(self, script: Callable[[list[dict]], str], *, step_s: float = 0.0) -> None:
        super().__init__(script)
        self.tokenizer = CharCodec()
        self.step_s = step_s
        self.stopped = False
        self.jumped = 0

    def count_tokens(self, messages: list[dict]) -> int:
        return len(render(messages))

    def decode(self, messages: list[dict], images: dict[str, Any], *, grammar: Any, max_new_tokens: int = 160,
               on_text: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
               **kw: Any) -> Decoded:
        self.prompts.append(render(messages))
        target = self.script(messages)
        state, text, passes = grammar.start(), "", 0
        while len(text) < len(target):
            jump = grammar.forced(state)
            if jump:
                assert target.startswith(text + jump), (text, jump, target)
                grammar.feed(state, jump)
                text += jump
                self.jumped += len(jump)
                continue
            if len(text) >= max_new_tokens:
                return Decoded(text, "length", passes)
            if should_stop is not None and should_stop():
                self.stopped = True
                return Decoded(text, "cancelled", passes)
            time.sleep(self.step_s)
            passes += 1
            assert grammar.feed(state, target[len(text)])
            if on_text is not None:
                on_text(target[len(text)])
            text += target[len(text)]
        return Decoded(text[:max_new_tokens], "length" if len(text) > max_new_tokens else "stop", passes)


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    r.register(CropExpert, "switchboard")
    return r


@pytest.fixture
def image_id(store) -> str:
    return store.put_image(Image.new("RGB", (100, 60), (0, 128, 255))).id


def crop_script(messages: list[dict]) -> str:
    last = messages[-1]
    if last["role"] == "tool":
        return "Here is the crop of the top left corner."
    if "crop" in last["content"] and last.get("images"):
        return f'<call id="c1" expert="crop" image="{last["images"][0]}" region="[0,0,500,500]"/>'
    return "A long plain answer about " + last["content"]


def make(reg, store, tmp_path, **kw: Any) -> tuple[DecodingCore, Assistant]:
    core = DecodingCore(crop_script, step_s=kw.pop("step_s", 0.0))
    return core, Assistant(core, reg, store, LocalDispatcher(reg, store), ConversationStore(tmp_path / "conv"), **kw)


def test_prompt_is_trimmed_oldest_turn_first(reg, store, tmp_path) -> None:
    core, a = make(reg, store, tmp_path, max_prompt_tokens=260)
    first = a.run("first message " + "x" * 60)
    assert first.trimmed_messages == 0
    a.run("second message " + "y" * 60, conversation_id=first.conversation_id)
    third = a.run("third message", conversation_id=first.conversation_id)
    assert third.trimmed_messages >= 2
    assert "first message" not in core.prompts[-1] and "third message" in core.prompts[-1]
    assert len(core.prompts[-1]) <= 260


def test_a_message_over_the_limit_is_refused(reg, store, tmp_path) -> None:
    core, a = make(reg, store, tmp_path, max_prompt_tokens=100)
    with pytest.raises(ContextLengthExceeded) as e:
        a.run("z" * 9000)
    assert e.value.code == "context_length_exceeded" and e.value.status == 400
    assert "100 tokens" in e.value.message
    assert core.prompts == []  # refused before the core ran
    # without a limit the same message goes through
    _, unbounded = make(reg, store, tmp_path, max_prompt_tokens=None)
    assert unbounded.run("z" * 9000).answer.startswith("A long plain answer")


def test_max_tokens_caps_the_answer(reg, store, tmp_path) -> None:
    _, a = make(reg, store, tmp_path)
    capped = a.run("tell me everything about circles", max_tokens=10)
    assert capped.finish_reason == "length" and len(capped.answer) <= 10
    assert a.run("hi").finish_reason == "stop"


def test_max_tokens_caps_the_answer_after_calls(reg, store, tmp_path, image_id) -> None:
    _, a = make(reg, store, tmp_path)
    r = a.run("crop it", images=[image_id], max_tokens=4)
    assert r.calls and r.calls[0].status == "done"  # the calls are not cut, only the answer
    assert r.finish_reason == "length" and len(r.answer) <= 4


def test_a_stopped_turn_stops_decoding_and_runs_no_calls(reg, store, tmp_path, image_id) -> None:
    core, a = make(reg, store, tmp_path, step_s=0.001)
    t0 = time.monotonic()
    r = a.run("crop it", images=[image_id], should_stop=lambda: time.monotonic() - t0 > 0.02)
    assert core.stopped and r.finish_reason == "cancelled"
    assert r.calls == [] and r.artifacts == []
    # a stop that comes after the plan still starts no calls
    core2, b = make(reg, store, tmp_path)
    r2 = b.run("crop it", images=[image_id], should_stop=lambda: core2.prompts != [] and core2.jumped > 0)
    assert r2.calls == [] and r2.finish_reason == "cancelled"


def test_jump_forward_writes_the_fixed_parts(reg, store, tmp_path, image_id) -> None:
    core, a = make(reg, store, tmp_path)
    r = a.run("crop it", images=[image_id])
    assert r.calls and r.calls[0].status == "done"
    assert core.jumped >= len('call id="c1" expert="') + len(image_id)  # the tag's syntax and the only image
