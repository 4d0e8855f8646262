"""The segmenter's runner: encode an image once, decode any number of box and point prompts against it.

``SamRunner`` serves the embedded small SAM and official checkpoints alike (prompts and images go
through ``ResizeLongestSide`` like ``SamPredictor``). The small SAM's decoder predicts masks on a coarse
grid, so the upsampled edges are blurred by a few pixels; ``refine_mask`` snaps them to the image's
edges with a guided filter. ``decode_many`` decodes the prompts of many calls, on many images, in one
mask-decoder pass (``run_batch``). ``EmbeddingCache`` keeps image embeddings per image artifact id.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experts.sam_model import CONFIG_FILE, SmallSamConfig, load_small_sam

if TYPE_CHECKING:
    import torch
    from segment_anything.modeling import Sam


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


def mask_bbox(mask: np.ndarray) -> list[int]:
    """Pixel xyxy (end exclusive) of a mask's pixels; [0, 0, 0, 0] for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


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


def load_small_runner(directory: Path) -> SamRunner:
    """The embedded segmenter with its inference settings (mask refinement) from ``config.json``."""
    cfg = SmallSamConfig.from_json(Path(directory) / CONFIG_FILE)
    return SamRunner(load_small_sam(directory), refine_cells=cfg.refine_cells, refine_eps=cfg.refine_eps)
