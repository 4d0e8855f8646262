"""The fusion pass starting from the plan pass's KV cache: same replies, fewer tokens prefilled.

Cheap tests run a tiny random LLaVA (greedy replies are arbitrary text, which is all the comparison
needs); the slow one runs the shipped core through the plan and fusion passes the loop makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from orchestrator.core import model as cm  # noqa: E402
from orchestrator.core.format import tool_turn  # noqa: E402
from tests.orchestrator.core.tiny import tiny_core  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
A = "image-3f9a2b1c0d4e5f6a7b8c9d0e"
B = "image-0123456789abcdef01234567"


@pytest.fixture(scope="module")
def core() -> cm.CoreModel:
    return tiny_core()


@pytest.fixture(scope="module")
def images() -> dict[str, Any]:
    from training.shapes import make_scene

    return {A: make_scene(7, size=64).image, B: make_scene(8, size=64).image}


def fusion_messages(messages: list[dict], reply: str) -> list[dict]:
    line = {"call_id": "c1", "expert": "detect", "status": "done", "summary": "found 1 red circle",
            "artifacts": [{"id": "boxes-0011223344556677", "kind": "boxes"}]}
    return [*messages, {"role": "assistant", "content": reply.strip()},
            {"role": "tool", "content": tool_turn([line])}]


CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "user", "content": "find the red circle", "images": [A]}],
    [{"role": "user", "content": "compare these", "images": [A, B]}],
    [{"role": "user", "content": "what is this?", "images": [B]}, {"role": "assistant", "content": "a scene"},
     {"role": "user", "content": "now outline the square"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["text", "image", "two-images", "history"])
def test_fusion_with_the_plan_cache_answers_the_same(core, images, messages) -> None:
    cache = core.new_prefix_cache()
    plan = core.generate(messages, images, max_new_tokens=12, prefix_cache=cache)
    assert cache.last["reused"] == 0 and cache.kv is not None
    fusion = fusion_messages(messages, plan)
    reused = core.generate(fusion, images, max_new_tokens=12, prefix_cache=cache)
    plain = core.generate(fusion, images, max_new_tokens=12)
    assert reused == plain
    plan_prompt = len(core.encode(messages, images)["input_ids"])
    assert plan_prompt <= cache.last["reused"] < cache.last["prompt"]  # at least the whole plan prompt
    assert cache.last["prefilled"] == cache.last["prompt"] - cache.last["reused"]


def test_another_image_in_the_same_place_is_fed_again(core, images) -> None:
    # Image tokens all share one id, so only the artifact behind a block tells two prompts apart.
    cache = core.new_prefix_cache()
    core.generate([{"role": "user", "content": "find the red circle", "images": [A]}], images, max_new_tokens=4,
                  prefix_cache=cache)
    other = [{"role": "user", "content": "find the red circle", "images": [B]}]
    reused = core.generate(other, images, max_new_tokens=8, prefix_cache=cache)
    assert reused == core.generate(other, images, max_new_tokens=8)
    assert cache.last["reused"] == core.encode(other, images)["input_ids"].index(core.image_token_id)


def test_a_prompt_equal_to_the_cache_still_prefills_its_last_token(core, images) -> None:
    messages = CONVERSATIONS[1]
    cache = core.new_prefix_cache()
    first = core.generate(messages, images, max_new_tokens=6, prefix_cache=cache)
    again = core.generate(messages, images, max_new_tokens=6, prefix_cache=cache)
    assert again == first
    assert cache.last["prefilled"] == 1


def test_streaming_with_a_prefix_cache(core, images) -> None:
    messages = CONVERSATIONS[1]
    cache = core.new_prefix_cache()
    plan = core.generate(messages, images, max_new_tokens=8, prefix_cache=cache)
    pieces: list[str] = []
    text = core.generate(fusion_messages(messages, plan), images, max_new_tokens=8, prefix_cache=cache,
                         on_text=pieces.append)
    assert "".join(pieces) == text and cache.last["reused"] > 0


def test_a_prefix_cache_follows_one_conversation(core) -> None:
    convs = [([{"role": "user", "content": "a"}], {}), ([{"role": "user", "content": "b"}], {})]
    with pytest.raises(ValueError, match="one conversation"):
        core.generate_batch(convs, max_new_tokens=2, prefix_cache=core.new_prefix_cache())


def test_the_loop_hands_one_cache_to_both_passes_unless_turned_off(store, tmp_path) -> None:
    from PIL import Image

    from experts.crop import CropExpert
    from orchestrator.core.loop import Assistant
    from orchestrator.dispatch import LocalDispatcher
    from orchestrator.session import ConversationStore
    from switchboard.registry import Registry
    from tests.orchestrator.core.test_loop import ScriptedCore

    reg = Registry()
    reg.register(CropExpert, "switchboard")
    img = store.put_image(Image.new("RGB", (100, 60), (0, 128, 255))).id

    def script(messages: list[dict]) -> str:
        if messages[-1]["role"] == "user":
            return f'<call id="c1" expert="crop" image="{img}" region="[0,0,500,500]"/>'
        return "Cropped."

    class CachingCore(ScriptedCore):
        def __init__(self) -> None:
            super().__init__(script)
            self.caches: list[Any] = []

        def new_prefix_cache(self) -> object:
            return object()

        def generate(self, *args: Any, prefix_cache: Any = None, **kw: Any) -> str:
            self.caches.append(prefix_cache)
            return super().generate(*args, **kw)

    for reuse in (True, False):
        core = CachingCore()
        assistant = Assistant(core, reg, store, LocalDispatcher(reg, store), ConversationStore(tmp_path / "c"),
                              reuse_prefix=reuse)
        assert assistant.run("crop it", images=[img]).answer == "Cropped."
        assert len(core.caches) == 2
        if reuse:
            assert core.caches[0] is not None and core.caches[0] is core.caches[1]
        else:
            assert core.caches == [None, None]


@pytest.mark.slow
def test_shipped_core_fuses_the_same_with_and_without_the_plan_cache(images) -> None:
    """The loop's two passes (grammar-constrained) on the shipped core, reuse on vs off."""
    shipped = REPO / "models" / "core"
    if not (shipped / "adapter").exists():
        pytest.skip("no shipped core")
    from orchestrator.core.grammar import CommandGrammar, GrammarLogitsProcessor
    from switchboard.registry import get_registry

    core = cm.CoreModel.load(shipped)
    registry = get_registry()
    arts = {A: "image", B: "image", "boxes-0011223344556677": "boxes"}

    def proc(allow_calls: bool) -> list:
        g = CommandGrammar.from_registry(registry, arts, allow_calls=allow_calls)
        return [GrammarLogitsProcessor(g, core.tokenizer)]

    requests = [("find the red circle", [A]), ("outline the blue square", [B]), ("hello! what can you do?", [])]
    for text, imgs in requests:
        messages = [{"role": "user", "content": text, "images": imgs}]
        cache = core.new_prefix_cache()
        plan = core.generate(messages, images, max_new_tokens=80, logits_processor=proc(True), prefix_cache=cache)
        fusion = fusion_messages(messages, plan)
        reused = core.generate(fusion, images, max_new_tokens=60, logits_processor=proc(False), prefix_cache=cache)
        plain = core.generate(fusion, images, max_new_tokens=60, logits_processor=proc(False))
        assert reused == plain, text
        assert cache.last["reused"] >= len(core.encode(messages, images)["input_ids"])
