"""The core's answer is checked against the calls: claims they do not support give way to their summaries."""

from __future__ import annotations

from orchestrator.core.fusion import compose, faithful_answer, unsupported
from orchestrator.events import CallRecord

MASK = "mask-" + "a" * 24


def done(expert: str, summary: str, **result) -> CallRecord:
    return CallRecord(call_id="c1", expert=expert, status="done", args={"query": "circle"},
                      result={"summary": summary, "artifacts": [{"id": MASK, "kind": "mask", "role": "mask"}],
                              **result})


def test_a_faithful_answer_stands() -> None:
    calls = [done("detect", "found 3 circles: 2 red circles, 1 blue circle")]
    answer = "I found 3 circles: two red ones and a blue circle."
    assert faithful_answer(answer, calls) == (answer, [])


def test_a_wrong_count_or_an_invented_object_is_replaced_by_the_summaries() -> None:
    calls = [done("detect", "found 3 circles: 2 red circles, 1 blue circle")]
    for bad in ("I found 1 red circle.", "There are 3 circles and a green star."):
        answer, problems = faithful_answer(bad, calls)
        assert problems and answer == "Found 3 circles: 2 red circles, 1 blue circle."


def test_a_failed_call_must_be_said() -> None:
    calls = [done("segment", "mask of the red circle, 12% of the image"),
             CallRecord(call_id="c2", expert="edit", status="failed", error="edit: timed out after 300 s")]
    assert unsupported("Here is the mask and the edited image.", calls)
    assert not unsupported("Here is the mask of the red circle, but the edit failed (it timed out).", calls)
    assert faithful_answer("Done!", calls)[0] == (
        "Mask of the red circle, 12% of the image. Edit failed: edit: timed out after 300 s.")


def test_an_out_of_domain_result_is_reported_in_the_experts_words() -> None:
    summary = "this looks like a photograph; the embedded detector only knows the shapes world"
    calls = [done("detect", summary, out_of_domain=True)]
    answer, problems = faithful_answer("I found 13 shapes: 4 blue stars.", calls)
    assert problems and answer.startswith("This looks like a photograph")


def test_artifact_ids_are_not_claims_and_compose_covers_skipped_calls() -> None:
    calls = [done("segment", "mask of the circle, 19% of the image")]
    assert not unsupported(f"The mask of the circle ({MASK}) covers 19% of the image.", calls)
    skipped = CallRecord(call_id="c2", expert="edit", status="skipped", error="c1 did not succeed")
    assert compose([skipped]) == "Edit was not run: c1 did not succeed."


def test_counts_are_read_from_the_labels_and_composed_in_words() -> None:
    calls = [done("detect", "2 red circles: (1,2,3,4) (5,6,7,8); 1 blue circle: (9,9,9,9) [x1,y1,x2,y2]",
                  labels=["red circle", "red circle", "blue circle"])]
    assert not unsupported("I found 3 circles: 2 red circles and 1 blue circle.", calls)
    assert unsupported("I found 2 circles.", calls)
    answer, problems = faithful_answer("I found one red circle.", calls)
    assert problems and answer == "Found 2 red circles and 1 blue circle."


def test_a_plain_answer_about_an_unseen_photo_names_no_shapes() -> None:
    from orchestrator.core.fusion import CANNOT_SEE, unseen_answer

    invented = "I see a blue square, a purple circle and a green star."
    assert unseen_answer(invented, unseen_images=1) == (CANNOT_SEE, [
        "names shapes in 1 image(s) outside what the core can see"])
    assert unseen_answer(invented, unseen_images=0) == (invented, [])  # a scene it can see
    assert unseen_answer("It is a photo of a street.", unseen_images=1)[1] == []  # nothing invented


def test_an_answer_must_say_what_the_edit_did() -> None:
    """'Here is the mask of the purple hexagon' after a recolour is replaced by words that name it."""
    seg = CallRecord(call_id="c1", expert="segment", status="done", args={"target": "the purple hexagon"},
                     result={"summary": "1 mask: purple hexagon 1939 px ['the purple hexagon' -> purple hexagon]",
                             "objects": [{"label": "purple hexagon", "area": 1939, "mask": MASK}]})
    edit = CallRecord(call_id="c2", expert="edit", status="done", args={"image": "x", "mask": "$c1",
                                                                         "instruction": "make it orange"},
                      result={"summary": "recolour: repainted 1939 masked pixels as 'an orange hexagon'; pixels "
                                         "outside the mask unchanged", "prompt": "an orange hexagon",
                              "changed_pixels": 1939})
    answer, problems = faithful_answer("Here is the mask of the purple hexagon; it covers 1939 pixels.", [seg, edit])
    assert problems == ["does not say that c2 (edit) did: recolour"]
    assert answer == ("Masked the purple hexagon (1939 px). Recoloured it: 1939 masked pixels repainted as an orange "
                      "hexagon; nothing outside the mask changed.")
    assert faithful_answer("I made the purple hexagon orange.", [seg, edit]) == (
        "I made the purple hexagon orange.", [])
    removed = CallRecord(call_id="c1", expert="edit", status="done", args={"instruction": "remove it"},
                         result={"summary": "remove: repainted 876 masked pixels as 'an empty background'",
                                 "prompt": "an empty background", "changed_pixels": 876})
    answer, problems = faithful_answer("Here is the mask; it covers 876 empty pixels.", [removed])
    assert problems and answer.startswith("Removed it: 876 masked pixels repainted as the background")
    assert not unsupported(answer, [removed])


def test_an_answer_that_turns_the_request_down_after_the_calls_ran_is_replaced() -> None:
    """"That is not an image task" after a segment call that masked the red star contradicts the call."""
    calls = [done("segment", "1 mask: red star 333 px")]
    for bad in ("That is not an image task, and I only work with images. I can use: crop, detect.",
                "Sorry, I can't help with video: I have no expert for it."):
        answer, problems = faithful_answer(bad, calls)
        assert problems == ["turns the request down, but every call ran"]
        assert answer == "1 mask: red star 333 px."
    # a failed call may be turned down in words ("can't")
    failed = [CallRecord(call_id="c1", expert="segment", status="failed", error="segment: no image")]
    assert not any("turns the request down" in p for p in unsupported("Sorry, I can't help: segment failed.", failed))


def test_a_shape_named_without_a_colour_must_be_in_the_results() -> None:
    """"Here is the mask of the hexagon" after segmenting five objects, none of them a hexagon."""
    calls = [done("segment", "5 masks: orange square 2160 px, purple square 2109 px, green star 1567 px")]
    assert unsupported("Here is the mask of the hexagon.", calls) == ["'hexagon' is not in the results"]
    assert not unsupported("Here are the masks of the squares and the star.", calls)
