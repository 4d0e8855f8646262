"""Image questions a core that cannot see are answered from the detector's results (orchestrator.core.evidence).

The rule set decides which messages are image questions (and never takes a command for one); the
answer is written from the evidence call's result alone; and, through the loop with the real shapes-
world detector, the turn shows the detect call and its answer agrees with what the call returned.
"""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from experts.detect import DetectExpert
from experts.segment import SegmentExpert
from orchestrator.core.evidence import (
    ImageQuestion,
    evidence_answer,
    evidence_question,
    guessed_arguments,
    image_question,
    names_an_object,
    same_objects,
)
from orchestrator.core.fusion import unsupported
from orchestrator.core.grammar import CommandGrammar
from orchestrator.core.loop import Assistant, CallEvent, StageEvent
from orchestrator.core.router import Route
from orchestrator.dispatch import LocalDispatcher
from orchestrator.events import CallRecord
from orchestrator.session import ConversationStore
from switchboard.expert import Example, Expert, ExpertResult, ImageRef
from switchboard.registry import Registry
from switchboard.settings import REPO_ROOT
from tests.experts.photos import bundled_photos
from tests.orchestrator.core.test_loop import ScriptedCore
from training.conversations import answer_count, check_answer, named_pairs
from training.shapes import make_scene


@pytest.mark.parametrize(("message", "kind", "query"), [
    ("What is in this picture?", "describe", "everything"),
    ("what do you see in this image?", "describe", "everything"),
    ("describe this picture for me", "describe", "everything"),
    ("what's in the image?", "describe", "everything"),
    ("how many circles are there?", "count", "circles"),
    ("how many red shapes can you see?", "count", "red shape"),
    ("count the green shapes", "count", "green shape"),
    ("is there a blue square?", "exists", "blue square"),
    ("are there any red circles in the image?", "exists", "red circles"),
    ("do you see a hexagon?", "exists", "hexagon"),
    ("what colour is the star?", "colour", "star"),
    # how long the answer should be is not what is asked ("words" alone would read as a reading request)
    ("Describe this picture in a few words", "describe", "everything"),
    ("what is in this image? answer in one sentence", "describe", "everything"),
    ("briefly, how many stars are there?", "count", "stars"),
])
def test_image_questions_and_the_query_that_answers_them(message: str, kind: str, query: str) -> None:
    q = image_question(message)
    assert q is not None and (q.kind, q.query) == (kind, query)


@pytest.mark.parametrize("message", [
    "find the red circle", "where is the red circle?", "now segment it", "now remove it", "make the red circle blue",
    "what does the sign say", "read the text in this picture", "what text is in the image?", "hello",
    "draw a red circle", "segment the star", "crop the top left", "what is the weather like?",
    "read the words in the image", "what words are written on it? answer in a few words",
])
def test_commands_and_other_questions_are_not_image_questions(message: str) -> None:
    assert image_question(message) is None


def _plugin(name: str, requests: list[str]) -> type[Expert]:
    from pydantic import BaseModel

    class Args(BaseModel):
        image: ImageRef

    return type(name.title() + "Expert", (Expert,), {
        "name": name, "description": f"the {name} plugin", "Args": Args, "Result": ExpertResult,
        "examples": [Example(request=r, args={"image": "{image}"}) for r in requests],
        "run": lambda self, args, ctx: ExpertResult(summary="ran")})


@pytest.fixture
def detect_registry() -> Registry:
    r = Registry()
    r.register(DetectExpert, "switchboard")
    r.register(_plugin("ocr", ["read the text in this picture", "what does the sign say",
                               "what text is in the image?"]), "switchboard-ocr")
    r.register(_plugin("caption", ["caption this image", "what does this photo show?"]), "caption")
    return r


def test_a_route_decides_whether_the_evidence_path_is_taken(detect_registry: Registry) -> None:
    trained = {"detect", "segment", "edit", "crop", "generate"}
    ask = "what is in this picture?"
    assert evidence_question(ask, (), detect_registry, trained) is not None       # no expert
    assert evidence_question(ask, None, detect_registry, trained) is not None     # a follow-up
    assert evidence_question(ask, ("detect",), detect_registry, trained) is not None
    # OCR guessed zero-shot for a question about objects gives way; a captioning plugin that claims
    # such questions keeps them; a trained route to something else (segment) is kept
    assert evidence_question(ask, ("ocr",), detect_registry, trained) is not None
    assert evidence_question(ask, ("caption",), detect_registry, trained) is None
    assert evidence_question(ask, ("segment",), detect_registry, trained) is None
    # without a detector there is no evidence to answer from
    assert evidence_question(ask, (), Registry(), trained) is None


def _detect(labels: list[str], boxes: list[list[float]] | None = None, **extra: Any) -> CallRecord:
    boxes = boxes if boxes is not None else [[10.0 + 40 * i, 10.0, 40.0 + 40 * i, 40.0] for i in range(len(labels))]
    summary = extra.pop("summary", "; ".join(f"1 {lab}" for lab in labels) or "no objects found")
    return CallRecord(call_id="c1", expert="detect", status="done", args={"query": "everything"},
                      result={"summary": summary, "boxes": boxes, "labels": labels,
                              "scores": [0.9] * len(labels), **extra})


def test_answers_say_what_the_call_found_and_nothing_else() -> None:
    calls = [_detect(["red circle", "red circle", "blue square"], [[0, 0, 30, 30], [200, 200, 240, 240],
                                                                    [100, 100, 140, 140]])]
    describe = evidence_answer(ImageQuestion("describe"), calls, (256, 256))
    assert "2 red circles" in describe and "1 blue square (in the centre)" in describe
    assert named_pairs(describe) == {"red circle", "blue square"}
    # one object read as two shapes (same colour, same place) is said once, with the other reading
    twice = [_detect(["orange circle", "red square", "orange hexagon"], [[0, 0, 50, 50], [200, 200, 250, 250],
                                                                         [2, 2, 50, 52]])]
    merged = evidence_answer(ImageQuestion("describe"), twice, (256, 256))
    assert "1 orange circle (at the top left; the detector also read it as a hexagon)" in merged
    assert "(2 objects in all, 3 boxes on the overlay)" in merged
    assert named_pairs(merged) == {"orange circle", "red square"}
    # ... unless that reading is an object of its own elsewhere: then both stay (the call's count)
    elsewhere = {"labels": ["blue circle", "blue square", "blue square"],
                 "boxes": [[0, 0, 50, 50], [2, 2, 50, 52], [150, 150, 200, 200]]}
    assert same_objects(elsewhere) == {0: [], 1: [], 2: []}
    assert ImageQuestion("describe").call("image-" + "a" * 24).endswith('confidence="0.3"/>')
    assert ImageQuestion("count", "circles").call("image-" + "a" * 24).endswith('confidence="0.3"/>')
    count = evidence_answer(ImageQuestion("count", "circle", "circles"), [_detect(["red circle", "blue circle"])])
    assert answer_count(count, "circle") == 2 and "1 red circle and 1 blue circle" in count
    mixed = [_detect(["red circle", "red square"])]
    assert evidence_answer(image_question("how many red shapes are there?"), mixed).startswith(
        "There are 2 red shapes in the picture: the detector found 1 red circle and 1 red square")
    assert evidence_answer(ImageQuestion("exists", "blue square", "blue square"),
                           [_detect(["blue square"])]).startswith("Yes")
    assert evidence_answer(ImageQuestion("colour", "star", "star"), [_detect(["green star"])]).startswith("It is green")
    assert evidence_answer(ImageQuestion("colour", "circles", "circles"), [_detect(["red circle", "blue circle"])]
                           ).startswith("There are 2 circles, blue and red")
    for answer in (describe, count):
        assert not unsupported(answer, calls if answer is describe else [_detect(["red circle", "blue circle"])])


def test_nothing_found_a_photo_and_a_failed_call_are_said_plainly() -> None:
    none = _detect([], summary="no circles found; the image has 1 purple hexagon")
    answer = evidence_answer(ImageQuestion("count", "circles", "circles"), [none])
    assert answer.startswith("There are no circles") and "1 purple hexagon" in answer
    assert answer_count(answer, "circle") == 0
    assert evidence_answer(ImageQuestion("exists", "cat", "cat"), [_detect([], summary="nothing matches 'cat': "
                                                                           "this detector finds circle")]
                           ).startswith("I can't answer that")
    photo = _detect([], summary="this looks like a photograph, not a shapes-world scene", out_of_domain=True)
    said = evidence_answer(ImageQuestion("describe"), [photo])
    assert "this looks like a photograph, not a shapes-world scene" in said  # in the detector's own words
    failed = CallRecord(call_id="c1", expert="detect", status="failed", error="detect: timed out after 60 s")
    said = evidence_answer(ImageQuestion("describe"), [failed])
    assert "timed out" in said and not unsupported(said, [failed])


# -- through the loop, with the real detector ------------------------------------------------------
class NoCore:
    """A core that must not be asked: the evidence path answers without it."""

    tokenizer = None

    def generate(self, *a: Any, **k: Any) -> str:
        raise AssertionError("the core was asked to answer an image question it cannot see")


class OneRoute:
    trained_experts = {"detect", "segment", "edit", "crop", "generate"}

    def __init__(self, experts: tuple[str, ...]) -> None:
        self.experts = experts

    def route(self, text: str, has_image: bool, registry: Any = None) -> Route:
        return Route(experts=self.experts, score=0.9)


needs_detector = pytest.mark.skipif(not (REPO_ROOT / "models" / "detector" / "best.pt").is_file(),
                                    reason="the shipped detector is absent")


def _assistant(reg: Registry, store: Any, tmp_path: Any, route: tuple[str, ...] = (), core: Any = None) -> Assistant:
    return Assistant(core or NoCore(), reg, store, LocalDispatcher(reg, store), ConversationStore(tmp_path / "c"),
                     router=OneRoute(route), cannot_see=lambda image: True)


@needs_detector
@pytest.mark.timeout(300)
def test_the_loop_answers_an_image_question_from_a_visible_detect_call(detect_registry, store, tmp_path) -> None:
    scene = make_scene(7, size=256)
    image = store.put_image(scene.image).id
    assistant = _assistant(detect_registry, store, tmp_path, route=("ocr",))
    events = list(assistant.stream("what is in this picture?", images=[image]))
    result = events[-1]
    assert [c.expert for c in result.calls] == ["detect"] and result.calls[0].args["query"] == "everything"
    assert result.plan.startswith('<call id="c1" expert="detect"')
    assert result.route == ["detect"]  # the call the turn made, not the router's "ocr"
    assert any(isinstance(e, CallEvent) and e.stage == "done" for e in events)
    assert [e.stage for e in events if isinstance(e, StageEvent)] == ["planning", "executing", "answering", "done"]
    found = result.calls[0].result
    objects = {found["labels"][i] for i in same_objects(found)}  # one object read as two shapes: said once
    assert objects and named_pairs(result.answer) == objects  # every object the call found, nothing else
    assert not check_answer(result.answer, result.calls, scene, _turn("describe", ""))

    shape = scene.objects[0].shape
    counted = assistant.run(f"how many {shape}s are there?", conversation_id=result.conversation_id)
    found = counted.calls[0].result["labels"]
    assert counted.calls[0].args["query"] == f"{shape}s"
    assert answer_count(counted.answer, shape) == len(found)
    assert not check_answer(counted.answer, counted.calls, scene, _turn("count", shape))


def _turn(kind: str, shape: str) -> Any:
    from training.conversations import Turn

    return Turn(kind, "", shape=shape)


@needs_detector
@pytest.mark.timeout(300)
def test_on_a_photo_the_answer_says_so_and_commands_still_go_to_the_core(detect_registry, store, tmp_path) -> None:
    photos = bundled_photos()
    if not photos:
        pytest.skip("no bundled photographs in this environment")
    image = store.put_image(Image.open(photos[0]).convert("RGB")).id
    result = _assistant(detect_registry, store, tmp_path).run("what is in this picture?", images=[image])
    assert result.calls[0].expert == "detect" and result.calls[0].result["out_of_domain"]
    assert "photograph" in result.answer and named_pairs(result.answer) == set()

    core = ScriptedCore(lambda messages: "I can crop it for you.")
    plain = _assistant(detect_registry, store, tmp_path, core=core).run("hello there", images=[image])
    assert plain.calls == [] and plain.answer == "I can crop it for you."


# -- a point prompt is withheld from a core that cannot see when the request names an object ---------
@pytest.mark.parametrize(("message", "names"), [
    ("could you separate the star at the bottom out of this image for me, pixel by pixel", True),
    ("can you give me the pixel region that belongs to the rightmost shape?", True),
    ("please produce a mask that covers only the square at the top", True),
    ("segment the red one", True), ("mask the largest shape", True), ("outline the balls", True),
    ("segment whatever is in the middle", False), ("mask the thing at the top left", False),
    ("mask the object at the bottom right", False), ("now segment it", False),
])
def test_a_request_that_names_an_object_gets_no_guessed_point(message: str, names: bool) -> None:
    assert names_an_object(message) is names
    reg = Registry()
    reg.register(SegmentExpert, "switchboard")
    reg.register(DetectExpert, "switchboard")
    withheld = guessed_arguments(message, reg)
    assert withheld == ({("segment", "points"), ("segment", "labels")} if names else set())
    # the turn's grammar then offers the text target (or boxes) but no point prompt
    img = "image-" + "a" * 24
    g = CommandGrammar.from_registry(reg, {img: "image"}, withheld=withheld)
    head = f'<call id="c1" expert="segment" image="{img}" '
    assert g.viable(head + 'target="') and g.viable(head + 'points="[[500,500]]"/>') is not names
    assert ("points=" in g.gbnf().split("e1-segment-1 ::=")[1].split("\n")[0]) is not names


def test_the_loop_withholds_points_only_where_the_core_cannot_see(store, tmp_path) -> None:
    reg = Registry()
    reg.register(SegmentExpert, "switchboard")
    image = store.put_image(make_scene(7, size=256).image).id
    for blind, want in ((True, {("segment", "points"), ("segment", "labels")}), (False, set())):
        assistant = Assistant(NoCore(), reg, store, LocalDispatcher(reg, store), ConversationStore(tmp_path / "c"),
                              cannot_see=lambda image, blind=blind: blind)
        conv = assistant.conversations.create()
        conv.add_artifact(image, "image")
        conv.messages.append({"role": "user", "content": "segment the star at the bottom", "images": [image]})
        assert assistant._withheld(conv) == want
        conv.messages.append({"role": "user", "content": "segment whatever is in the middle", "images": []})
        assert assistant._withheld(conv) == set()


def test_earlier_boxes_are_withheld_when_the_request_names_one_object() -> None:
    """After "what is in this picture?" the boxes artifact holds every object: "now remove the red star"
    must say which with its words (segment's target), while "remove them" may take those boxes."""
    from orchestrator.core.evidence import earlier_boxes_withheld
    from training.router import builtin_registry

    reg = builtin_registry()
    assert earlier_boxes_withheld("now remove the red star", reg) == frozenset({("segment", "boxes")})
    assert earlier_boxes_withheld("mask the largest square", reg) == frozenset({("segment", "boxes")})
    for many in ("now remove them", "remove it", "segment all of them", "mask the stars", "cut out the red ones"):
        assert earlier_boxes_withheld(many, reg) == frozenset(), many


def test_self_contained_follow_ups() -> None:
    from orchestrator.core.evidence import self_contained

    for yes in ("now remove the red star", "make the purple square green", "and the green one?",
                "mask the largest shape"):
        assert self_contained(yes), yes
    for no in ("now remove it", "crop them", "thanks!", "do the same for this one", "make its colour blue",
               "again please"):
        assert not self_contained(no), no
