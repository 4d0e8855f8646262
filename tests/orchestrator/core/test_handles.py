"""Short handles: the core reads and writes img1, mask2 … and the loop maps them to artifact ids and back."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from experts.crop import CropExpert
from orchestrator.core.grammar import CommandGrammar
from orchestrator.core.handles import Handles
from orchestrator.core.loop import Assistant
from orchestrator.dispatch import LocalDispatcher
from orchestrator.session import ConversationStore
from switchboard.registry import Registry
from tests.orchestrator.core.test_bounded import DecodingCore

IMG = "image-" + "a" * 24
IMG2 = "image-" + "b" * 24
MASK = "mask-" + "c" * 24
OVERLAY = "overlay-" + "d" * 24


def conversation() -> list[dict[str, Any]]:
    return [{"role": "user", "content": "find the circle", "images": [IMG]},
            {"role": "assistant", "content": f'<call id="c1" expert="segment" image="{IMG}" query="circle"/>'},
            {"role": "tool", "content": f"c1 segment done: 1 circle -> {MASK}, {OVERLAY} (overlay)"},
            {"role": "user", "content": "and this one", "images": [IMG2]}]


def test_handles_by_kind_in_order_of_appearance() -> None:
    h = Handles.for_conversation(conversation(), {IMG: "image", MASK: "mask", OVERLAY: "overlay", IMG2: "image",
                                                  "boxes-" + "e" * 24: "boxes"})
    assert h.to_handle == {IMG: "img1", MASK: "mask1", OVERLAY: "overlay1", IMG2: "img2", "boxes-" + "e" * 24: "boxes1"}
    msgs = h.messages(conversation())
    assert msgs[0]["images"] == ["img1"] and msgs[3]["images"] == ["img2"]
    assert msgs[1]["content"] == '<call id="c1" expert="segment" image="img1" query="circle"/>'
    assert msgs[2]["content"] == "c1 segment done: 1 circle -> mask1, overlay1 (overlay)"
    assert conversation()[0]["images"] == [IMG]  # the conversation itself is left alone


def test_replies_map_back_to_ids_and_leave_other_words() -> None:
    h = Handles.for_conversation(conversation())
    reply = '<call id="c1" expert="crop" image="img2" boxes="$c1"/> img12 is not img2, mask1.'
    assert h.ids(reply) == f'<call id="c1" expert="crop" image="{IMG2}" boxes="$c1"/> img12 is not {IMG2}, {MASK}.'
    assert Handles().ids("img1") == "img1"


def test_streamed_pieces_map_back_even_when_a_handle_is_split() -> None:
    h = Handles.for_conversation(conversation())
    got: list[str] = []
    put, flush = h.stream(got.append)
    for piece in ['<call id="c1" image="i', "mg", '2"/> then ', "mask", "1"]:
        put(piece)
    flush()
    assert "".join(got) == f'<call id="c1" image="{IMG2}"/> then {MASK}'


def test_the_grammar_forces_the_only_image_handle() -> None:
    reg = Registry()
    reg.register(CropExpert, "switchboard")
    g = CommandGrammar.from_registry(reg, {"img1": "image"}, canonical=True, route=("crop",))
    state = g.start()
    assert g.forced(state) == '<call id="c1" expert="crop" '
    assert g.feed(state, '<call id="c1" expert="crop" image="')
    # and the space after it: crop needs a region or boxes (exactly one), and there are no boxes to give
    assert g.forced(state) == 'img1" '
    assert not g.viable('<call id="c1" expert="crop" image="' + IMG)


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    r.register(CropExpert, "switchboard")
    return r


def handle_script(messages: list[dict]) -> str:
    last = messages[-1]
    if last["role"] == "tool":
        return "Here is the crop."
    assert last["images"] == ["img1"], last  # the core sees a handle, not the id
    return '<call id="c1" expert="crop" image="img1" region="[0,0,500,500]"/>'


def test_the_loop_gives_the_core_handles_and_runs_ids(reg, store, tmp_path) -> None:
    image_id = store.put_image(Image.new("RGB", (100, 60), (0, 128, 255))).id
    core = DecodingCore(handle_script)
    a = Assistant(core, reg, store, LocalDispatcher(reg, store), ConversationStore(tmp_path / "conv"),
                  short_handles=True)
    plans: list[str] = []
    res = a.run("crop the top left", images=[image_id],
                on_event=lambda e: plans.append(e.text) if getattr(e, "type", None) == "plan" else None)
    assert res.calls[0].status == "done" and res.calls[0].args["image"] == image_id
    assert image_id in res.plan and "img1" not in res.plan
    assert "img" not in "".join(plans)  # nor does the streamed plan show handles
    assert image_id not in core.prompts[0] and "<image> img1" in core.prompts[0]
    # the answer pass reads the tool turn with handles: the crop is img2
    assert "-> img2" in core.prompts[-1] and image_id not in core.prompts[-1]
    conv = a.conversations.get(res.conversation_id)
    assert image_id in conv.messages[1]["content"]  # the conversation keeps ids


def test_cores_that_do_not_ask_for_handles_see_ids(reg, store, tmp_path) -> None:
    image_id = store.put_image(Image.new("RGB", (100, 60), (0, 128, 255))).id
    core = DecodingCore(lambda m: "fine")
    a = Assistant(core, reg, store, LocalDispatcher(reg, store), ConversationStore(tmp_path / "conv"))
    a.run("hello", images=[image_id])
    assert image_id in core.prompts[0]


def test_the_training_data_can_be_written_with_handles() -> None:
    from orchestrator.core.grammar import ARTIFACT_IN_TEXT
    from orchestrator.core.handles import ARTIFACT_ID
    from training.core_data import Generator

    ids = Generator(split="heldout", seed=3, n_scenes=16).generate(12)
    short = Generator(split="heldout", seed=3, n_scenes=16, handles=True).generate(12)
    assert [s.kind for s in ids] == [s.kind for s in short]  # the same samples
    for a, b in zip(ids, short, strict=True):
        text = " ".join(m["content"] for m in b.messages) + b.answer + str(b.calls) + str(b.images)
        assert not ARTIFACT_ID.search(text) and not ARTIFACT_IN_TEXT.search(text), text
        if a.images:
            assert set(b.images) == {"img1"} and b.images["img1"] == next(iter(a.images.values()))
        for ca, cb in zip(a.calls, b.calls, strict=True):
            if "image" in ca["args"] and not ca["args"]["image"].startswith("$"):
                assert cb["args"]["image"] == "img1"
