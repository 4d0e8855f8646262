"""The closed-loop conversation eval (training/conversations.py): its checkers on hand-made turns, and
the whole eval against a scripted stand-in assistant (the real core is never loaded here)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from orchestrator.core.loop import ChatResult
from orchestrator.events import CallRecord
from training import conversations as cv
from training.core_data import HELDOUT_SCENE_SEED, TRAIN_SCENE_SEED
from training.shapes import COLOURS, PLURALS, encode_mask, make_scene


def _scene_with(n_min: int = 2):
    """A held-out scene with at least ``n_min`` objects and a referring expression."""
    for i in range(200):
        s = cv.heldout_scene_seed(0, i)
        sc = cv.scene_for(s)
        if len(sc.objects) >= n_min and sc.referring:
            return sc
    raise AssertionError("no scene")


def _call(expert: str, result: dict[str, Any] | None, status: str = "done", **args: Any) -> CallRecord:
    return CallRecord(call_id="c1", expert=expert, status=status, args=args, result=result,
                      error=None if status == "done" else "boom")


def _chat(answer: str, calls: list[CallRecord] = ()) -> ChatResult:
    return ChatResult(conversation_id="conv-" + "0" * 24, answer=answer, plan="", calls=list(calls), errors=[],
                      artifacts=[])


def _detect(scene, idx: list[int]) -> CallRecord:
    objs = [scene.objects[i] for i in idx]
    return _call("detect", {"summary": f"found {len(objs)}", "boxes": [list(o.box) for o in objs],
                            "labels": [o.label for o in objs], "scores": [0.9] * len(objs)}, query="x")


def _segment(scene, masks: list[np.ndarray], labels: list[str]) -> CallRecord:
    objs = [{"label": lbl, "mask": "mask-" + "0" * 24, "rle": encode_mask(m), "area": int(m.sum()), "box": [0, 0, 1, 1],
             "score": 0.9} for m, lbl in zip(masks, labels, strict=True)]
    return _call("segment", {"summary": f"{len(objs)} mask: " + ", ".join(labels), "prompt": "target",
                             "width": scene.image.width, "height": scene.image.height, "objects": objs})


def _edit(action: str, image_id: str, prompt: str = "") -> CallRecord:
    return _call("edit", {"summary": f"{action}: repainted 100 masked pixels as {prompt!r}", "prompt": prompt,
                          "changed_pixels": 100, "seed": 1,
                          "artifacts": [{"id": image_id, "kind": "image", "role": "edited"}]},
                 instruction="do it")


def _background_fill(scene, mask: np.ndarray) -> np.ndarray:
    img = np.asarray(scene.image).copy()
    free = ~np.logical_or.reduce([o.mask for o in scene.objects])
    img[mask] = np.median(img[free], axis=0).astype(np.uint8)
    return img


# -- scripts -----------------------------------------------------------------------------------------
def test_scripts_are_deterministic_heldout_and_cover_every_kind():
    a, b = cv.make_scripts(10, seed=0), cv.make_scripts(10, seed=0)
    assert [(s.scene_seed, [t.message for t in s.turns]) for s in a] == [
        (s.scene_seed, [t.message for t in s.turns]) for s in b]
    assert {s.kind for s in a} == set(cv.SCRIPTS)
    find = next(s for s in a if s.kind == "find")
    assert [t.kind for t in find.turns] == ["find", "segment_followup", "remove_followup"]
    assert [t.followup for t in find.turns] == [False, True, True]
    assert cv.heldout_scene_seed(0, 0) != cv.heldout_scene_seed(1, 0)
    from training.shapes import scene_seed
    assert cv.heldout_scene_seed(0, 3) == scene_seed(HELDOUT_SCENE_SEED, 3) != scene_seed(TRAIN_SCENE_SEED, 3)
    for s in a:  # the target is the object the expression names
        for t in s.turns:
            if t.ref is not None:
                assert (t.ref, t.target) in cv.scene_for(s.scene_seed).referring
    # the referring-segmentation phrasings are not the segment expert's training examples
    from experts.segment import SegmentExpert
    examples = {e.request.split("{")[0].strip() for e in SegmentExpert.examples}
    assert not any(p.split("{")[0].strip() in examples for p in cv.REFSEG_PHRASINGS)


# -- claims and answers ------------------------------------------------------------------------------
def test_claims_counts_and_pairs():
    assert cv.named_pairs("Two red circles and a blue square, but no green stars.") == {"red circle", "blue square"}
    assert cv.answer_count("There are 3 circles.", "circle") == 3
    assert cv.answer_count("I see two red circles and a blue circle.", "circle") == 3
    assert cv.answer_count("There are no stars here.", "star") == 0
    assert cv.answer_count("There is a circle.", "circle") == 1
    assert cv.answer_count("I am not sure.", "circle") is None
    assert cv.answer_count("I couldn't find any circles.", "circle") == 0
    assert cv.answer_count("I couldn't find any purple hexagons.", "circle") is None  # says nothing of circles
    assert cv.answer_count("No red circles, but 2 blue circles.", "circle") == 2
    # an edit's summary is not a claim that something was segmented
    assert cv.ACTIONS["masked"].search("repainted 1295 masked pixels as 'an empty background'") is None


def test_check_answer_passes_a_correct_answer_and_fails_wrong_ones():
    sc = _scene_with(2)
    obj = sc.objects[0]
    n_shape = sum(o.shape == obj.shape for o in sc.objects)
    turn = cv.Turn("count", "how many?", shape=obj.shape)
    # a correct count, with no call: true of the scene
    plural = PLURALS[obj.shape] if n_shape != 1 else obj.shape
    assert cv.check_answer(f"There are {n_shape} {plural}.", [], sc, turn) == []
    # a wrong count
    assert cv.check_answer(f"There are {n_shape + 2} {PLURALS[obj.shape]}.", [], sc, turn)
    # an invented object
    absent = next(f"{c} {s}" for c in COLOURS for s in PLURALS if f"{c} {s}" not in cv.scene_pairs(sc))
    assert any("invented" in p for p in cv.check_answer(f"I see a {absent}.", [], sc, turn))
    # a count that matches what the call returned is faithful (the detector's miss is not the answer's)
    det = _detect(sc, [0])
    found = cv.check_answer(f"I found 1 {obj.label}.", [det], sc, cv.Turn("find", "find it", target=0))
    assert found == []
    # the action said must be the action done
    assert any("no call" in p for p in cv.check_answer(f"I removed the {obj.label}.", [det], sc, turn))
    assert cv.check_answer(f"I removed the {obj.label}.", [_edit("remove", "image-" + "1" * 24)], sc, turn) == []
    assert cv.check_answer(f"I removed the {obj.label}.", [_edit("recolour", "image-" + "1" * 24)], sc, turn)
    assert cv.check_answer(f"Here is the mask of the {obj.label}.", [det], sc, turn)  # "mask of" needs a segment
    assert cv.check_answer("I drew it for you.", [], sc, turn)
    # a recolour to the wrong colour
    rec = _edit("recolour", "image-" + "1" * 24, prompt="a blue thing")
    t = cv.Turn("recolour", "make it blue", target=0, colour="blue")
    assert cv.check_answer(f"I made the {obj.label} blue.", [rec], sc, t) == []
    assert cv.check_answer(f"I made the {obj.label} green.", [rec], sc, t)
    # "made" that ends its clause claims no recolouring (a mask "I made: 1 candidate (red …)"); one
    # with an object and a colour still does, and is still checked
    seg1 = _segment(sc, [obj.mask], [obj.label])
    assert cv.recolour_claims(f"here is the mask i made: 1 candidate ({obj.label}).") == []
    assert cv.check_answer(f"Here is the mask I made: 1 candidate ({obj.label}).", [seg1], sc, turn) == []
    assert any("no call recoloured" in p for p in cv.check_answer(f"I made it {obj.colour}.", [seg1], sc, turn))
    # an answer that does not say what the edit did ("Here is the mask" after a recolour or a removal)
    seg = _segment(sc, [obj.mask], [obj.label])
    assert any("does not say what the edit did" in p
               for p in cv.check_answer(f"Here is the mask of the {obj.label}.", [seg, rec], sc, t))
    assert cv.check_answer("Here is the mask.", [_edit("remove", "image-" + "1" * 24)], sc, turn)
    # owning up to a failure needs a failed call; denying what a call saw is false
    assert cv.check_answer("Sorry, I could not do that.", [det], sc, turn)
    failed = _call("detect", None, status="failed")
    assert cv.check_answer("Sorry, I could not do that.", [failed], sc, turn) == []
    told = _call("detect", {"summary": f"no hexagons found; the image has 1 {obj.label}", "boxes": [], "labels": []})
    assert cv.check_answer(f"I couldn't find any {PLURALS[obj.shape]} of that colour, no {obj.label}.",
                           [told], sc, turn)


# -- turn checks -------------------------------------------------------------------------------------
def test_check_turn_describe_count_find_and_segment():
    sc = _scene_with(2)
    ok = cv.check_turn(cv.Turn("describe", "?"), _chat(sc.caption), sc)
    assert ok["ok"] and ok["named"] == ok["present"]
    assert not cv.check_turn(cv.Turn("describe", "?"), _chat("nothing"), sc)["ok"]
    shape = sc.objects[0].shape
    n = sum(o.shape == shape for o in sc.objects)
    assert cv.check_turn(cv.Turn("count", "?", shape=shape), _chat(f"There are {n} {PLURALS[shape]}."), sc)["ok"]
    assert not cv.check_turn(cv.Turn("count", "?", shape=shape), _chat(f"There are {n + 1} {PLURALS[shape]}."), sc)["ok"]
    find = cv.Turn("find", "find it", target=0)
    assert cv.check_turn(find, _chat("found", [_detect(sc, [0])]), sc)["ok"]
    assert not cv.check_turn(find, _chat("found", [_detect(sc, [0, 1])]), sc)["ok"]  # a box on another object
    assert not cv.check_turn(find, _chat("found", [_detect(sc, [1])]), sc)["ok"]
    assert not cv.check_turn(find, _chat("found", []), sc)["ok"]
    seg = cv.Turn("refseg", "segment it", target=0)
    good = cv.check_turn(seg, _chat("mask", [_segment(sc, [sc.objects[0].mask], ["x"])]), sc)
    assert good["ok"] and good["iou"] == 1.0
    grown = cv.dilate(sc.objects[0].mask, 6)
    loose = cv.check_turn(seg, _chat("mask", [_segment(sc, [grown], ["x"])]), sc)
    assert not loose["ok"] and 0 < loose["iou"] < cv.REFSEG_IOU
    # the follow-up is scored on the union of the masks: a mask on another object counts against it
    both = cv.check_turn(cv.Turn("segment_followup", "now", target=0),
                         _chat("mask", [_segment(sc, [sc.objects[0].mask, sc.objects[1].mask], ["a", "b"])]), sc)
    assert both["n_masks"] == 2
    assert both["iou"] == round(cv.mask_iou(sc.objects[0].mask | sc.objects[1].mask, sc.objects[0].mask), 4) < 1.0


def test_pixel_checks_on_synthetic_edits():
    sc = _scene_with(2)
    obj = sc.objects[0]
    before = np.asarray(sc.image).copy()
    removed = _background_fill(sc, obj.mask)
    assert cv.removal_check(before, removed, obj.mask, obj.colour)["ok"]
    assert not cv.removal_check(before, before, obj.mask, obj.colour)["ok"]  # nothing changed
    spill = removed.copy()
    spill[:40, :40] = 0  # pixels outside the mask changed too
    spill[obj.mask] = removed[obj.mask]
    far = ~cv.dilate(obj.mask, cv.OUTSIDE_DILATE)
    if far[:40, :40].sum() > cv.OUTSIDE_MAX_CHANGED * far.sum():
        assert not cv.removal_check(before, spill, obj.mask, obj.colour)["ok"]
    colour2 = next(c for c in COLOURS if c != obj.colour)
    recoloured = before.copy()
    recoloured[obj.mask] = COLOURS[colour2]
    assert cv.recolour_check(before, recoloured, obj.mask, colour2)["ok"]
    assert not cv.recolour_check(before, removed, obj.mask, colour2)["ok"]
    # the turn check reads the edit's output image through open_image
    images = {"image-" + "2" * 24: Image.fromarray(recoloured)}
    t = cv.Turn("recolour", "make it", target=0, colour=colour2)
    assert cv.check_turn(t, _chat("done", [_edit("recolour", "image-" + "2" * 24)]), sc, open_image=images.__getitem__)["ok"]
    assert not cv.check_turn(t, _chat("done", []), sc, open_image=images.__getitem__)["ok"]


# -- the whole eval, against a scripted stand-in -------------------------------------------------------
class _Store:
    def __init__(self) -> None:
        self.images: dict[str, Image.Image] = {}

    def import_image(self, data: bytes, **kw: Any) -> Any:
        aid = f"image-{len(self.images):024x}"
        self.images[aid] = Image.open(io.BytesIO(data)).convert("RGB")
        return SimpleNamespace(id=aid)

    def add(self, arr: np.ndarray) -> str:
        aid = f"image-{len(self.images):024x}"
        self.images[aid] = Image.fromarray(arr)
        return aid

    def open_image(self, aid: str, mode: str = "RGB") -> Image.Image:
        return self.images[aid]


class OracleAssistant:
    """Answers every scripted request correctly from the scene's ground truth (or, ``lie=True``, with
    wrong counts and an invented object), so the eval's plumbing and metrics can be checked."""

    def __init__(self, lie: bool = False) -> None:
        self.store = _Store()
        self.lie = lie
        self.convs: dict[str, dict[str, Any]] = {}

    def _scene(self, image_id: str):
        px = np.asarray(self.store.images[image_id])
        for i in range(400):
            sc = cv.scene_for(cv.heldout_scene_seed(0, i))
            if np.array_equal(np.asarray(sc.image), px):
                return sc
        raise AssertionError("not a held-out scene")

    def run(self, message: str, *, images: list[str] | None = None, conversation_id: str | None = None,
            **kw: Any) -> ChatResult:
        if conversation_id is None:
            conversation_id = f"conv-{len(self.convs):024x}"
            self.convs[conversation_id] = {"image": images[0], "scene": self._scene(images[0])}
        st = self.convs[conversation_id]
        sc = st["scene"]
        refs = [(t, i) for t, i in sc.referring if t in message]
        if refs:
            st["target"] = max(refs, key=lambda r: len(r[0]))[1]
        calls: list[CallRecord] = []
        low = message.lower()
        if low.startswith("how many"):
            shape = next(s for s, p in PLURALS.items() if p in low)
            n = sum(o.shape == shape for o in sc.objects) + (2 if self.lie else 0)
            answer = f"There are {n} {PLURALS[shape]}."
        elif "remove" in low:
            obj = sc.objects[st["target"]]
            aid = self.store.add(_background_fill(sc, obj.mask))
            calls, answer = [_edit("remove", aid)], f"I removed the {obj.label}."
        elif low.startswith(("make", "please make")):
            obj = sc.objects[st["target"]]
            colour2 = next(c for c in COLOURS if low.endswith(c))
            arr = np.asarray(sc.image).copy()
            arr[obj.mask] = COLOURS[colour2]
            aid = self.store.add(arr)
            calls = [_segment(sc, [obj.mask], [obj.label]), _edit("recolour", aid, prompt=f"a {colour2} {obj.shape}")]
            answer = f"I recoloured the {obj.label} {colour2}."
        elif low.startswith(("find", "where")):
            obj = sc.objects[st["target"]]
            calls, answer = [_detect(sc, [st["target"]])], f"I found 1 {obj.label}."
        elif "target" in st:
            obj = sc.objects[st["target"]]
            calls, answer = [_segment(sc, [obj.mask], [obj.label])], f"Here is the mask of the {obj.label}."
        else:
            answer = sc.caption + (" and a green star and a purple star" if self.lie else "")
        return ChatResult(conversation_id=conversation_id, answer=answer, plan="", calls=calls, errors=[],
                          artifacts=[])


def test_evaluate_with_an_oracle_scores_everything_right():
    res, outcomes = cv.evaluate(OracleAssistant(), n=5, seed=0)
    assert res["n_conversations"] == 5 and res["n_turns"] == 7 and res["n_followup_turns"] == 2
    bad = [(o.kind, o.message, o.answer, o.problems, o.details) for o in outcomes if not (o.success and o.faithful)]
    assert not bad, bad
    for key in ("answer_faithfulness", "turn_success", "followup_success", "describe_f1", "count_exact",
                "referring_miou"):
        assert res[key] == 1.0, key


def test_evaluate_catches_a_lying_assistant():
    res, _ = cv.evaluate(OracleAssistant(lie=True), n=2, seed=0)
    assert res["count_exact"] == 0.0 and res["answer_faithfulness"] == 0.0
    assert res["describe_f1"] < 1.0


def test_cli_json_and_errors(tmp_path, capsys):
    errors = tmp_path / "errors.json"
    assert cv.main_eval(["--json", "--n", "1", "--errors", str(errors)], assistant=OracleAssistant(lie=True)) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_conversations"] == 1 and res["turn_success"] == 0.0
    failing = json.loads(errors.read_text())
    assert len(failing) == 1 and failing[0]["kind"] == "describe"
    assert cv.main_train([]) == 2


def test_recipe_is_registered():
    from orchestrator.cli import RECIPES

    assert "conversations" in RECIPES


@pytest.mark.parametrize("seed", [0, 1])
def test_scene_for_matches_make_scene(seed):
    s = cv.heldout_scene_seed(seed, 0)
    assert np.array_equal(np.asarray(cv.scene_for(s).image), np.asarray(make_scene(s, size=cv.SCENE_SIZE).image))


def test_rescore_reproduces_a_run_from_its_turns():
    from dataclasses import asdict

    oracle = OracleAssistant()
    res, outcomes = cv.evaluate(oracle, n=5, seed=0)
    rows = [json.loads(json.dumps(asdict(o))) for o in outcomes]
    again, _ = cv.rescore(rows, seed=0, open_image=oracle.store.open_image)
    for key in ("answer_faithfulness", "turn_success", "followup_success", "count_exact", "referring_miou"):
        assert again[key] == res[key], key
    with pytest.raises(ValueError):
        cv.rescore(rows, seed=1)
