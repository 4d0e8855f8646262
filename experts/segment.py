"""The segment expert: masks from box, point or text prompts, on ``segment-anything``.

    <call id="c1" expert="detect" image="img-1" query="red circle"/>
    <call id="c2" expert="segment" image="img-1" boxes="$c1"/>
    <call id="c3" expert="segment" image="img-1" points="[[500, 420]]"/>
    <call id="c4" expert="segment" image="img-1" target="the largest square"/>

Prompts (exactly one kind per call):

- ``boxes``: a boxes artifact (usually ``$c1`` from a detect call); one object per box.
- ``points``: ``[[x, y], ...]`` on the 0-1000 scale with optional ``labels`` (1 = on the object,
  0 = not on it). All points describe ONE object, as in SAM.
- ``target``: text. It is grounded through the ``detect`` expert, called with ``ctx.call("detect", …)``:
  whoever runs this call (``orchestrator.dispatch.execute_call``) runs detect in the same process,
  under the same conversation, so a worker serving ``segment`` loads the small detector too and no
  call waits on another queue. Every detection is segmented, its colour is read from the pixels under
  its mask, and the expression's constraints pick one object: colour, noun (the detector's label or
  shape), and one of largest/smallest (mask area) or left/right/top/bottom (box centre). The words
  are those detect understands (``experts.referring``: "the crimson ball" is the red circle).

Artifacts, in this order: when several objects are segmented, first the union of all masks
(role ``mask (all)``) so that a later ``edit mask="$c2"`` gets every object; then one mask per object
(``mask 1`` ...; PNG, 0/255); with ``multimask`` the other candidates of each object; then an overlay
(kind ``overlay``) and a boxes artifact of the segmented objects (the detect format). The result's
``objects`` carry each mask's COCO RLE, area, box and predicted IoU (``score``).

Weights: the embedded default is a small SAM trained on the shapes world (``models/segmenter``:
``config.json`` + ``segmenter.pt``). Its decoder predicts masks on a 64x64 grid for a 256 px image, so
the upsampled edges are blurred by a few pixels; ``refine_mask`` snaps them to the image's edges with a
guided filter (radius and eps in config.json; off for official checkpoints, whose masks are finer). With ``SWITCHBOARD_SEGMENT_WEIGHTS`` (and
``SWITCHBOARD_SEGMENT_MODEL_TYPE``, default ``vit_b``) an official checkpoint is loaded through
``segment_anything.sam_model_registry`` and runs through exactly the same code. The model lives in
``experts.sam_model``, the runner, refinement and embedding cache in ``experts.sam_runner``, the
grounding of text targets in ``experts.grounding`` and the overlay in ``experts.overlay``.

Image embeddings are cached per image artifact id (LRU, ``SWITCHBOARD_SEGMENT_CACHE_SIZE`` entries,
default 16), so a second prompt on the same image skips the image encoder; detect's boxes for a text
target are memoised per image the same way. ``run_batch`` (workers batch concurrent calls) encodes
the distinct uncached images of a batch together, decodes every call's box and point prompts in one
mask-decoder pass, and finishes the calls' masks on a few threads.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from experts.domain import check_image
from experts.grounding import Grounder, mask_colour
from experts.overlay import draw_masks
from experts.referring import COLOUR_WORDS
from experts.sam_model import CONFIG_FILE, WEIGHTS_FILE, SegmenterUnavailable, load_official_sam
from experts.sam_runner import (
    LRU,
    EmbeddingCache,
    ImageEmbedding,
    PromptRequest,
    SamRunner,
    load_small_runner,
    mask_bbox,
)
from switchboard.errors import SwitchboardError
from switchboard.expert import (
    BoxesRef,
    Example,
    Expert,
    ExpertResult,
    ImageRef,
    NamedValues,
    OutputArtifact,
    RunContext,
    SimulatedScene,
    Simulation,
    compose,
    exactly_one,
    map_on_threads,
    only_with,
)

if TYPE_CHECKING:
    from PIL import Image


# -- arguments and result ----------------------------------------------------------------------------
class SegmentArgs(BaseModel):
    model_config = ConfigDict(json_schema_extra={**exactly_one("boxes", "points", "target"),
                                                 **only_with("labels", "points")})

    image: ImageRef
    boxes: BoxesRef | None = Field(default=None, description="Segment each box another call (detect) found.")
    points: list[list[int]] | None = Field(
        default=None, min_length=1, max_length=16,
        description="[[x, y], ...] on a 0-1000 scale of the image's width and height; together they mark ONE object.")
    labels: list[int] | None = Field(
        default=None, description="One per point: 1 = on the object, 0 = not on it (default all 1).")
    target: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="What to segment, in words ('the red circle', 'the largest square'); grounded with detect.")
    multimask: bool = Field(default=False, description="Also return SAM's alternative masks for each object.")

    @field_validator("points")
    @classmethod
    def _points_in_range(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        for p in v or []:
            if len(p) != 2:
                raise ValueError(f"each point is [x, y], got {p}")
            if not all(0 <= c <= 1000 for c in p):
                raise ValueError(f"point {p} is outside the 0-1000 range")
        return v

    @model_validator(mode="after")
    def _one_prompt(self) -> SegmentArgs:
        given = [n for n in ("boxes", "points", "target") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of boxes, points or target"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.labels is not None:
            if self.points is None:
                raise ValueError("labels go with points")
            if len(self.labels) != len(self.points):
                raise ValueError(f"{len(self.labels)} labels for {len(self.points)} points")
            if any(lab not in (0, 1) for lab in self.labels):
                raise ValueError("labels are 1 (on the object) or 0 (not on it)")
            if 1 not in self.labels:
                raise ValueError("at least one point must be on the object (label 1)")
        if self.target is not None and not self.target.strip():
            raise ValueError("target is empty")
        return self


class MaskCandidate(BaseModel):
    """One alternative mask of an object (``multimask``)."""

    mask: str
    area: int
    score: float
    rle: dict[str, Any]


class SegmentedObject(BaseModel):
    """One segmented object: its mask artifact, COCO RLE, area in pixels, box and predicted IoU."""

    label: str = ""
    mask: str
    rle: dict[str, Any] = Field(description="COCO RLE: {'size': [h, w], 'counts': str}.")
    area: int
    box: list[int] = Field(description="Pixel xyxy of the mask.")
    score: float = Field(description="The model's predicted IoU of the mask.")
    candidates: list[MaskCandidate] = []


class SegmentResult(ExpertResult):
    prompt: Literal["boxes", "points", "target"]
    width: int
    height: int
    objects: list[SegmentedObject] = []
    grounding: str | None = Field(default=None, description="How a text target was resolved.")
    out_of_domain: bool = Field(
        default=False, description="True when the image is outside the embedded (shapes-world) models' world: "
                                   "a text target is then not grounded (no mask) and the summary says why; "
                                   "box and point prompts still give masks, with a caveat.")


# -- the expert -----------------------------------------------------------------------------------------
def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a boolean mask with ``counts`` as str (JSON)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def default_cache_size() -> int:
    """Settings.segment_cache_size when the settings have it, else SWITCHBOARD_SEGMENT_CACHE_SIZE, else 16."""
    from switchboard.settings import get_settings

    value = getattr(get_settings(), "segment_cache_size", None)
    if value is None:
        raw = os.environ.get("SWITCHBOARD_SEGMENT_CACHE_SIZE", "16")
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"SWITCHBOARD_SEGMENT_CACHE_SIZE must be a whole number of images, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"the segment embedding cache size must be >= 0, got {value}")
    return int(value)


class SegmentExpert(Expert):
    name = "segment"
    description = ("Cut objects out as pixel masks (SAM), prompted by the boxes a detect call found, by points "
                   "on the 0-1000 scale, or by a text target such as 'the red circle'; returns masks and an overlay.")
    Args = SegmentArgs
    Result = SegmentResult
    time_limit = 120.0
    #: detect's confidence when grounding a text target (recall matters: the constraints do the picking)
    ground_confidence = 0.05
    examples = [
        Example(request="segment the {object}", args={"image": "{image}", "target": "the {object}"}),
        Example(request="give me a mask of the {object}", args={"image": "{image}", "target": "the {object}"}),
        Example(request="cut out the {colour} shape", args={"image": "{image}", "target": "the {colour} shape"}),
        Example(request="outline the largest {shape}", args={"image": "{image}", "target": "the largest {shape}"}),
        Example(request="segment the {shape} on the left", args={"image": "{image}", "target": "the {shape} on the left"}),
        Example(request="segment the object in the middle of the picture",
                args={"image": "{image}", "points": [[500, 500]]}),
        Example(request="mask whatever is at the top left, not the thing in the centre",
                args={"image": "{image}", "points": [[250, 250], [500, 500]], "labels": [1, 0]}),
        Example(request="outline the {object}", args={"image": "{image}", "target": "the {object}"}),
        Example(request="separate the {object} from the background", args={"image": "{image}", "target": "the {object}"}),
        Example(request="mask the {object}", args={"image": "{image}", "target": "the {object}"}),
        Example(request="segment whatever is in the middle", args={"image": "{image}", "points": [[500, 500]]}),
        Example(request="mask the thing at the top left", args={"image": "{image}", "points": [[250, 250]]}),
        Example(request="trace the outline of the {object}", args={"image": "{image}", "target": "the {object}"}),
        Example(request="segment the {object} and give me a few candidate masks",
                args={"image": "{image}", "target": "the {object}", "multimask": True}),
        Example(request="mask the object at the bottom right", args={"image": "{image}", "points": [[750, 750]]}),
        Example(request="select the {object} precisely", args={"image": "{image}", "target": "the {object}"}),
        Example(request="isolate the {object}", args={"image": "{image}", "target": "the {object}"}),
    ]
    verbs = ["segment", "outline", "mask", "trace", "select", "isolate", "cut out the shape of",
             "delineate", "get a mask of", "extract the shape of", "create a mask for"]
    train_verbs = [
        *compose(["give me", "get", "make", "produce", "create", "return", "compute", "I need", "I want",
                  "generate", "show me", "output", "extract"],
                 ["a mask of", "the mask of", "a segmentation of", "a segmentation mask for",
                  "the silhouette of", "the contour of", "the exact outline of", "a pixel mask of",
                  "a cut-out of", "the exact shape of", "a binary mask of", "the boundary of",
                  "the region of"]),
        "mask out", "segment out", "carve out", "cut around", "contour", "silhouette", "matte",
        "separate out", "follow the edges of", "draw around the edges of", "draw a contour around",
        "mark the exact pixels of", "pick out the pixels of", "cut the outline of", "find the edges of",
        "draw the boundary of", "mask off", "segment out the region of", "select the pixels of",
        "draw the outline of", "follow the outline of", "sketch the outline of", "go around the edge of",
        "run a line around the edge of", "draw a line along the border of", "follow the border of",
        "copy the outline of", "get the outline of", "outline the edges of",
    ]
    # named positions (0-1000 coordinates) for a point prompt: without them the only positions in the
    # core's data are the examples' few, and it learned one point for every "at the ..." request
    named_values = [NamedValues(
        arg="points", args={"image": "{image}"}, rate=0.2,
        values={
            "top left": [[250, 250]], "upper left": [[250, 250]], "top-left corner": [[250, 250]],
            "top right": [[750, 250]], "upper right": [[750, 250]], "top-right corner": [[750, 250]],
            "bottom left": [[250, 750]], "lower left": [[250, 750]], "bottom-left corner": [[250, 750]],
            "bottom right": [[750, 750]], "lower right": [[750, 750]], "bottom-right corner": [[750, 750]],
            "centre": [[500, 500]], "center": [[500, 500]], "middle": [[500, 500]],
            "top": [[500, 250]], "top edge": [[500, 250]], "bottom": [[500, 750]], "bottom edge": [[500, 750]],
            "left edge": [[250, 500]], "right edge": [[750, 500]],
        },
        requests=compose(
            ["segment", "mask", "select", "isolate", "get a mask of", "cut out the shape of", "give me a mask of",
             "extract the shape of", "create a mask for", "separate out"],
            ["whatever is at the {value}", "the object at the {value}", "the shape at the {value}",
             "the one at the {value}", "what's at the {value}", "the object at the {value} of the picture",
             "whatever sits at the {value}", "the shape at the {value} of the image", "the item at the {value}"]))]

    @classmethod
    def simulate(cls, args: dict[str, str], scene: SimulatedScene, rng: random.Random) -> Simulation:
        """A mask of a made-up share of the image (or a few candidates), and an overlay."""
        what = args.get("target") or ("the boxes" if args.get("boxes") else "the selected point")
        pct = rng.randint(2, 30)
        k = rng.randint(2, 3) if args.get("multimask") == "true" else 1
        masks = [("mask", f"mask {i + 1}" if k > 1 else "mask") for i in range(k)]
        if k > 1:
            return Simulation(summary=f"{k} masks of {what}", artifacts=[*masks, ("overlay", "overlay")],
                              answer=f"Here are {k} candidate masks of {what}.", facts=[str(k)])
        summary = rng.choice([f"mask of {what}, {pct}% of the image", f"segmented {what} ({pct}% of the image)"])
        return Simulation(summary=summary, artifacts=[*masks, ("overlay", "overlay")],
                          answer=f"Here is the mask of {what}; it covers {pct}% of the image.", facts=[str(pct)])

    def __init__(self, weights_dir: Path | str | None = None, cache_size: int | None = None) -> None:
        super().__init__()
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.cache = EmbeddingCache(default_cache_size() if cache_size is None else cache_size)
        self._grounding_memo = LRU(max(4, 4 * self.cache.size))  # detect's boxes and their masks per image
        self.runner: SamRunner | None = None
        self.model_name = ""
        self.encoded_images = 0  # images that went through the image encoder (cache misses)
        self.cpu_encoder_batch = 2
        self.embedded = False  # set by setup: the small shapes-world SAM (not an official checkpoint)
        self._domain_memo = LRU(64)  # image artifact id (content-addressed) -> out of the shapes world?

    # -- loading ----------------------------------------------------------------------------------
    def setup(self) -> None:
        from switchboard.settings import get_settings

        settings = get_settings()
        if settings.segment_weights is not None and self.weights_dir is None:
            runner = SamRunner(load_official_sam(Path(settings.segment_weights), settings.segment_model_type or "vit_b"))
            self.model_name = f"{settings.segment_model_type or 'vit_b'} ({Path(settings.segment_weights).name})"
            self.embedded = False
        else:
            directory = self.weights_dir or Path(settings.models_dir) / "segmenter"
            if not (directory / WEIGHTS_FILE).exists() or not (directory / CONFIG_FILE).exists():
                raise SegmenterUnavailable(
                    f"no segmenter weights in {directory} (need {CONFIG_FILE} and {WEIGHTS_FILE}); "
                    "train them with `switchboard train segmenter` or set SWITCHBOARD_SEGMENT_WEIGHTS")
            runner = load_small_runner(directory)
            self.model_name = f"small SAM ({directory.name})"
            self.embedded = True  # trained on the shapes world: photos get a caveat (experts.domain)
        self.runner = runner
        self.cache.clear()
        self._grounding_memo.clear()

    def teardown(self) -> None:
        self.runner = None
        self.cache.clear()
        self._grounding_memo.clear()
        super().teardown()

    # -- embeddings -------------------------------------------------------------------------------
    def embed(self, ctx: RunContext, image_ids: Sequence[str]) -> dict[str, ImageEmbedding]:
        """Embeddings of these images: cached ones as they are, the others in one encoder batch."""
        assert self.runner is not None
        out: dict[str, ImageEmbedding] = {}
        missing: list[str] = []
        for iid in dict.fromkeys(image_ids):
            emb = self.cache.get(iid)
            if emb is None:
                missing.append(iid)
            else:
                out[iid] = emb
        chunk = self.encoder_batch()
        for k in range(0, len(missing), chunk):
            part = missing[k:k + chunk]
            arrays = [np.asarray(ctx.open_image(iid)) for iid in part]
            for iid, emb in zip(part, self.runner.encode(arrays), strict=True):
                self.cache.put(iid, emb)
                out[iid] = emb
            self.encoded_images += len(part)
        return out

    def encoder_batch(self) -> int:
        """Images per image-encoder pass: all of a batch on a GPU; on the CPU, SAM's global attention
        makes bigger passes slower per image (measured on the small SAM, one thread: 27 ms per image at
        1 or 2 images, 54-70 ms at 4-16), so ``cpu_encoder_batch`` at a time."""
        assert self.runner is not None
        on_gpu = next(self.runner.sam.parameters()).device.type == "cuda"
        return 64 if on_gpu else max(1, self.cpu_encoder_batch)

    # -- running ----------------------------------------------------------------------------------
    def run(self, args: SegmentArgs, ctx: RunContext) -> SegmentResult:
        self.ensure_setup()
        image = ctx.open_image(args.image)
        emb = self.embed(ctx, [args.image])[args.image]
        ctx.progress(0.3, "image encoded")
        w, h = image.size
        grounding = None
        if args.boxes is not None:
            boxes, labels = self._read_boxes(ctx, args.boxes, w, h)
            if not boxes:
                return SegmentResult(summary="nothing to segment: the boxes are empty", prompt="boxes",
                                     width=w, height=h)
            masks, scores = self.runner.predict(emb, boxes=np.array(boxes, np.float32), multimask=args.multimask)
        elif args.points is not None:
            pts = np.array([[x * w / 1000, y * h / 1000] for x, y in args.points], np.float32)[None]
            lab = np.array([args.labels or [1] * len(args.points)], np.int64)
            masks, scores = self.runner.predict(emb, points=pts, labels=lab, multimask=args.multimask)
            colour = mask_colour(image, masks[0, int(scores[0].argmax()) if args.multimask else 0], None)
            labels = [f"{colour} object" if colour in COLOUR_WORDS.values() else "object"]
        else:
            grounder = self._grounder()
            picked, labels, grounding = grounder.ground(args.target or "", args.image, image, emb, ctx)
            if picked is None:
                return SegmentResult(summary=grounding, prompt="target", width=w, height=h, grounding=grounding,
                                     out_of_domain=grounder.out_of_domain is not None)
            masks, scores = self.runner.predict(emb, boxes=np.array([picked], np.float32), multimask=args.multimask)
        ctx.progress(0.8, "masks decoded")
        prompt = "boxes" if args.boxes is not None else "points" if args.points is not None else "target"
        return self._result(ctx, args.image, image, masks, scores, labels, prompt, args.multimask, grounding)

    def run_batch(self, items: Sequence[tuple[SegmentArgs, RunContext]]) -> list[SegmentResult]:
        """Many calls at once: the batch's distinct images through the image encoder together (cached
        ones skipped), every box and point prompt through the prompt encoder and mask decoder in one
        pass, then each call's masks upsampled, refined and saved on a few threads (numpy, scipy and
        PNG encoding release the GIL). Text targets ground through detect per call, as in ``run``.
        Same results as ``run`` on each call."""
        self.ensure_setup()
        assert self.runner is not None
        items = [(a if isinstance(a, SegmentArgs) else SegmentArgs.model_validate(a), c) for a, c in items]
        # 1. images: one encoder run over the distinct ones (read from their own call's store)
        embs: dict[tuple[int, str], ImageEmbedding] = {}
        groups: dict[int, tuple[RunContext, list[str]]] = {}
        for args, ctx in items:
            ids = groups.setdefault(id(ctx.store), (ctx, []))[1]
            if args.image not in ids:
                ids.append(args.image)
        for key, (ctx, ids) in groups.items():
            for iid, emb in self.embed(ctx, ids).items():
                embs[(key, iid)] = emb
        images = [ctx.open_image(args.image) for args, ctx in items]
        for _, ctx in items:
            ctx.progress(0.3, "image encoded")
        # 2. prompts: boxes and points of every call decoded together
        requests: dict[int, PromptRequest] = {}
        labels: dict[int, list[str]] = {}
        early: dict[int, SegmentResult] = {}
        for i, ((args, ctx), image) in enumerate(zip(items, images, strict=True)):
            emb, (w, h) = embs[(id(ctx.store), args.image)], image.size
            if args.boxes is not None:
                boxes, labels[i] = self._read_boxes(ctx, args.boxes, w, h)
                if not boxes:
                    early[i] = SegmentResult(summary="nothing to segment: the boxes are empty", prompt="boxes",
                                             width=w, height=h)
                    continue
                requests[i] = PromptRequest(emb, boxes=np.array(boxes, np.float32), multimask=args.multimask)
            elif args.points is not None:
                pts = np.array([[x * w / 1000, y * h / 1000] for x, y in args.points], np.float32)[None]
                lab = np.array([args.labels or [1] * len(args.points)], np.int64)
                requests[i] = PromptRequest(emb, points=pts, labels=lab, multimask=args.multimask)
        order = list(requests)
        decoded = dict(zip(order, self.runner.decode_many([requests[i] for i in order]), strict=True))

        # 3. per call: masks at full size, refined, saved (targets: grounded and decoded here, like run)
        def finish(i: int) -> SegmentResult:
            args, ctx = items[i]
            if i in early:
                return early[i]
            if i not in requests:
                return self.run(args, ctx)
            masks, scores = self.runner.masks(requests[i].emb, *decoded[i])
            if args.points is not None:
                colour = mask_colour(images[i], masks[0, int(scores[0].argmax()) if args.multimask else 0], None)
                labels[i] = [f"{colour} object" if colour in COLOUR_WORDS.values() else "object"]
            ctx.progress(0.8, "masks decoded")
            prompt = "boxes" if args.boxes is not None else "points"
            return self._result(ctx, args.image, images[i], masks, scores, labels[i], prompt, args.multimask, None)

        return map_on_threads(finish, range(len(items)), name="segment-batch")

    # -- helpers ------------------------------------------------------------------------------------
    def _out_of_domain(self, image_id: str, image: Image.Image) -> bool:
        """The shapes-world check of ``image`` (``experts.domain``), once per image."""
        verdict = self._domain_memo.get(image_id)
        if verdict is None:
            verdict = check_image(image).out_of_domain
            self._domain_memo.put(image_id, verdict)
        return bool(verdict)

    def _grounder(self) -> Grounder:
        """Text targets' grounding with this segmenter and memo (``experts.grounding``)."""
        assert self.runner is not None
        return Grounder(self.runner, self._grounding_memo, self.ground_confidence)

    @staticmethod
    def _read_boxes(ctx: RunContext, boxes_id: str, w: int, h: int) -> tuple[list[list[float]], list[str]]:
        data = ctx.read_json(boxes_id)
        if not isinstance(data, dict) or not isinstance(data.get("boxes"), list):
            raise SwitchboardError(f"{boxes_id} is not a boxes artifact (expected {{'boxes': [...]}})")
        # boxes are pixels of the image they were found on; rescale if that image had another size
        sx = w / float(data.get("width") or w)
        sy = h / float(data.get("height") or h)
        boxes, labels = [], []
        for b in data["boxes"]:
            x1, y1, x2, y2 = (float(v) for v in b["xyxy"])
            x1, x2 = sorted((max(0.0, min(w, x1 * sx)), max(0.0, min(w, x2 * sx))))
            y1, y2 = sorted((max(0.0, min(h, y1 * sy)), max(0.0, min(h, y2 * sy))))
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(str(b.get("label", "")))
        return boxes, labels

    def _result(self, ctx: RunContext, image_id: str, image: Image.Image, masks: np.ndarray, scores: np.ndarray,
                labels: Sequence[str], prompt: str, multimask: bool, grounding: str | None) -> SegmentResult:
        """Save masks (union first when several), overlay and boxes; build the result."""
        w, h = image.size
        best = scores.argmax(1) if multimask else np.zeros(len(masks), int)
        primary = [masks[i, best[i]] for i in range(len(masks))]
        artifacts: list[OutputArtifact] = []
        if len(primary) > 1:
            union = np.logical_or.reduce(primary)
            artifacts.append(self._save_mask(ctx, union, "mask (all)"))
        objects = []
        for i, m in enumerate(primary):
            label = labels[i] if i < len(labels) else ""
            art = self._save_mask(ctx, m, f"mask {i + 1}" + (f" ({label})" if label else ""))
            artifacts.append(art)
            objects.append(SegmentedObject(label=label, mask=art.id, rle=encode_rle(m), area=int(m.sum()),
                                           box=mask_bbox(m), score=round(float(scores[i, best[i]]), 4)))
        if multimask:
            for i, obj in enumerate(objects):
                order = np.argsort(-scores[i])
                for rank, j in enumerate(order):
                    if j == best[i]:
                        continue
                    m = masks[i, j]
                    art = self._save_mask(ctx, m, f"mask {i + 1} candidate {rank + 1}")
                    artifacts.append(art)
                    obj.candidates.append(MaskCandidate(mask=art.id, area=int(m.sum()),
                                                        score=round(float(scores[i, j]), 4), rle=encode_rle(m)))
        artifacts.append(ctx.save_image(draw_masks(image, primary), kind="overlay", role="overlay"))
        artifacts.append(ctx.save_json({"image": image_id, "width": w, "height": h, "boxes": [
            {"xyxy": o.box, "label": o.label, "score": o.score} for o in objects]}, kind="boxes", role="boxes"))
        parts = [f"{o.label or 'object'} {o.area} px" for o in objects]
        summary = f"{len(objects)} mask{'s' if len(objects) != 1 else ''}: " + ", ".join(parts)
        if grounding:
            summary += f" [{grounding}]"
        ood = self.embedded and self._out_of_domain(image_id, image)
        if ood:
            # SAM-style prompting is legitimate on any image, so the masks stay; but say how far to trust them
            summary += (" [note: this looks like a photograph and the embedded segmenter was trained on the shapes "
                        "world only, so these masks may be rough; set SWITCHBOARD_SEGMENT_WEIGHTS to a SAM "
                        "checkpoint for photographs]")
        ctx.progress(1.0, "done")
        return SegmentResult(summary=summary, artifacts=artifacts, prompt=prompt, width=w, height=h,
                             objects=objects, grounding=grounding, out_of_domain=ood)

    @staticmethod
    def _save_mask(ctx: RunContext, mask: np.ndarray, role: str) -> OutputArtifact:
        from PIL import Image as PILImage

        return ctx.save_image(PILImage.fromarray(mask.astype(np.uint8) * 255, mode="L"), kind="mask", role=role)
