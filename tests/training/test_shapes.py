"""The shapes world: determinism, ground truth that matches the pixels, COCO export, language."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import shapes
from training.shapes import COLOURS, SHAPES, Scene, make_scene, write_dataset


def png_bytes(scene: Scene) -> bytes:
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG")
    return buf.getvalue()


# -- determinism -------------------------------------------------------------------------------------
def test_same_seed_same_bytes() -> None:
    a, b = make_scene(1234), make_scene(1234)
    assert png_bytes(a) == png_bytes(b)
    assert a.caption == b.caption and a.referring == b.referring
    assert [(o.shape, o.colour, o.box, o.area) for o in a.objects] == [(o.shape, o.colour, o.box, o.area)
                                                                         for o in b.objects]
    for oa, ob in zip(a.objects, b.objects, strict=True):
        assert np.array_equal(oa.mask, ob.mask)


def test_different_seeds_differ() -> None:
    images = {png_bytes(make_scene(s)) for s in range(8)}
    assert len(images) == 8


def test_size_is_configurable() -> None:
    scene = make_scene(5, size=128)
    assert scene.image.size == (128, 128) and scene.image.mode == "RGB"
    assert all(o.mask.shape == (128, 128) for o in scene.objects)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        make_scene(0, shapes=["blob"])
    with pytest.raises(ValueError, match="unknown colour"):
        make_scene(0, colours=["teal"])
    with pytest.raises(ValueError):
        make_scene(0, min_objects=3, max_objects=2)


# -- ground truth ------------------------------------------------------------------------------------
def check_ground_truth(scene: Scene) -> None:
    size = scene.image.size[0]
    pixels = np.asarray(scene.image).astype(int)
    union = np.zeros((size, size), bool)
    for obj in scene.objects:
        assert obj.shape in SHAPES and obj.colour in COLOURS
        assert obj.mask.dtype == bool and obj.mask.shape == (size, size)
        assert obj.area == int(obj.mask.sum()) >= shapes.MIN_VISIBLE_PIXELS
        ys, xs = np.nonzero(obj.mask)
        # the box is the tight box of the visible mask
        assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # occlusion: visible masks never overlap
        assert not (union & obj.mask).any()
        union |= obj.mask
        # the visible pixels really are this object's colour (palette ± jitter and noise)
        median = np.median(pixels[obj.mask], axis=0)
        assert np.abs(median - np.array(COLOURS[obj.colour])).max() < 40, (obj, median)


@pytest.mark.parametrize("seed", range(20))
def test_masks_boxes_and_occlusion(seed: int) -> None:
    check_ground_truth(make_scene(seed))


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_ground_truth_holds_for_any_seed(seed: int) -> None:
    scene = make_scene(seed, size=128)
    assert 1 <= len(scene.objects) <= 6
    check_ground_truth(scene)


def test_later_objects_occlude_earlier_ones() -> None:
    # find a scene with an overlap and check the covered pixels belong to the later object
    for seed in range(300):
        scene = make_scene(seed)
        for i, early in enumerate(scene.objects):
            for late in scene.objects[i + 1:]:
                x1, y1, x2, y2 = early.box
                lx1, ly1, lx2, ly2 = late.box
                if late.colour != early.colour and min(x2, lx2) > max(x1, lx1) and min(y2, ly2) > max(y1, ly1):
                    region = np.zeros_like(early.mask)
                    region[int(max(y1, ly1)):int(min(y2, ly2)), int(max(x1, lx1)):int(min(x2, lx2))] = True
                    if (late.mask & region).sum() > 20:
                        assert not (early.mask & late.mask).any()
                        return
    pytest.fail("no overlapping objects in 300 scenes: overlaps should happen")


def test_vocabulary_and_count_coverage() -> None:
    seen_shapes, seen_colours, counts, areas = set(), set(), set(), []
    for seed in range(300):
        scene = make_scene(seed, size=128)
        counts.add(len(scene.objects))
        for o in scene.objects:
            seen_shapes.add(o.shape)
            seen_colours.add(o.colour)
            areas.append(o.area)
    assert seen_shapes == set(SHAPES) and len(SHAPES) >= 5
    assert seen_colours == set(COLOURS) and len(COLOURS) >= 6
    assert counts == {1, 2, 3, 4, 5, 6}
    assert max(areas) > 6 * min(areas)  # several sizes


def test_restricting_shapes_and_colours() -> None:
    for seed in range(20):
        scene = make_scene(seed, shapes=["star"], colours=["blue", "red"], min_objects=2, max_objects=3)
        assert all(o.shape == "star" and o.colour in ("blue", "red") for o in scene.objects)
        assert 1 <= len(scene.objects) <= 3


def test_colours_are_distinguishable_from_backgrounds() -> None:
    for name, rgb in shapes.BACKGROUNDS.items():
        assert max(rgb) - min(rgb) < 40, f"background {name} is too saturated"
    for name, rgb in COLOURS.items():
        assert max(rgb) - min(rgb) > 120, f"colour {name} is not saturated enough"
    cols = list(COLOURS.values())
    for i, a in enumerate(cols):
        for b in cols[i + 1:]:
            assert np.abs(np.subtract(a, b)).sum() > 100


# -- language ----------------------------------------------------------------------------------------
NOUN = r"(?:(?P<colour>" + "|".join(COLOURS) + r") )?(?P<shape>" + "|".join(SHAPES) + r"|shape)"


def resolve(scene: Scene, text: str) -> int:
    """An independent reading of a referring expression; fails unless it picks exactly one object."""
    size = scene.image.size[0]
    objs = scene.objects
    m = re.fullmatch(r"the (?P<how>largest|smallest|leftmost|rightmost|topmost|bottommost) " + NOUN, text) or \
        re.fullmatch(r"the " + NOUN + r" (?:on|at) the (?P<where>left|right|top|bottom)", text) or \
        re.fullmatch(r"the " + NOUN, text)
    assert m, f"unparseable expression {text!r}"
    g = m.groupdict()

    def fits(o) -> bool:
        return (g["colour"] in (None, o.colour)) and (g["shape"] in ("shape", o.shape))

    cands = [i for i, o in enumerate(objs) if fits(o)]
    how = g.get("how") or (g.get("where") and {"left": "leftmost", "right": "rightmost", "top": "topmost",
                                                "bottom": "bottommost"}[g["where"]])
    if g.get("where"):
        assert len(cands) == 2, f"{text!r}: 'on the left' style needs exactly two candidates"
    if not how:
        assert len(cands) == 1, f"{text!r} matches {len(cands)} objects"
        return cands[0]
    assert len(cands) >= 2, f"{text!r}: a superlative needs at least two candidates"
    key = {"largest": lambda i: -objs[i].area, "smallest": lambda i: objs[i].area,
           "leftmost": lambda i: objs[i].center[0], "rightmost": lambda i: -objs[i].center[0],
           "topmost": lambda i: objs[i].center[1], "bottommost": lambda i: -objs[i].center[1]}[how]
    ranked = sorted(cands, key=key)
    first, second = key(ranked[0]), key(ranked[1])
    if how in ("largest", "smallest"):
        assert abs(second) >= 1.5 * abs(first) or abs(first) >= 1.5 * abs(second), f"{text!r} is not clear-cut"
    else:
        assert second - first >= 0.12 * size - 1e-6, f"{text!r} is not clear-cut"
    return ranked[0]


@pytest.mark.parametrize("seed", range(60))
def test_referring_expressions_are_unique_and_resolve(seed: int) -> None:
    scene = make_scene(seed)
    texts = [t for t, _ in scene.referring]
    assert len(texts) == len(set(texts))
    assert scene.referring, "every scene has at least one way to point at an object"
    for text, idx in scene.referring:
        assert 0 <= idx < len(scene.objects)
        assert resolve(scene, text) == idx, text


def test_the_colour_shape_expression_exists_when_unique() -> None:
    for seed in range(30):
        scene = make_scene(seed)
        refs = dict(scene.referring)
        for i, o in enumerate(scene.objects):
            same = [p for p in scene.objects if (p.colour, p.shape) == (o.colour, o.shape)]
            if len(same) == 1:
                assert refs[f"the {o.colour} {o.shape}"] == i


def test_caption_counts_every_object() -> None:
    words = {w: n for n, w in enumerate(shapes.NUMBER_WORDS)}
    for seed in range(40):
        scene = make_scene(seed)
        things, _, background = scene.caption.partition(" on ")
        assert background.endswith("background")
        total = 0
        for part in re.split(r", | and ", things):
            count, colour, shape = part.split(" ")
            n = 1 if count in ("a", "an") else words[count]
            assert colour in COLOURS
            singular = shape if n == 1 else next(s for s, p in shapes.PLURALS.items() if p == shape)
            assert sum(o.colour == colour and o.shape == singular for o in scene.objects) == n
            total += n
        assert total == len(scene.objects)


def test_caption_example() -> None:
    objs = [shapes.SceneObject("circle", "red", (0, 0, 1, 1), np.ones((1, 1), bool), 1),
            shapes.SceneObject("square", "blue", (0, 0, 1, 1), np.ones((1, 1), bool), 1),
            shapes.SceneObject("square", "blue", (0, 0, 1, 1), np.ones((1, 1), bool), 1)]
    assert shapes.caption_for(objs, "grey background") == "a red circle and two blue squares on a grey background"
    assert shapes.caption_for(objs[:1] + [shapes.SceneObject("star", "orange", (0, 0, 1, 1),
                                                             np.ones((1, 1), bool), 1)], "white background") \
        == "a red circle and an orange star on a white background"


# -- datasets ----------------------------------------------------------------------------------------
def test_coco_export_round_trips(tmp_path) -> None:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out = write_dataset(tmp_path / "ds", n=5, seed=3, size=128)
    coco = COCO(str(out / "annotations.json"))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(SHAPES)
    refs = json.loads((out / "refs.json").read_text())
    assert len(refs["images"]) == 5
    for img in coco.loadImgs(coco.getImgIds()):
        scene = make_scene(img["seed"], size=128)
        assert (out / img["file_name"]).read_bytes() == png_bytes(scene)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert len(anns) == len(scene.objects)
        for ann, obj in zip(anns, scene.objects, strict=True):
            decoded = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(decoded, obj.mask)
            assert np.array_equal(coco.annToMask(ann).astype(bool), obj.mask)
            assert ann["area"] == obj.area == int(decoded.sum())
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == obj.box
            assert ann["iscrowd"] == 0 and ann["shape"] == obj.shape and ann["colour"] == obj.colour
            assert coco.loadCats(ann["category_id"])[0]["name"] == obj.shape
        entry = refs["images"][img["id"]]
        assert entry["caption"] == scene.caption
        assert [(r["text"], r["object"]) for r in entry["referring"]] == scene.referring
        for r in entry["referring"]:
            assert coco.loadAnns(r["annotation_id"])[0]["image_id"] == img["id"]


def test_datasets_with_different_seeds_share_no_scene() -> None:
    a = {shapes.scene_seed(0, i) for i in range(2000)}
    b = {shapes.scene_seed(999_999, i) for i in range(2000)}
    assert len(a) == 2000 and not a & b


def test_cli_writes_files(tmp_path, capsys) -> None:
    rc = shapes.main(["--n", "3", "--seed", "1", "--out", str(tmp_path / "cli"), "--size", "96"])
    assert rc == 0
    files = sorted(p.name for p in (tmp_path / "cli" / "images").iterdir())
    assert files == ["000000.png", "000001.png", "000002.png"]
    coco = json.loads((tmp_path / "cli" / "annotations.json").read_text())
    assert len(coco["images"]) == 3 and coco["images"][0]["width"] == 96
    assert (tmp_path / "cli" / "refs.json").exists()


def test_cli_refuses_bad_arguments(tmp_path) -> None:
    with pytest.raises(SystemExit):
        shapes.main(["--n", "0", "--out", str(tmp_path)])
