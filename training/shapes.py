"""The shapes world: deterministic synthetic scenes with exact ground truth.

A scene is a low-saturation background (solid, gradient, noisy or blotchy) with 1–6 saturated
shapes drawn on it. Every object comes with its shape, colour, box and mask *after occlusion*
(later objects cover earlier ones), and every scene with a caption and referring expressions that
pick out exactly one object ("the red circle", "the largest square", "the triangle on the left").

It trains every embedded model and gives tests real answers to check against. The same seed gives
the same pixels, so ``make_scene(7)`` is a stable fixture.

    switchboard shapes --n 100 --seed 0 --out data/shapes
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from experts.domain import PALETTE, SHAPES_WORLD_CLASSES

# The classes and the palette are defined once, where the runtime can read them (the embedded experts
# know the shapes world; the runtime never imports training): saturated and far apart in RGB (and
# hue), so a pixel's nearest palette entry is its colour.
SHAPES: tuple[str, ...] = SHAPES_WORLD_CLASSES
COLOURS: dict[str, tuple[int, int, int]] = PALETTE
# Backgrounds are (nearly) grey so that no object colour can be mistaken for them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 236),
    "light grey": (200, 201, 203),
    "grey": (150, 150, 152),
    "dark grey": (85, 86, 88),
    "black": (28, 28, 30),
    "beige": (218, 208, 190),
    "slate": (112, 120, 130),
}
BACKGROUND_STYLES = ("plain", "gradient", "noisy", "textured")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "hexagon": "hexagons",
           "star": "stars"}
NUMBER_WORDS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Object radius as a fraction of the image side: small, medium and large objects.
MIN_RADIUS, MAX_RADIUS = 0.05, 0.16
# Placement is retried until every object keeps at least this much of itself visible.
MIN_VISIBLE_FRACTION = 0.45
MIN_VISIBLE_PIXELS = 40
SUPERSAMPLE = 4


@dataclass
class SceneObject:
    """One object of a scene. ``box`` is pixel xyxy of the visible part; ``mask`` is after occlusion."""

    shape: str
    colour: str
    box: tuple[float, float, float, float]
    mask: np.ndarray = field(repr=False)
    area: int

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass
class Scene:
    """An image, its objects in drawing order, a caption, and (expression, object index) pairs."""

    image: Image.Image
    objects: list[SceneObject]
    caption: str
    referring: list[tuple[str, int]]
    seed: int
    background: str = ""


# -- geometry ---------------------------------------------------------------------------------------
def _regular_polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _outline(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape (None for a circle). ``rot`` is a small tilt in radians."""
    up = -math.pi / 2
    if shape == "square":
        return _regular_polygon(cx, cy, r * 1.2, 4, math.pi / 4 + rot)  # side = 1.7 r
    if shape == "triangle":
        return _regular_polygon(cx, cy + r * 0.2, r * 1.25, 3, up + rot)
    if shape == "hexagon":
        return _regular_polygon(cx, cy, r * 1.05, 6, rot)
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r * 1.3 if k % 2 == 0 else r * 0.55
            a = up + rot + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def _coverage(shape: str, cx: float, cy: float, r: float, rot: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (H×W float32), drawn supersampled with PIL."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    poly = _outline(shape, cx * s, cy * s, r * s, rot)
    if poly is None:
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        draw.polygon(poly, fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_object(shape: str, colour: str, size: int = 64,
                  background: tuple[int, int, int] = BACKGROUNDS["grey"]) -> Image.Image:
    """One centred object on a plain background (icons, legends, quick looks)."""
    a = _coverage(shape, size / 2, size / 2, size * 0.33, 0.0, size)[..., None]
    bg = np.array(background, np.float32)
    img = bg * (1 - a) + np.array(COLOURS[colour], np.float32) * a
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


# -- backgrounds ------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    name = str(rng.choice(list(BACKGROUNDS)))
    style = str(rng.choice(BACKGROUND_STYLES))
    base = np.array(BACKGROUNDS[name], np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if style == "gradient":
        # towards a lighter or darker grey, in a random direction
        other = np.clip(base + rng.uniform(-60, 60), 0, 255)
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = (math.cos(ang) * (xx - 0.5) + math.sin(ang) * (yy - 0.5)) + 0.5
        t = np.clip(t, 0, 1)[..., None]
        img = base * (1 - t) + other * t
    elif style == "textured":
        cells = int(rng.integers(4, 12))
        grid = rng.normal(0, 14, size=(cells, cells)).astype(np.float32)
        blot = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
        img = img + blot[..., None]
    phrase = {"plain": f"{name} background", "gradient": f"{name} gradient background",
              "noisy": f"noisy {name} background", "textured": f"textured {name} background"}[style]
    return img, phrase


# -- scenes -----------------------------------------------------------------------------------------
def make_scene(seed: int, size: int = 256, min_objects: int = 1, max_objects: int = 6,
               shapes: tuple[str, ...] | list[str] | None = None,
               colours: tuple[str, ...] | list[str] | None = None) -> Scene:
    """A deterministic scene: the same arguments always give the same pixels and ground truth."""
    shapes = tuple(shapes or SHAPES)
    colours = tuple(colours or COLOURS)
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; shapes: {', '.join(SHAPES)}")
    for c in colours:
        if c not in COLOURS:
            raise ValueError(f"unknown colour {c!r}; colours: {', '.join(COLOURS)}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")

    rng = np.random.Generator(np.random.PCG64(seed))
    img, bg_phrase = _background(rng, size)
    noisy = "noisy" in bg_phrase
    want = int(rng.integers(min_objects, max_objects + 1))

    coverages: list[np.ndarray] = []   # anti-aliased coverage of each placed object
    full_areas: list[int] = []
    masks: list[np.ndarray] = []       # visible masks, updated as objects are added
    kinds: list[tuple[str, str, tuple[float, float, float]]] = []
    for _ in range(want):
        shape, colour = str(rng.choice(shapes)), str(rng.choice(colours))
        for _attempt in range(30):
            r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS)) * size
            margin = r * 1.1
            cx = float(rng.uniform(margin, size - margin))
            cy = float(rng.uniform(margin, size - margin))
            rot = float(rng.uniform(-0.35, 0.35))
            cov = _coverage(shape, cx, cy, r, rot, size)
            mask = cov >= 0.5
            if mask.sum() < MIN_VISIBLE_PIXELS:
                continue
            # every earlier object must stay recognisable once this one is drawn over it
            if all(((m & ~mask).sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * a))
                   for m, a in zip(masks, full_areas, strict=True)):
                masks = [m & ~mask for m in masks]
                masks.append(mask)
                coverages.append(cov)
                full_areas.append(int(mask.sum()))
                kinds.append((shape, colour, (cx, cy, r)))
                break
        if len(kinds) >= max_objects:
            break

    for cov, (_, colour, _) in zip(coverages, kinds, strict=True):
        jitter = rng.integers(-12, 13, size=3)  # a little variation around the palette colour
        col = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255).astype(np.float32)
        a = cov[..., None]
        img = img * (1 - a) + col * a
    if noisy:
        img = img + rng.normal(0, float(rng.uniform(4, 10)), size=img.shape).astype(np.float32)
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    objects = []
    for mask, (shape, colour, _) in zip(masks, kinds, strict=True):
        ys, xs = np.nonzero(mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        objects.append(SceneObject(shape=shape, colour=colour, box=box, mask=mask, area=int(mask.sum())))

    return Scene(image=Image.fromarray(pixels), objects=objects,
                 caption=caption_for(objects, bg_phrase), referring=referring_expressions(objects, size),
                 seed=seed, background=bg_phrase)


# -- language ---------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(objects: list[SceneObject], background: str) -> str:
    """'a red circle and two blue squares on a grey background' (groups in order of appearance)."""
    groups = Counter((o.colour, o.shape) for o in objects)
    parts = []
    for (colour, shape), n in groups.items():
        if n == 1:
            parts.append(f"{_article(colour)} {colour} {shape}")
        else:
            parts.append(f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {colour} {PLURALS[shape]}")
    if not parts:
        things = "nothing"
    elif len(parts) == 1:
        things = parts[0]
    else:
        things = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{things} on {_article(background)} {background}"


def _extreme(objects: list[SceneObject], idx: list[int], key, *, ratio: float = 0.0,
             gap: float = 0.0) -> tuple[int | None, int | None]:
    """Indices of the clear minimum and maximum of ``key`` among ``idx`` (None when not clear-cut).

    A winner must beat the runner-up by a factor ``ratio`` (sizes) or a margin ``gap`` (positions),
    so a person looking at the picture would agree.
    """
    if len(idx) < 2:
        return None, None
    ordered = sorted(idx, key=lambda i: key(objects[i]))
    lo, lo2, hi2, hi = ordered[0], ordered[1], ordered[-2], ordered[-1]
    k = lambda i: key(objects[i])  # noqa: E731
    clear_lo = (k(lo2) >= k(lo) * ratio) if ratio else (k(lo2) - k(lo) >= gap)
    clear_hi = (k(hi) >= k(hi2) * ratio) if ratio else (k(hi) - k(hi2) >= gap)
    return (lo if clear_lo else None), (hi if clear_hi else None)


def referring_expressions(objects: list[SceneObject], size: int) -> list[tuple[str, int]]:
    """Expressions that each pick out exactly one object of the scene, with that object's index."""
    out: list[tuple[str, int]] = []
    n = len(objects)
    by_shape: dict[str, list[int]] = {}
    by_colour: dict[str, list[int]] = {}
    by_both: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(objects):
        by_shape.setdefault(o.shape, []).append(i)
        by_colour.setdefault(o.colour, []).append(i)
        by_both.setdefault((o.colour, o.shape), []).append(i)

    for (colour, shape), idx in by_both.items():
        if len(idx) == 1:
            out.append((f"the {colour} {shape}", idx[0]))
    for shape, idx in by_shape.items():
        if len(idx) == 1:
            out.append((f"the {shape}", idx[0]))
    for colour, idx in by_colour.items():
        if len(idx) == 1:
            out.append((f"the {colour} shape", idx[0]))

    area = lambda o: o.area  # noqa: E731
    cx = lambda o: o.center[0]  # noqa: E731
    cy = lambda o: o.center[1]  # noqa: E731
    gap = 0.12 * size
    groups: list[tuple[str, list[int]]] = [(shape, idx) for shape, idx in by_shape.items()]
    groups += [(f"{c} {s}", idx) for (c, s), idx in by_both.items() if len(idx) < len(by_shape[s])]
    if n >= 2:
        groups.append(("shape", list(range(n))))
    for noun, idx in groups:
        if len(idx) < 2:
            continue
        small, large = _extreme(objects, idx, area, ratio=1.5)
        left, right = _extreme(objects, idx, cx, gap=gap)
        top, bottom = _extreme(objects, idx, cy, gap=gap)
        two = len(idx) == 2
        for word, i in (("smallest", small), ("largest", large)):
            if i is not None:
                out.append((f"the {word} {noun}", i))
        for where, i in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
            if i is None:
                continue
            prep = "on the" if where in ("left", "right") else "at the"
            # "the square on the left" reads naturally for two; for more, say "leftmost"/"topmost"
            text = f"the {noun} {prep} {where}" if two else f"the {where}most {noun}"
            out.append((text, i))
    # one expression per text: drop any accidental duplicate wording
    seen: dict[str, int] = {}
    for text, i in out:
        seen.setdefault(text, i)
    return list(seen.items())


# -- datasets ---------------------------------------------------------------------------------------
def scene_seed(dataset_seed: int, index: int) -> int:
    """The seed of scene ``index`` of the dataset with seed ``dataset_seed`` (distinct datasets never share scenes)."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1, np.uint64)[0] >> 1)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a boolean mask, with ``counts`` as str so it is JSON."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def write_dataset(out: Path, n: int, seed: int, size: int = 256) -> Path:
    """Write ``n`` scenes: images/000000.png…, annotations.json (COCO) and refs.json. Returns ``out``.

    COCO ``file_name`` is relative to ``out``; each annotation also carries ``shape`` and ``colour``.
    """
    from tqdm import tqdm

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    for i in tqdm(range(n), desc="shapes", unit="img"):
        s = scene_seed(seed, i)
        scene = make_scene(s, size=size)
        name = f"images/{i:06d}.png"
        scene.image.save(out / name)
        images.append({"id": i, "file_name": name, "width": size, "height": size, "seed": s})
        first_ann = len(annotations)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": cat_id[obj.shape],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": obj.area, "iscrowd": 0,
                "segmentation": encode_mask(obj.mask), "shape": obj.shape, "colour": obj.colour,
            })
        refs.append({
            "image_id": i, "file_name": name, "seed": s, "caption": scene.caption,
            "referring": [{"text": t, "object": j, "annotation_id": first_ann + j + 1} for t, j in scene.referring],
        })
    coco = {
        "info": {"description": "Switchboard shapes world", "dataset_seed": seed, "size": size},
        "images": images, "annotations": annotations, "categories": categories,
        "colours": {k: list(v) for k, v in COLOURS.items()},
    }
    (out / "annotations.json").write_text(json.dumps(coco))
    (out / "refs.json").write_text(json.dumps({"dataset_seed": seed, "images": refs}, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    """``switchboard shapes --n N --seed S --out DIR [--size 256]``."""
    p = argparse.ArgumentParser(prog="switchboard shapes", description="Write a shapes-world dataset "
                                "(images/, COCO annotations.json with RLE masks, refs.json with captions).")
    p.add_argument("--n", type=int, default=100, help="number of scenes (default 100)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be at least 1")
    if a.size < 32:
        p.error("--size must be at least 32")
    out = write_dataset(a.out, a.n, a.seed, a.size)
    print(f"wrote {a.n} scenes to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
