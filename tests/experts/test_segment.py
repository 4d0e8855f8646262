"""The segment expert: contract, masks that match the shapes world's ground truth, text grounding,
the embedding cache, batching, official-checkpoint loading and clear errors."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from experts.referring import parse_target
from experts.sam_model import CONFIG_FILE, WEIGHTS_FILE, SegmenterUnavailable
from experts.sam_runner import refine_mask
from experts.segment import SegmentArgs, SegmentExpert
from orchestrator.dispatch import CallFailed, execute_call
from switchboard.artifacts import ArtifactStore
from switchboard.expert import Expert, ExpertResult, ImageRef, RunContext
from switchboard.registry import Registry, get_registry
from switchboard.settings import get_settings
from switchboard.testing import ExpertContract
from training.shapes import make_scene

pytestmark = pytest.mark.usefixtures("no_network")
SHIPPED = get_settings().models_dir / "segmenter"
needs_weights = pytest.mark.skipif(not (SHIPPED / WEIGHTS_FILE).exists(), reason="models/segmenter not trained")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


def put_scene(store: ArtifactStore, seed: int) -> tuple[Any, str]:
    scene = make_scene(seed)
    return scene, store.put_image(scene.image).id


def put_gt_boxes(store: ArtifactStore, scene: Any, image_id: str) -> str:
    boxes = [{"xyxy": list(o.box), "label": o.label, "shape": o.shape, "colour": o.colour, "score": 1.0}
             for o in scene.objects]
    return store.put_json({"image": image_id, "width": 256, "height": 256, "boxes": boxes}, kind="boxes").id


def read_mask(store: ArtifactStore, artifact_id: str) -> np.ndarray:
    return np.asarray(store.open_image(artifact_id, mode="L")) > 127


@pytest.fixture(scope="module")
def shipped() -> SegmentExpert:
    """One expert with the shipped weights for the whole module (loading is the slow part)."""
    if not (SHIPPED / WEIGHTS_FILE).exists():
        pytest.skip("models/segmenter not trained")
    expert = SegmentExpert()
    expert.ensure_setup()
    return expert


@needs_weights
class TestSegmentContract(ExpertContract):
    expert_cls = SegmentExpert

    def make_args(self, store: ArtifactStore) -> dict:
        scene, image = put_scene(store, 7)
        return {"image": image, "boxes": put_gt_boxes(store, scene, image)}

    def invalid_args(self, store: ArtifactStore) -> list[dict]:
        scene, image = put_scene(store, 7)
        boxes = put_gt_boxes(store, scene, image)
        return [*super().invalid_args(store),
                {"image": image},                                            # no prompt
                {"image": image, "boxes": boxes, "points": [[10, 10]]},     # two prompts
                {"image": image, "target": "the red circle", "points": [[10, 10]]},
                {"image": image, "points": [[500, 1200]]},                   # out of range
                {"image": image, "points": [[-1, 5]]},
                {"image": image, "points": [[1, 2, 3]]},
                {"image": image, "points": [[1, 2]], "labels": [1, 0]},     # label count
                {"image": image, "points": [[1, 2]], "labels": [0]},        # nothing positive
                {"image": image, "target": "the red circle", "labels": [1]},
                {"image": image, "target": "   "}]


# -- masks match the ground truth -----------------------------------------------------------------------
def test_box_prompts_match_ground_truth(shipped: SegmentExpert, store: ArtifactStore) -> None:
    ious = []
    for seed in (7, 11, 12):
        scene, image = put_scene(store, seed)
        res = shipped({"image": image, "boxes": put_gt_boxes(store, scene, image)}, RunContext(store, registry=get_registry()))
        assert len(res.objects) == len(scene.objects)
        for obj, gt in zip(res.objects, scene.objects, strict=True):
            m = read_mask(store, obj.mask)
            assert m.shape == gt.mask.shape and obj.area == int(m.sum())
            ious.append(iou(m, gt.mask))
    assert np.mean(ious) >= 0.8, ious
    assert min(ious) >= 0.5, ious


def test_point_prompt_segments_the_object_under_it(shipped: SegmentExpert, store: ArtifactStore) -> None:
    from scipy.ndimage import distance_transform_edt

    ious = []
    for seed in (7, 11):
        scene, image = put_scene(store, seed)
        for gt in scene.objects:
            y, x = np.unravel_index(np.argmax(distance_transform_edt(gt.mask)), gt.mask.shape)
            point = [round((x + 0.5) * 1000 / 256), round((y + 0.5) * 1000 / 256)]
            res = shipped({"image": image, "points": [point]}, RunContext(store, registry=get_registry()))
            assert len(res.objects) == 1 and res.summary.startswith("1 mask:")
            ious.append(iou(read_mask(store, res.objects[0].mask), gt.mask))
    assert np.mean(ious) >= 0.7, ious


def test_several_objects_union_mask_comes_first(shipped: SegmentExpert, store: ArtifactStore) -> None:
    scene, image = put_scene(store, 7)
    assert len(scene.objects) >= 2
    res = shipped({"image": image, "boxes": put_gt_boxes(store, scene, image)}, RunContext(store, registry=get_registry()))
    masks = [a for a in res.artifacts if a.kind == "mask"]
    assert masks[0].role == "mask (all)"
    union = np.logical_or.reduce([read_mask(store, o.mask) for o in res.objects])
    assert np.array_equal(read_mask(store, masks[0].id), union)
    assert [a.id for a in masks[1:]] == [o.mask for o in res.objects]
    assert [a.kind for a in res.artifacts][-2:] == ["overlay", "boxes"]
    assert res.summary.startswith(f"{len(scene.objects)} masks: {scene.objects[0].label} ")
    # COCO RLE round-trips to the same mask
    from pycocotools import mask as mask_utils

    rle = dict(res.objects[0].rle, counts=res.objects[0].rle["counts"].encode())
    assert np.array_equal(mask_utils.decode(rle).astype(bool), read_mask(store, res.objects[0].mask))


def test_multimask_returns_candidates(shipped: SegmentExpert, store: ArtifactStore) -> None:
    scene, image = put_scene(store, 7)
    res = shipped({"image": image, "points": [[500, 500]], "multimask": True}, RunContext(store, registry=get_registry()))
    (obj,) = res.objects
    assert len(obj.candidates) == 2
    assert all(obj.score >= c.score for c in obj.candidates)


def test_empty_boxes_give_no_masks(shipped: SegmentExpert, store: ArtifactStore) -> None:
    _, image = put_scene(store, 7)
    empty = store.put_json({"image": image, "width": 256, "height": 256, "boxes": []}, kind="boxes").id
    res = shipped({"image": image, "boxes": empty}, RunContext(store, registry=get_registry()))
    assert res.objects == [] and "nothing to segment" in res.summary


# -- text targets, grounded through detect ------------------------------------------------------------
class OracleDetectArgs(BaseModel):
    image: ImageRef
    query: str = ""
    confidence: float = 0.25


class OracleDetectResult(ExpertResult):
    pass


class OracleDetect(Expert):
    """A stand-in for detect that reports the scene's true boxes of the queried shape (or all of them
    for "everything"), without colours, so segment must read colours from the pixels."""

    name = "detect"
    description = "test double: the ground-truth boxes of a shapes-world scene"
    Args = OracleDetectArgs
    Result = OracleDetectResult
    scenes: dict[str, Any] = {}
    calls = 0

    def run(self, args: OracleDetectArgs, ctx: RunContext) -> OracleDetectResult:
        type(self).calls += 1
        scene = self.scenes[args.image]
        wanted = args.query.removesuffix("s")  # like detect: a class name (singular or plural) or everything
        boxes = [{"xyxy": list(o.box), "label": o.shape, "shape": o.shape, "score": 0.9} for o in scene.objects
                 if args.query == "everything" or o.shape == wanted]
        art = ctx.save_json({"image": args.image, "width": 256, "height": 256, "boxes": boxes}, kind="boxes")
        return OracleDetectResult(summary=f"{len(boxes)} boxes", artifacts=[art])


@pytest.fixture
def oracle_registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    import switchboard.registry as registry_module

    reg = Registry()
    reg.register(SegmentExpert, "test")
    reg.register(OracleDetect, "test")
    monkeypatch.setattr(registry_module, "_registry", reg)
    OracleDetect.scenes = {}
    OracleDetect.calls = 0
    return reg


def test_parse_target() -> None:
    q = parse_target("the largest red square")
    assert (q.colours, q.noun, q.superlative) == ({"red"}, "square", ("area", "max"))
    q = parse_target("the triangle on the left")
    assert (q.colours, q.noun, q.superlative) == (None, "triangle", ("x", "min"))
    q = parse_target("the blue shape")
    assert (q.colours, q.noun, q.superlative, q.what) == ({"blue"}, None, None, "blue object")
    assert parse_target("the bottommost star").superlative == ("y", "max")


def test_referring_expressions_pick_the_right_object(shipped: SegmentExpert, store: ArtifactStore,
                                                     oracle_registry: Registry) -> None:
    checked = 0
    for seed in (11, 12, 21):
        scene, image = put_scene(store, seed)
        OracleDetect.scenes[image] = scene
        for text, j in scene.referring:
            res = shipped({"image": image, "target": text}, RunContext(store, registry=get_registry()))
            assert len(res.objects) == 1, (text, res.summary)
            m = read_mask(store, res.objects[0].mask)
            best = int(np.argmax([iou(m, o.mask) for o in scene.objects]))
            assert best == j, f"{text!r} in scene {seed} picked object {best} ({res.grounding})"
            checked += 1
    assert checked >= 35


def test_targets_on_one_image_run_detect_once(store: ArtifactStore, oracle_registry: Registry) -> None:
    if not (SHIPPED / WEIGHTS_FILE).exists():
        pytest.skip("models/segmenter not trained")
    expert = SegmentExpert()
    scene, image = put_scene(store, 11)
    OracleDetect.scenes[image] = scene
    for text, _ in scene.referring[:4]:
        expert({"image": image, "target": text}, RunContext(store, registry=get_registry()))
    assert OracleDetect.calls == 1


def test_target_through_execute_call(shipped: SegmentExpert, store: ArtifactStore, oracle_registry: Registry,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # the same path a Celery worker takes: execute_call -> registry instance -> detect in-process
    monkeypatch.setattr(oracle_registry, "_instances", {"segment": shipped})
    scene = make_scene(7)
    image = store.put_image(scene.image).id
    OracleDetect.scenes[image] = scene
    text, j = next((t, j) for t, j in scene.referring if t.startswith("the ") and len(t.split()) == 3)
    out = execute_call(oracle_registry, store, "segment", {"image": image, "target": text}, call_id="c2")
    assert out["grounding"] and len(out["objects"]) == 1
    assert iou(read_mask(store, out["artifacts"][0]["id"]), scene.objects[j].mask) >= 0.7


def test_unresolvable_target_is_an_empty_result(shipped: SegmentExpert, store: ArtifactStore,
                                                oracle_registry: Registry) -> None:
    scene, image = put_scene(store, 7)
    OracleDetect.scenes[image] = scene
    missing = next(s for s in ("circle", "square", "triangle", "hexagon", "star")
                   if s not in {o.shape for o in scene.objects})
    res = shipped({"image": image, "target": f"the {missing}"}, RunContext(store, registry=get_registry()))
    assert res.objects == [] and res.artifacts == [] and f"no {missing} found" in res.summary


def test_colour_and_class_synonyms_ground_like_detect(shipped: SegmentExpert, store: ArtifactStore,
                                                     oracle_registry: Registry) -> None:
    # one vocabulary (experts.referring): "crimson" is red and a "ball" a circle, to segment as to detect
    seed = next(s for s in range(100) if any(t == "the red circle" for t, _ in make_scene(s).referring))
    scene, image = put_scene(store, seed)
    OracleDetect.scenes[image] = scene
    j = dict(scene.referring)["the red circle"]
    try:
        for text in ("the crimson circle", "the scarlet ball"):
            res = shipped({"image": image, "target": text}, RunContext(store, registry=get_registry()))
            assert len(res.objects) == 1, res.summary
            assert iou(read_mask(store, res.objects[0].mask), scene.objects[j].mask) >= 0.7, res.grounding
    finally:
        shipped._grounding_memo.clear()  # the oracle's boxes must not stand in for the real detector's later


def test_target_without_detect_is_a_clear_error(shipped: SegmentExpert, store: ArtifactStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import switchboard.registry as registry_module

    reg = Registry()
    reg.register(SegmentExpert, "test")
    monkeypatch.setattr(registry_module, "_registry", reg)
    monkeypatch.setattr(reg, "_instances", {"segment": shipped})
    _, image = put_scene(store, 7)
    shipped._grounding_memo.clear()  # detect's boxes for this image from earlier tests
    with pytest.raises(CallFailed, match="segment: cannot ground a text target: the detect expert is not installed"):
        execute_call(reg, store, "segment", {"image": image, "target": "the red circle"}, call_id="c1")


def test_real_detect_grounds_the_red_circle(shipped: SegmentExpert, store: ArtifactStore,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import switchboard.registry as registry_module

    detect_module = pytest.importorskip("experts.detect")
    if not (get_settings().models_dir / "detector" / "best.pt").exists():
        pytest.skip("the detector is not trained")
    reg = Registry()  # segment + the real detect, whatever else is installed
    reg.register(SegmentExpert, "test")
    reg.register(detect_module.DetectExpert, "test")
    monkeypatch.setattr(registry_module, "_registry", reg)
    seed = next(s for s in range(100) if any(t == "the red circle" for t, _ in make_scene(s).referring))
    scene, image = put_scene(store, seed)
    j = dict(scene.referring)["the red circle"]
    res = shipped({"image": image, "target": "the red circle"}, RunContext(store, registry=get_registry()))
    assert len(res.objects) == 1, res.summary
    assert iou(read_mask(store, res.objects[0].mask), scene.objects[j].mask) >= 0.7, res.grounding


def test_refinement_snaps_a_blurred_mask_to_the_image_edges() -> None:
    from scipy.ndimage import gaussian_filter

    obj = make_scene(7).objects[0]
    image = np.asarray(make_scene(7).image, np.float32) / 255
    # logits as a coarse decoder gives them: the true mask, blurred over ~4 px and a little too big
    logits = gaussian_filter(obj.mask.astype(np.float32) * 8 - 3.5, 3)
    blurred = logits > 0
    refined = refine_mask(logits, image, r=6, eps=0.01)
    assert iou(refined, obj.mask) > iou(blurred, obj.mask) + 0.02
    assert not refine_mask(np.full((8, 8), -5.0), np.zeros((8, 8, 3), np.float32), 2, 0.01).any()


# -- embedding cache and batching ------------------------------------------------------------------------
def _count_encoder_images(expert: SegmentExpert) -> list[int]:
    seen: list[int] = []
    expert.runner.sam.image_encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    return seen


def test_second_prompt_on_same_image_skips_the_encoder(store: ArtifactStore) -> None:
    if not (SHIPPED / WEIGHTS_FILE).exists():
        pytest.skip("models/segmenter not trained")
    expert = SegmentExpert(cache_size=2)
    expert.ensure_setup()
    seen = _count_encoder_images(expert)
    ids = [put_scene(store, s)[1] for s in (7, 11, 12)]
    expert({"image": ids[0], "points": [[500, 500]]}, RunContext(store, registry=get_registry()))
    expert({"image": ids[0], "points": [[200, 700]]}, RunContext(store, registry=get_registry()))
    assert seen == [1], "the second prompt on the same image must reuse the embedding"
    expert({"image": ids[1], "points": [[500, 500]]}, RunContext(store, registry=get_registry()))
    expert({"image": ids[2], "points": [[500, 500]]}, RunContext(store, registry=get_registry()))  # evicts ids[0] (size 2)
    expert({"image": ids[0], "points": [[500, 500]]}, RunContext(store, registry=get_registry()))
    assert seen == [1, 1, 1, 1]
    assert expert.cache.hits == 1 and len(expert.cache) == 2


def test_run_batch_encodes_distinct_images_once(store: ArtifactStore) -> None:
    if not (SHIPPED / WEIGHTS_FILE).exists():
        pytest.skip("models/segmenter not trained")
    expert = SegmentExpert()
    expert.ensure_setup()
    seen = _count_encoder_images(expert)
    a, b = put_scene(store, 7)[1], put_scene(store, 11)[1]
    items = [(SegmentArgs(image=i, points=[[500, 500]]), RunContext(store, call_id=f"c{n}", registry=get_registry()))
             for n, i in enumerate((a, b, a))]
    batch = expert.run_batch(items)
    assert seen == [2], "one encoder pass over the two distinct images"
    single = SegmentExpert()
    single.ensure_setup()
    for (args, ctx), res in zip(items, batch, strict=True):
        assert res.objects[0].mask == single.run(args, ctx).objects[0].mask


# -- real weights, same code ----------------------------------------------------------------------------
def test_official_checkpoint_loads_through_sam_model_registry(tmp_path: Path, store: ArtifactStore,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An official-layout checkpoint (the registry's own ``_build_sam`` with a tiny encoder, saved as a
    plain state dict like sam_vit_b_01ec64.pth) loads through ``sam_model_registry[type](checkpoint=)``."""
    import torch
    from segment_anything import sam_model_registry
    from segment_anything.build_sam import _build_sam

    tiny = partial(_build_sam, encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=1,
                   encoder_global_attn_indexes=[])
    monkeypatch.setitem(sam_model_registry, "vit_tiny_test", tiny)
    torch.manual_seed(0)
    ckpt = tmp_path / "sam_vit_tiny_test.pth"
    torch.save(tiny().state_dict(), ckpt)
    with torch.device("meta"):
        vit_b_keys = set(sam_model_registry["vit_b"]().state_dict())
    assert set(torch.load(ckpt, weights_only=True)) <= vit_b_keys, "must be the official key layout"

    loaded: list[str] = []
    real_builder = sam_model_registry["vit_tiny_test"]
    monkeypatch.setitem(sam_model_registry, "vit_tiny_test",
                        lambda checkpoint=None: loaded.append(checkpoint) or real_builder(checkpoint=checkpoint))
    monkeypatch.setenv("SWITCHBOARD_SEGMENT_WEIGHTS", str(ckpt))
    monkeypatch.setenv("SWITCHBOARD_SEGMENT_MODEL_TYPE", "vit_tiny_test")
    get_settings.cache_clear()
    try:
        expert = SegmentExpert()
        from PIL import Image

        image = store.put_image(Image.new("RGB", (96, 64), (120, 120, 120))).id
        res = expert({"image": image, "points": [[500, 500]]}, RunContext(store, registry=get_registry()))
    finally:
        get_settings.cache_clear()
    assert loaded == [str(ckpt)]
    assert expert.runner.img_size == 1024 and "vit_tiny_test" in expert.model_name
    assert expert.runner.refine_cells == 0  # official masks are used as SAM makes them
    assert read_mask(store, res.objects[0].mask).shape == (64, 96)


def test_wrong_model_type_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           store: ArtifactStore) -> None:
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"not really")
    monkeypatch.setenv("SWITCHBOARD_SEGMENT_WEIGHTS", str(ckpt))
    monkeypatch.setenv("SWITCHBOARD_SEGMENT_MODEL_TYPE", "vit_q")
    get_settings.cache_clear()
    try:
        with pytest.raises(SegmenterUnavailable, match="unknown SAM model type 'vit_q'.*vit_b"):
            SegmentExpert().ensure_setup()
    finally:
        get_settings.cache_clear()


def test_missing_weights_is_a_clear_error(tmp_path: Path, store: ArtifactStore) -> None:
    reg = Registry()
    reg.register(SegmentExpert, "test")
    reg._instances["segment"] = SegmentExpert(weights_dir=tmp_path / "nothing")
    _, image = put_scene(store, 7)
    with pytest.raises(CallFailed, match=f"no segmenter weights in .*nothing.*{CONFIG_FILE}"):
        execute_call(reg, store, "segment", {"image": image, "points": [[1, 2]]}, call_id="c1")


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    ({}, "image"),
    ({"image": "image-000000000000000000000000"}, "exactly one of boxes, points or target"),
    ({"image": "image-000000000000000000000000", "points": [[1, 1]], "target": "x"},
     "exactly one of boxes, points or target \\(got points, target\\)"),
    ({"image": "image-000000000000000000000000", "points": [[1, 1001]]}, "outside the 0-1000 range"),
    ({"image": "image-000000000000000000000000", "points": [[1, 1]], "labels": [1, 1]}, "2 labels for 1 points"),
])
def test_bad_arguments_are_refused_with_a_reason(args: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SegmentArgs.model_validate(args)


def test_bad_arguments_become_a_failed_call(store: ArtifactStore) -> None:
    reg = Registry()
    reg.register(SegmentExpert, "test")
    _, image = put_scene(store, 7)
    with pytest.raises(CallFailed, match="segment: invalid arguments: .*exactly one of"):
        execute_call(reg, store, "segment", {"image": image}, call_id="c1")
    assert not reg.instance("segment").is_setup  # refused before any model was loaded


def test_cache_size_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_SEGMENT_CACHE_SIZE", "3")
    get_settings.cache_clear()
    try:
        assert SegmentExpert().cache.size == 3
        monkeypatch.setenv("SWITCHBOARD_SEGMENT_CACHE_SIZE", "lots")
        get_settings.cache_clear()
        with pytest.raises(ValueError):
            SegmentExpert()
    finally:
        get_settings.cache_clear()
