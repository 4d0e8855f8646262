"""The loop (plan → execute → fuse → answer) with a scripted stand-in for the core.

The core's quality is tested with the real model elsewhere; here a scripted core writes chosen
replies through the real grammar processor, so the loop, the dispatcher, the tool turn and the
conversation store are what is under test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from PIL import Image

from experts.crop import CropExpert
from orchestrator.core.format import render
from orchestrator.core.loop import Assistant, ChatResult, StageEvent, TextEvent
from orchestrator.dispatch import CallEvent, LocalDispatcher
from orchestrator.session import ConversationNotFound, ConversationStore
from switchboard.registry import Registry
from tests.orchestrator.core.test_grammar import CharTokenizer


class ScriptedCore:
    """Writes ``script(messages)`` one character per step through the logits processors."""

    def __init__(self, script: Callable[[list[dict]], str]) -> None:
        self.script = script
        self.tokenizer = CharTokenizer(["\n"])
        self.prompts: list[str] = []

    def generate(self, messages: list[dict], images: dict[str, Any], *, max_new_tokens: int = 160,
                 logits_processor: list | None = None, on_text=None, system=None) -> str:
        self.prompts.append(render(messages))
        for m in messages:
            for i in m.get("images") or []:
                assert isinstance(images[i], Image.Image)
        target = self.script(messages)
        ids: list[int] = []
        prompt = [1] * 5
        for step in range(len(target) + 1):
            scores = torch.zeros(1, len(self.tokenizer))
            want = 0 if step == len(target) else self.tokenizer.vocab.index(target[step])
            scores[0, want] = 10.0
            for proc in logits_processor or []:
                scores = proc(torch.tensor([prompt + ids]), scores)
            nxt = int(torch.argmax(scores[0]))
            if nxt == 0:
                break
            ids.append(nxt)
            if on_text:
                on_text(self.tokenizer.vocab[nxt])
        return self.tokenizer.decode(ids)


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    r.register(CropExpert, "switchboard")
    return r


def make(reg, store, tmp_path, script):
    core = ScriptedCore(script)
    d = LocalDispatcher(reg, store)
    return core, Assistant(core, reg, store, d, ConversationStore(tmp_path / "conv"))


def test_plan_execute_fuse_answer(reg, store, tmp_path) -> None:
    img = store.put_image(Image.new("RGB", (100, 60), (0, 128, 255))).id

    def script(messages: list[dict]) -> str:
        last = messages[-1]
        if last["role"] == "user":
            return f'Cropping.\n<call id="c1" expert="crop" image="{img}" region="[0,0,500,500]"/>'
        assert last["role"] == "tool" and "c1 crop done" in last["content"]
        return "Here is the top-left quarter: 50x30."

    core, assistant = make(reg, store, tmp_path, script)
    events = list(assistant.stream("crop the top left", images=[img]))
    result = events[-1]
    assert isinstance(result, ChatResult)
    assert result.answer == "Here is the top-left quarter: 50x30."
    assert result.calls[0].status == "done" and result.calls[0].tool_call["function"]["name"] == "crop"
    crop_id = result.artifacts[0]["id"]
    assert store.open_image(crop_id).size == (50, 30)
    stages = [e.stage for e in events if isinstance(e, StageEvent)]
    assert stages == ["planning", "executing", "answering", "done"]
    assert [e.stage for e in events if isinstance(e, CallEvent)][-1] == "done"
    assert "".join(e.text for e in events if isinstance(e, TextEvent) and e.phase == "answer") == result.answer
    # the fusion prompt carried the tool turn with the artifact id
    assert crop_id in core.prompts[-1]

    # next turn: the artifact made in turn 1 is addressable; one from elsewhere is not
    stranger = store.put_image(Image.new("RGB", (8, 8))).id

    def script2(messages: list[dict]) -> str:
        if messages[-1]["role"] == "user":
            return (f'<call id="c1" expert="crop" image="{crop_id}" region="[0,0,1000,500]"/>'
                    f'<call id="c2" expert="crop" image="{stranger}" region="[0,0,1000,500]"/>')
        return "Done."

    core.script = script2
    r2 = assistant.run("now the top half of that", conversation_id=result.conversation_id)
    # the grammar refused the stranger's id: whatever the core wrote instead is an id it holds
    assert r2.calls[0].status == "done" and r2.calls[0].args["image"] == crop_id
    assert all(c.args.get("image") != stranger for c in r2.calls)
    assert all(c.args["image"] in {img, crop_id} | {a["id"] for a in result.artifacts} for c in r2.calls[1:])
    assert store.open_image(r2.artifacts[0]["id"]).size == (50, 15)
    conv = assistant.conversations.get(result.conversation_id)
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool", "assistant"] * 2


def test_reply_without_calls_is_the_answer(reg, store, tmp_path) -> None:
    core, assistant = make(reg, store, tmp_path, lambda m: "Hello! I can crop images.")
    r = assistant.run("hi")
    assert r.answer == "Hello! I can crop images." and r.calls == [] and len(core.prompts) == 1


def test_failed_call_reaches_fusion_and_user(reg, store, tmp_path) -> None:
    img = store.put_image(Image.new("RGB", (10, 10))).id
    seen: list[str] = []

    def script(messages: list[dict]) -> str:
        if messages[-1]["role"] == "user":
            return f'<call id="c1" expert="crop" image="{img}" region="[600,0,500,500]"/>'
        seen.append(messages[-1]["content"])
        return "Sorry, that region is not valid."

    _, assistant = make(reg, store, tmp_path, script)
    r = assistant.run("crop something", images=[img])
    assert r.calls[0].status == "invalid" and "region" in r.calls[0].error
    assert r.errors and r.errors[0]["code"] == "bad_value"
    assert "c1 crop invalid" in seen[0]
    assert r.answer.startswith("Sorry")


def test_unknown_conversation(reg, store, tmp_path) -> None:
    _, assistant = make(reg, store, tmp_path, lambda m: "x")
    with pytest.raises(ConversationNotFound):
        assistant.run("hi", conversation_id="conv-" + "0" * 24)
    with pytest.raises(ConversationNotFound):
        list(assistant.stream("hi", conversation_id="../../etc/passwd"))


class FixedRouter:
    """A router that always answers one expert sequence, and records what it was asked."""

    def __init__(self, experts: tuple[str, ...]) -> None:
        self.experts = experts
        self.asked: list[tuple[str, bool]] = []

    def route(self, text: str, has_image: bool, registry: Any = None) -> Any:
        from orchestrator.core.router import Route

        self.asked.append((text, has_image))
        return Route(experts=self.experts, score=0.9)


def test_a_route_to_no_expert_keeps_calls_out_of_the_reply(reg, store, tmp_path) -> None:
    """The router said "answer directly": a core that wants to call crop cannot."""
    img = store.put_image(Image.new("RGB", (100, 60))).id
    core = ScriptedCore(lambda m: f'<call id="c1" expert="crop" image="{img}" region="[0,0,500,500]"/>')
    router = FixedRouter(())
    assistant = Assistant(core, reg, store, LocalDispatcher(reg, store), ConversationStore(tmp_path / "c"),
                          router=router)
    result = assistant.run("what a lovely photo", images=[img])
    assert result.route == [] and result.calls == [] and "<call" not in result.answer
    assert router.asked == [("what a lovely photo", True)]


def test_a_route_is_followed_then_follow_ups_are_the_cores(reg, store, tmp_path) -> None:
    img = store.put_image(Image.new("RGB", (100, 60))).id
    call = f'<call id="c1" expert="crop" image="{img}" region="[0,0,500,500]"/>'

    def script(messages: list[dict]) -> str:
        return call if messages[-1]["role"] == "user" else "Cropped."

    router = FixedRouter(("crop",))
    assistant = Assistant(ScriptedCore(script), reg, store, LocalDispatcher(reg, store),
                          ConversationStore(tmp_path / "c"), router=router)
    first = assistant.run("zoom into the corner", images=[img])
    assert first.route == ["crop"] and [c.expert for c in first.calls] == ["crop"]
    assert first.calls[0].status == "done"
    # a follow-up without a new image is planned by the core alone (the router reads single requests)
    second = assistant.run("and again", conversation_id=first.conversation_id)
    assert second.route is None and [c.expert for c in second.calls] == ["crop"]
    # ... unless it names its own object and points back at nothing: then it reads as a first request
    third = assistant.run("now crop the red star", conversation_id=first.conversation_id)
    assert third.route == ["crop"] and router.asked[-1] == ("now crop the red star", True)
    fourth = assistant.run("now crop it", conversation_id=first.conversation_id)
    assert fourth.route is None


def test_a_follow_up_the_router_is_sure_needs_no_expert_is_answered_plainly(reg, store, tmp_path) -> None:
    """"thanks!" after a call: the core, free to call, planned another crop; the router says no expert."""
    img = store.put_image(Image.new("RGB", (100, 60))).id
    call = f'<call id="c1" expert="crop" image="{img}" region="[0,0,500,500]"/>'

    def script(messages: list[dict]) -> str:  # a core that calls whenever it may
        return call if messages[-1]["role"] == "user" else "Cropped."

    router = FixedRouter(("crop",))
    assistant = Assistant(ScriptedCore(script), reg, store, LocalDispatcher(reg, store),
                          ConversationStore(tmp_path / "c"), router=router)
    first = assistant.run("zoom into the corner", images=[img])
    router.experts = ()
    thanks = assistant.run("thanks!", conversation_id=first.conversation_id)
    assert thanks.route == [] and thanks.calls == []


def test_a_route_the_conversation_cannot_serve_is_not_imposed(reg, store, tmp_path) -> None:
    """crop needs an image; with none in the conversation the route is dropped, not obeyed into a dead end."""
    router = FixedRouter(("crop",))
    assistant = Assistant(ScriptedCore(lambda m: "There is no image to crop."), reg, store,
                          LocalDispatcher(reg, store), ConversationStore(tmp_path / "c"), router=router)
    result = assistant.run("crop the top left")
    assert result.route is None and result.answer == "There is no image to crop."
