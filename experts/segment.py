"""The segment expert: masks from box, point or text prompts, on ``segment-anything``.

    <call id="c1" expert="detect" image="img-1" query="red circle"/>
    <call id="c2" expert="segment" image="img-1" boxes="$c1"/>
    <call id="c3" expert="segment" image="img-1" points="[[500, 420]]"/>
    <call id="c4" expert="segment" image="img-1" target="the largest square"/>

Prompts (exactly one kind per call):

- ``boxes``: a boxes artifact (usually ``$c1`` from a detect call); one object per box.
- ``points``: ``[[x, y], ...]`` on the 0-1000 scale with optional ``labels`` (1 = on the object,
  0 = not on it). All points describe ONE object, as in SAM.
- ``target``: text. It is grounded through the ``detect`` expert, called in-process from here
  (``get_registry().instance("detect")``): a worker serving ``segment`` loads the small detector too,
  so queued and in-process dispatch behave identically and no call waits on another queue. Every
  detection is segmented, its colour is read from the pixels under its mask, and the expression's
  constraints pick one object: colour, noun (the detector's label or shape), and one of
  largest/smallest (mask area) or left/right/top/bottom (box centre).

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
``segment_anything.sam_model_registry`` and runs through exactly the same code.

Image embeddings are cached per image artifact id (LRU, ``SWITCHBOARD_SEGMENT_CACHE_SIZE`` entries,
default 16), so a second prompt on the same image skips the image encoder; detect's boxes for a text
target are memoised per image the same way. ``run_batch`` (workers batch concurrent calls) encodes
the distinct uncached images of a batch together, decodes every call's box and point prompts in one
mask-decoder pass, and finishes the calls' masks on a few threads.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from switchboard.errors import SwitchboardError
from switchboard.expert import (
    BoxesRef,
    Example,
    Expert,
    ExpertResult,
    ImageRef,
    OutputArtifact,
    RunContext,
    map_on_threads,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from segment_anything.modeling import Sam


class SegmenterUnavailable(SwitchboardError):
    """The segmenter's weights are missing or cannot be loaded."""

    code = "segmenter_unavailable"
    status = 503


class TargetUnresolvable(SwitchboardError):
    """A text target that cannot be grounded (no detect expert, or nothing to segment it with)."""

    code = "target_unresolvable"


# -- the model ---------------------------------------------------------------------------------------
@dataclass
class SmallSamConfig:
    """Dimensions of a small SAM built from ``segment_anything.modeling`` (stored as config.json)."""

    img_size: int = 256
    patch_size: int = 16
    encoder_embed_dim: int = 128
    encoder_depth: int = 4
    encoder_num_heads: int = 4
    encoder_global_attn_indexes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    window_size: int = 0
    use_rel_pos: bool = True
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 128
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 512
    decoder_num_heads: int = 4
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 128
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # Inference: edge-aware refinement of the upsampled masks (see ``refine_mask``); radius in cells
    # of the decoder's low-resolution mask (0 = off), eps in (0-1 colour)^2.
    refine_cells: float = 1.5
    refine_eps: float = 0.01

    @classmethod
    def from_json(cls, path: Path) -> SmallSamConfig:
        data = json.loads(Path(path).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_small_sam(cfg: SmallSamConfig) -> Sam:
    """A ``Sam`` with the official module structure (so the state-dict keys match the official layout)."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    emb = cfg.img_size // cfg.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.encoder_embed_dim,
            depth=cfg.encoder_depth, num_heads=cfg.encoder_num_heads, mlp_ratio=cfg.mlp_ratio,
            out_chans=cfg.prompt_embed_dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=cfg.use_rel_pos, window_size=cfg.window_size,
            global_attn_indexes=tuple(cfg.encoder_global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim, image_embedding_size=(emb, emb),
            input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_num_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
    )


WEIGHTS_FILE = "segmenter.pt"
CONFIG_FILE = "config.json"


def load_small_sam(directory: Path) -> Sam:
    """The embedded segmenter: ``config.json`` + ``segmenter.pt`` (a half-precision state dict)."""
    import torch

    directory = Path(directory)
    cfg = SmallSamConfig.from_json(directory / CONFIG_FILE)
    sam = build_small_sam(cfg)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    sam.load_state_dict({k: v.float() for k, v in state.items()})
    return sam.eval()


def load_small_runner(directory: Path) -> SamRunner:
    """The embedded segmenter with its inference settings (mask refinement) from ``config.json``."""
    cfg = SmallSamConfig.from_json(Path(directory) / CONFIG_FILE)
    return SamRunner(load_small_sam(directory), refine_cells=cfg.refine_cells, refine_eps=cfg.refine_eps)


@dataclass
class ImageEmbedding:
    """An image's encoder output plus the sizes needed to map prompts and masks."""

    features: torch.Tensor          # 1 x C x h x w
    input_size: tuple[int, int]     # (H, W) after resizing the longest side to the encoder's size
    original_size: tuple[int, int]  # (H, W) of the image
    guide: np.ndarray | None = None  # H x W x 3 float32 in [0, 1] when masks are refined


def _box_filter(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window of each channel of an H x W x C array (separable, reflect at edges)."""
    from scipy.ndimage import uniform_filter1d

    return uniform_filter1d(uniform_filter1d(x, 2 * r + 1, axis=0, mode="reflect"), 2 * r + 1, axis=1, mode="reflect")


def guided_filter(guide: np.ndarray, p: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a colour guide (H x W x 3) applied to ``p`` (H x W)."""
    r_, g_, b_ = guide[..., 0], guide[..., 1], guide[..., 2]
    stats = _box_filter(np.stack([r_, g_, b_, p, r_ * p, g_ * p, b_ * p, r_ * r_, r_ * g_, r_ * b_,
                                  g_ * g_, g_ * b_, b_ * b_], axis=-1), r)
    mi, mp = stats[..., 0:3], stats[..., 3]
    cov = stats[..., 4:7] - mi * mp[..., None]
    # the (symmetric) colour covariance of each window, plus eps, inverted in closed form
    rr = stats[..., 7] - mi[..., 0] * mi[..., 0] + eps
    rg = stats[..., 8] - mi[..., 0] * mi[..., 1]
    rb = stats[..., 9] - mi[..., 0] * mi[..., 2]
    gg = stats[..., 10] - mi[..., 1] * mi[..., 1] + eps
    gb = stats[..., 11] - mi[..., 1] * mi[..., 2]
    bb = stats[..., 12] - mi[..., 2] * mi[..., 2] + eps
    i_rr, i_rg, i_rb = gg * bb - gb * gb, gb * rb - rg * bb, rg * gb - gg * rb
    i_gg, i_gb, i_bb = rr * bb - rb * rb, rb * rg - rr * gb, rr * gg - rg * rg
    det = rr * i_rr + rg * i_rg + rb * i_rb
    a = np.stack([i_rr * cov[..., 0] + i_rg * cov[..., 1] + i_rb * cov[..., 2],
                  i_rg * cov[..., 0] + i_gg * cov[..., 1] + i_gb * cov[..., 2],
                  i_rb * cov[..., 0] + i_gb * cov[..., 1] + i_bb * cov[..., 2]], axis=-1) / det[..., None]
    b = mp - (a * mi).sum(-1)
    ab = _box_filter(np.concatenate([a, b[..., None]], axis=-1), r)
    return (ab[..., :3] * guide).sum(-1) + ab[..., 3]


def refine_mask(logits: np.ndarray, guide: np.ndarray, r: int, eps: float) -> np.ndarray:
    """Snap a mask's boundary to the image's edges: guided-filter the mask probability with the image
    as guide and threshold at 0.5. The decoder's masks are upsampled from a grid ``r``-ish pixels
    coarse, so their edges are blurred by about that much; the filter restores edges the colours show.
    Only the mask's neighbourhood is filtered (cost scales with the object, not the image)."""
    mask = logits > 0
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return mask
    h, w = mask.shape
    m = 2 * r + 2
    y0, y1, x0, x1 = max(0, ys.min() - m), min(h, ys.max() + 1 + m), max(0, xs.min() - m), min(w, xs.max() + 1 + m)
    prob = 1.0 / (1.0 + np.exp(-np.clip(logits[y0:y1, x0:x1], -30, 30)))
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = guided_filter(guide[y0:y1, x0:x1], prob.astype(np.float32), r, eps) > 0.5
    return out


class SamRunner:
    """Encode images once, then decode any number of prompts against the embedding.

    The same code serves the embedded small SAM and official checkpoints: prompts and images go
    through ``ResizeLongestSide(image_encoder.img_size)`` like ``SamPredictor`` does.
    """

    def __init__(self, sam: Sam, *, refine_cells: float = 0.0, refine_eps: float = 0.01) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.sam = sam.eval()
        self.img_size = int(sam.image_encoder.img_size)
        self.transform = ResizeLongestSide(self.img_size)
        self.refine_cells, self.refine_eps = float(refine_cells), float(refine_eps)

    def encode(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        """Run the image encoder over HxWx3 uint8 images in one batch."""
        import torch

        batch, sizes = [], []
        for img in images:
            resized = self.transform.apply_image(np.ascontiguousarray(img))
            t = torch.as_tensor(resized).permute(2, 0, 1).float()
            batch.append(self.sam.preprocess(t))  # normalise + pad to img_size x img_size
            sizes.append((tuple(resized.shape[:2]), tuple(img.shape[:2])))
        with torch.inference_mode():
            feats = self.sam.image_encoder(torch.stack(batch))
        guides = [np.asarray(img, np.float32) / 255.0 if self.refine_cells > 0 else None for img in images]
        return [ImageEmbedding(feats[i:i + 1], inp, orig, guides[i]) for i, (inp, orig) in enumerate(sizes)]

    def predict(self, emb: ImageEmbedding, *, boxes: np.ndarray | None = None,
                points: np.ndarray | None = None, labels: np.ndarray | None = None,
                multimask: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N x C x H x W bool, original size) and predicted IoUs (N x C) for N prompts.

        ``boxes``: N x 4 pixel xyxy; ``points``: N x K x 2 pixel xy with ``labels`` N x K (1 in, 0 out).
        """
        import torch

        sam = self.sam
        box_t, pts = self._prompts(emb.original_size, boxes, points, labels)
        with torch.inference_mode():
            sparse, dense = sam.prompt_encoder(points=pts, boxes=box_t, masks=None)
            low, iou = sam.mask_decoder(image_embeddings=emb.features, image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=multimask)
        return self.masks(emb, low, iou)

    def _prompts(self, original_size: tuple[int, int], boxes: np.ndarray | None, points: np.ndarray | None,
                 labels: np.ndarray | None) -> tuple[Any, Any]:
        """Pixel prompts -> the encoder's input frame, as tensors (boxes, (coords, labels))."""
        import torch

        box_t = pts = None
        if boxes is not None:
            box_t = torch.as_tensor(self.transform.apply_boxes(np.asarray(boxes, np.float32), original_size),
                                    dtype=torch.float32)
        if points is not None:
            coords = self.transform.apply_coords(np.asarray(points, np.float32), original_size)
            lab = np.ones(coords.shape[:2], np.int64) if labels is None else np.asarray(labels, np.int64)
            pts = (torch.as_tensor(coords, dtype=torch.float32), torch.as_tensor(lab, dtype=torch.int64))
        return box_t, pts

    def decode_many(self, requests: Sequence[PromptRequest]) -> list[tuple[Any, Any]]:
        """The decoder's low-resolution masks and IoUs for many calls' prompts, in as few passes as possible.

        Prompts of one shape (boxes; or points with the same count per object) and multimask setting
        go through the prompt encoder and the mask decoder together, whatever image they are on: each
        row is paired with its own image's embedding. ``masks(emb, low, iou)`` then upsamples each.
        """
        import torch

        sam = self.sam
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(requests):
            key = ("boxes", r.multimask) if r.boxes is not None else ("points", np.shape(r.points)[1], r.multimask)
            groups.setdefault(key, []).append(i)
        out: list[tuple[Any, Any]] = [(None, None)] * len(requests)
        for key, idxs in groups.items():
            feats: list[Any] = []
            rows: list[int] = []  # per prompt row: index into feats
            counts: list[int] = []
            boxes, coords, labels = [], [], []
            for i in idxs:
                r = requests[i]
                box_t, pts = self._prompts(r.emb.original_size, r.boxes, r.points, r.labels)
                n = int(box_t.shape[0]) if box_t is not None else int(pts[0].shape[0])
                if box_t is not None:
                    boxes.append(box_t)
                else:
                    coords.append(pts[0])
                    labels.append(pts[1])
                rows += [len(feats)] * n
                feats.append(r.emb.features)
                counts.append(n)
            with torch.inference_mode():
                sparse, dense = sam.prompt_encoder(
                    points=(torch.cat(coords), torch.cat(labels)) if coords else None,
                    boxes=torch.cat(boxes) if boxes else None, masks=None)
                low, iou = _decode_rows(sam, torch.cat(feats)[torch.as_tensor(rows)], sparse, dense, key[-1])
            for i, lo, io in zip(idxs, low.split(counts), iou.split(counts), strict=True):
                out[i] = (lo, io)
        return out

    def masks(self, emb: ImageEmbedding, low: Any, iou: Any) -> tuple[np.ndarray, np.ndarray]:
        """The decoder's low-resolution masks at the image's size (refined if on) and their IoUs, as numpy."""
        import torch

        sam = self.sam
        with torch.inference_mode():
            logits = sam.postprocess_masks(low, emb.input_size, emb.original_size)
        if self.refine_cells > 0 and emb.guide is not None:
            # pixels of the original image per cell of the decoder's low-resolution mask
            scale = max(emb.original_size) / low.shape[-1] * self.img_size / max(emb.input_size)
            r = max(1, round(self.refine_cells * scale))
            lg = logits.numpy()
            masks = np.stack([np.stack([refine_mask(lg[n, c], emb.guide, r, self.refine_eps)
                                        for c in range(lg.shape[1])]) for n in range(lg.shape[0])])
            return masks, iou.float().numpy()
        return (logits > sam.mask_threshold).numpy(), iou.float().numpy()


@dataclass
class PromptRequest:
    """One call's prompts for ``SamRunner.decode_many``: pixel boxes (N x 4) or points (N x K x 2)."""

    emb: ImageEmbedding
    boxes: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    multimask: bool = False


def _decode_rows(sam: Sam, image_embeddings: Any, sparse: Any, dense: Any, multimask: bool) -> tuple[Any, Any]:
    """``MaskDecoder.forward`` for rows that each have their own image embedding (R x C x h x w).

    SAM's ``predict_masks`` repeats one image's embedding for every prompt; this is the same
    computation with the embedding given per row, so prompts on different images share one pass.
    """
    import torch

    dec = sam.mask_decoder
    n_rows = image_embeddings.shape[0]
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(n_rows, -1, -1), sparse), dim=1)
    src = image_embeddings + dense
    pos_src = sam.prompt_encoder.get_dense_pe().expand(n_rows, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:(1 + dec.num_mask_tokens), :]
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([dec.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                            for i in range(dec.num_mask_tokens)], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = dec.iou_prediction_head(iou_token_out)
    keep = slice(1, None) if multimask else slice(0, 1)
    return masks[:, keep, :, :], iou_pred[:, keep]


class LRU:
    """A bounded, thread-safe least-recently-used map."""

    def __init__(self, size: int) -> None:
        self.size = max(0, int(size))
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any) -> Any | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Any, value: Any) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class EmbeddingCache(LRU):
    """Image embeddings keyed by image artifact id (ids are content hashes, so a key never goes stale)."""


# -- referring expressions -----------------------------------------------------------------------------
COLOUR_WORDS: dict[str, str] = {
    "red": "red", "orange": "orange", "yellow": "yellow", "green": "green", "blue": "blue",
    "purple": "purple", "violet": "purple", "white": "white", "grey": "grey", "gray": "grey", "black": "black",
}
# word -> (what is compared, which end wins)
SUPERLATIVES: dict[str, tuple[str, str]] = {
    "largest": ("area", "max"), "biggest": ("area", "max"), "smallest": ("area", "min"),
    "tiniest": ("area", "min"), "left": ("x", "min"), "leftmost": ("x", "min"), "right": ("x", "max"),
    "rightmost": ("x", "max"), "top": ("y", "min"), "topmost": ("y", "min"), "upper": ("y", "min"),
    "uppermost": ("y", "min"), "highest": ("y", "min"), "bottom": ("y", "max"), "bottommost": ("y", "max"),
    "lower": ("y", "max"), "lowest": ("y", "max"),
}
GENERIC_NOUNS = {"shape", "shapes", "object", "objects", "thing", "things", "one", "item", "region"}
STOPWORDS = {"the", "a", "an", "on", "at", "in", "of", "to", "most", "side", "that", "is", "which", "and",
             "please", "all", "every", "image", "picture", "photo", "segment", "mask", "cut", "out", "outline",
             "select", "highlight", "me", "give", "find", "just", "only", "corner", "part"}


@dataclass
class TargetQuery:
    """What a referring expression asks for: colour, noun and an optional superlative."""

    text: str
    colour: str | None = None
    noun: str | None = None
    superlative: tuple[str, str] | None = None
    superlative_word: str | None = None

    @property
    def what(self) -> str:
        """'red circle', 'blue object', 'object': what is looked for, without the superlative."""
        return " ".join(w for w in (self.colour, self.noun or "object") if w)


def parse_target(text: str) -> TargetQuery:
    """Split 'the largest red square' into colour, noun and superlative (unknown words form the noun)."""
    q = TargetQuery(text=text.strip())
    rest: list[str] = []
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in COLOUR_WORDS and q.colour is None:
            q.colour = COLOUR_WORDS[word]
        elif word in SUPERLATIVES and q.superlative is None:
            q.superlative, q.superlative_word = SUPERLATIVES[word], word
        elif word in STOPWORDS or word in GENERIC_NOUNS:
            continue
        else:
            rest.append(word)
    q.noun = " ".join(rest) or None
    return q


# -- arguments and result ----------------------------------------------------------------------------
class SegmentArgs(BaseModel):
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


# -- the expert -----------------------------------------------------------------------------------------
OVERLAY_COLOURS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (64, 220, 120), (220, 90, 255), (255, 140, 40)]


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a boolean mask with ``counts`` as str (JSON)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def mask_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def render_overlay(image: Image.Image, masks: Sequence[np.ndarray]) -> Image.Image:
    """The image with each mask tinted and outlined in its own colour."""
    from PIL import Image as PILImage

    out = np.asarray(image.convert("RGB")).astype(np.float32)
    for i, m in enumerate(masks):
        col = np.array(OVERLAY_COLOURS[i % len(OVERLAY_COLOURS)], np.float32)
        out[m] = out[m] * 0.5 + col * 0.5
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        out[m & ~inner] = col
    return PILImage.fromarray(out.clip(0, 255).astype(np.uint8))


def _colour_of(image: Image.Image, mask: np.ndarray, fallback: str | None) -> str | None:
    """The colour name of the pixels under ``mask`` (detect's reader), else what detect said."""
    try:
        from experts.detect import read_colour
    except ImportError:
        return fallback
    box = mask_bbox(mask)
    if box[2] <= box[0]:
        return fallback
    return read_colour(image, box, mask)


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
    ]

    def __init__(self, weights_dir: Path | str | None = None, cache_size: int | None = None) -> None:
        super().__init__()
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.cache = EmbeddingCache(default_cache_size() if cache_size is None else cache_size)
        self._grounding_memo = LRU(max(4, 4 * self.cache.size))  # detect's boxes and their masks per image
        self.runner: SamRunner | None = None
        self.model_name = ""
        self.encoded_images = 0  # images that went through the image encoder (cache misses)
        self.cpu_encoder_batch = 2

    # -- loading ----------------------------------------------------------------------------------
    def setup(self) -> None:
        from switchboard.settings import get_settings

        settings = get_settings()
        if settings.segment_weights is not None and self.weights_dir is None:
            runner = SamRunner(load_official_sam(Path(settings.segment_weights), settings.segment_model_type or "vit_b"))
            self.model_name = f"{settings.segment_model_type or 'vit_b'} ({Path(settings.segment_weights).name})"
        else:
            directory = self.weights_dir or Path(settings.models_dir) / "segmenter"
            if not (directory / WEIGHTS_FILE).exists() or not (directory / CONFIG_FILE).exists():
                raise SegmenterUnavailable(
                    f"no segmenter weights in {directory} (need {CONFIG_FILE} and {WEIGHTS_FILE}); "
                    "train them with `switchboard train segmenter` or set SWITCHBOARD_SEGMENT_WEIGHTS")
            runner = load_small_runner(directory)
            self.model_name = f"small SAM ({directory.name})"
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
            colour = _colour_of(image, masks[0, int(scores[0].argmax()) if args.multimask else 0], None)
            labels = [f"{colour} object" if colour in COLOUR_WORDS.values() else "object"]
        else:
            picked, labels, grounding = self._ground(args.target or "", args.image, image, emb, ctx)
            if picked is None:
                return SegmentResult(summary=grounding, prompt="target", width=w, height=h, grounding=grounding)
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
                colour = _colour_of(images[i], masks[0, int(scores[0].argmax()) if args.multimask else 0], None)
                labels[i] = [f"{colour} object" if colour in COLOUR_WORDS.values() else "object"]
            ctx.progress(0.8, "masks decoded")
            prompt = "boxes" if args.boxes is not None else "points"
            return self._result(ctx, args.image, images[i], masks, scores, labels[i], prompt, args.multimask, None)

        return map_on_threads(finish, range(len(items)), name="segment-batch")

    # -- helpers ------------------------------------------------------------------------------------
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

    def _ground(self, target: str, image_id: str, image: Image.Image, emb: ImageEmbedding,
                ctx: RunContext) -> tuple[list[float] | None, list[str], str]:
        """Find the box of the object ``target`` names: detect, segment every detection, filter, rank.

        detect is asked for everything (at a low confidence: the expression's constraints do the
        picking); detections of one object under different classes are merged into one candidate that
        keeps every class guess and its score. The colour is read from the pixels under each
        candidate's mask. The noun keeps candidates whose best guess is that class, or failing that,
        whose guesses include it with at least half the best score (detectors confuse shapes far more
        often than colours); with no such candidate, the closest object of the right colour is taken.
        """
        q = parse_target(target)
        cands = self._candidates(ctx, image_id, image, emb, "everything")
        pool = [c for c in cands if q.colour is None or c["colour"] == q.colour]
        how = "matched"
        if q.noun and pool:
            classes = self._noun_classes(ctx, image_id, q.noun, cands)
            strict = [c for c in pool if max(c["classes"], key=c["classes"].get) in classes]
            loose = [c for c in pool
                     if max((c["classes"].get(k, 0.0) for k in classes), default=0.0) >= 0.5 * max(c["classes"].values())]
            if strict or loose:
                pool = strict or loose
                how = "matched" if strict else f"matched a second guess of {q.noun}"
            elif q.colour:
                how = f"no {q.colour} {q.noun} detected; closest {q.colour} object"
            else:
                pool = []
        if not pool:
            seen = ", ".join(sorted({c["name"] for c in cands}))
            return None, [], f"no {q.what} found in the image" + (f" (found: {seen})" if seen else "")
        if q.superlative is not None:
            key, end = q.superlative
            # positions are the centres of the masks' boxes: the visible part, as a person sees it
            val = {"area": lambda c: c["area"], "x": lambda c: (c["mbox"][0] + c["mbox"][2]) / 2,
                   "y": lambda c: (c["mbox"][1] + c["mbox"][3]) / 2}[key]
            pick = (max if end == "max" else min)(pool, key=val)
        else:
            pick = max(pool, key=lambda c: c["score"])
        return pick["box"], [pick["name"]], f"{target!r} -> {pick['name']} ({how}; {len(pool)} candidate(s))"

    def _detect(self, ctx: RunContext, image_id: str, query: str) -> list[dict[str, Any]]:
        """The boxes of an in-process detect call (the boxes artifact's entries), memoised per image
        like the embeddings: several targets on one image run the detector once."""
        key = ("detect", image_id, query, self.ground_confidence)
        hit = self._grounding_memo.get(key)
        if hit is not None:
            return hit
        boxes = self._run_detect(ctx, image_id, query)
        self._grounding_memo.put(key, boxes)
        return boxes

    def _run_detect(self, ctx: RunContext, image_id: str, query: str) -> list[dict[str, Any]]:
        from switchboard.registry import get_registry

        registry = get_registry()
        if "detect" not in registry:
            raise TargetUnresolvable("cannot ground a text target: the detect expert is not installed; "
                                     "give boxes or points instead")
        detect = registry.instance("detect")
        args = detect.Args.model_validate({"image": image_id, "query": query, "confidence": self.ground_confidence})
        det = detect(args, ctx)
        boxes_art = next((a for a in det.artifacts if a.kind == "boxes"), None)
        return list(ctx.read_json(boxes_art.id).get("boxes", [])) if boxes_art else []

    def _noun_classes(self, ctx: RunContext, image_id: str, noun: str, cands: list[dict[str, Any]]) -> set[str]:
        """The detector classes ``noun`` names: itself (or its singular) when it is a class seen here,
        else whatever detect's own query matching (synonyms, similar words) finds for it."""
        known = {k for c in cands for k in c["classes"]}
        for form in (noun, noun[:-1] if noun.endswith("s") else noun):
            if form in known:
                return {form}
        return {_box_class(b) for b in self._detect(ctx, image_id, noun)}

    def _candidates(self, ctx: RunContext, image_id: str, image: Image.Image, emb: ImageEmbedding,
                    query: str) -> list[dict[str, Any]]:
        """detect's boxes for ``query``, each segmented (mask area, colour of the masked pixels)."""
        key = ("candidates", image_id, query, self.ground_confidence)
        hit = self._grounding_memo.get(key)
        if hit is None:
            hit = self._segment_detections(image, emb, self._detect(ctx, image_id, query))
            self._grounding_memo.put(key, hit)
        return hit

    def _segment_detections(self, image: Image.Image, emb: ImageEmbedding,
                            found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not found:
            return []
        assert self.runner is not None
        masks, scores = self.runner.predict(emb, boxes=np.array([b["xyxy"] for b in found], np.float32))
        cands = []
        for b, m, s in zip(found, masks[:, 0], scores[:, 0], strict=True):
            if not m.any():
                continue
            score = float(b.get("score", s))
            cands.append({"box": [float(v) for v in b["xyxy"]], "mask": m, "area": int(m.sum()), "mbox": mask_bbox(m),
                          "classes": {_box_class(b): score}, "score": score, "fallback_colour": b.get("colour")})
        cands = _merge_duplicates(cands)
        for c in cands:
            c["colour"] = _colour_of(image, c["mask"], c.pop("fallback_colour"))
            noun = max(c["classes"], key=c["classes"].get)
            c["name"] = f"{c['colour']} {noun}" if c["colour"] else noun
        return cands

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
        artifacts.append(ctx.save_image(render_overlay(image, primary), kind="overlay", role="overlay"))
        artifacts.append(ctx.save_json({"image": image_id, "width": w, "height": h, "boxes": [
            {"xyxy": o.box, "label": o.label, "score": o.score} for o in objects]}, kind="boxes", role="boxes"))
        parts = [f"{o.label or 'object'} {o.area} px" for o in objects]
        summary = f"{len(objects)} mask{'s' if len(objects) != 1 else ''}: " + ", ".join(parts)
        if grounding:
            summary += f" [{grounding}]"
        ctx.progress(1.0, "done")
        return SegmentResult(summary=summary, artifacts=artifacts, prompt=prompt, width=w, height=h,
                             objects=objects, grounding=grounding)

    @staticmethod
    def _save_mask(ctx: RunContext, mask: np.ndarray, role: str) -> OutputArtifact:
        from PIL import Image as PILImage

        return ctx.save_image(PILImage.fromarray(mask.astype(np.uint8) * 255, mode="L"), kind="mask", role=role)


def _box_class(box: dict[str, Any]) -> str:
    """The class of a detect box: its ``shape`` field, else the last word of its label."""
    return str(box.get("shape") or (str(box.get("label", "")).split() or ["object"])[-1])


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _merge_duplicates(cands: list[dict[str, Any]], thresh: float = 0.7) -> list[dict[str, Any]]:
    """Detections of one object under different classes (boxes with IoU > ``thresh``; a detector's
    per-class NMS keeps both) become one candidate: the best-scored one's box and mask, with every
    class guess of the group and its best score."""
    out: list[dict[str, Any]] = []
    for c in sorted(cands, key=lambda c: -c["score"]):
        for o in out:
            if _box_iou(o["box"], c["box"]) > thresh:
                for k, v in c["classes"].items():
                    o["classes"][k] = max(v, o["classes"].get(k, 0.0))
                break
        else:
            out.append({**c, "classes": dict(c["classes"])})
    return out


def load_official_sam(checkpoint: Path, model_type: str) -> Sam:
    """An official SAM checkpoint through ``segment_anything.sam_model_registry`` (vit_b, vit_l, vit_h)."""
    from segment_anything import sam_model_registry

    if model_type not in sam_model_registry:
        raise SegmenterUnavailable(f"unknown SAM model type {model_type!r}; "
                                   f"types: {', '.join(sorted(sam_model_registry))}")
    if not checkpoint.is_file():
        raise SegmenterUnavailable(f"SAM checkpoint {checkpoint} does not exist")
    try:
        return sam_model_registry[model_type](checkpoint=str(checkpoint)).eval()
    except RuntimeError as e:  # wrong type for the file: size mismatches in load_state_dict
        raise SegmenterUnavailable(f"{checkpoint} is not a {model_type} checkpoint: {str(e).splitlines()[0]}") from e
