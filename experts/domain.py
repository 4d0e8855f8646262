"""Is this image from the shapes world? The embedded models' out-of-domain check.

The embedded detector, segmenter and generator are trained on the shapes world only: saturated
objects on (nearly) grey backgrounds. On a photograph the detector would happily report "4 blue stars"
in a face. This module says when an image is outside that world, with a one-class test whose thresholds
come from shapes-world images (scenes and the embedded generator's drawings):

* image level (``check_image``): every pixel of a shapes-world image is grey-ish background (chroma,
  max - min of RGB, below ``BACKGROUND_CHROMA``), an object's saturated colour, or an anti-aliased edge
  right next to one. Two shares of pixels that are none of these: ``unexplained``, colour that is not
  next to any saturated colour (most of a colour photograph: skin, sky, wood, grass; nothing of a
  scene), and ``off_palette``, colour that is not next to one of the six palette colours (catches
  saturated photos too, such as a retina's orange; looser, because the embedded generator's drawings
  drift off the palette). ``score`` is the larger of the two, each divided by its threshold: above 1
  the image is out of domain.
* no colour at all (``colourless``): a shapes-world image always holds at least one saturated object;
  a grayscale photograph holds none, so there can be no shapes-world object in it.
* object level (``DomainCheck.supports``): a shapes-world object is painted in a saturated colour, so a
  detection whose box holds hardly any saturated pixels is not an object of this world.

Only the embedded weights get this check: real weights (``SWITCHBOARD_DETECT_WEIGHTS`` …) know
photographs and are never filtered. Calibration figures: models/detector/MODEL_CARD.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# The shapes world's palette and classes (training/shapes.py draws its scenes with these).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
SHAPES_WORLD_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "hexagon", "star")
ANALYSIS_SIDE = 256        # images are looked at with their long side at most this (scenes are 256)
BACKGROUND_CHROMA = 50     # below: background grey (at most 28 in the shapes world, plus blurred noise)
SATURATED_CHROMA = 80      # at least: an object's colour (palette colours have a chroma of 130-230)
PALETTE_DISTANCE = 50.0    # RGB distance below which a pixel is that palette colour (jitter 12 + noise)
EDGE_REACH = 5             # anti-aliased edges: within this window (+-2 px) of a saturated/palette pixel
# Image-level thresholds, from shapes-world scenes (2,200: the eval seed's 200 + 2,000 more) and 180
# drawings of the embedded generator (figures, and how photos informed the design: the detector's card):
# unexplained: scenes max 0.00002, drawings max 0.0031 -> threshold ~5x the drawings' max;
# off_palette: scenes max 0.00044, drawings max 0.125 -> threshold 1.6x the drawings' max.
UNEXPLAINED_MAX = 0.015
OFF_PALETTE_MAX = 0.2
# A shapes-world image has at least one object of >= 40 visible pixels (min over 2,200 scenes: 318).
MIN_SATURATED_PIXELS = 40
# Object level: the share of a detection's box that must be saturated pixels. Over 8,903 shapes-world
# detections (7,607 matched to an object) the lowest share is 0.26 (a half-hidden star).
MIN_BOX_SUPPORT = 0.15
MIN_BOX_PIXELS = 12        # ... and at least this many of them (at the analysis scale)


@dataclass(frozen=True)
class DomainCheck:
    """The verdict on one image: ``score`` (above 1: out of domain), ``out_of_domain`` and why
    (``reason``: "photo" or "colourless"), and the saturated-pixel map ``supports`` uses."""

    score: float
    out_of_domain: bool
    reason: str | None
    saturated: np.ndarray  # bool HxW at the analysis scale
    scale: float = 1.0     # analysis pixels per image pixel
    unexplained: float = 0.0  # the two shares behind ``score`` (see the module's docstring)
    off_palette: float = 0.0

    def box_support(self, xyxy: Any) -> tuple[float, int]:
        """Share and count of saturated pixels inside a pixel xyxy box of the original image."""
        h, w = self.saturated.shape
        x1, y1, x2, y2 = (float(v) * self.scale for v in xyxy)
        x1i, y1i = max(0, min(w - 1, int(x1))), max(0, min(h - 1, int(y1)))
        x2i, y2i = max(x1i + 1, min(w, int(np.ceil(x2)))), max(y1i + 1, min(h, int(np.ceil(y2))))
        patch = self.saturated[y1i:y2i, x1i:x2i]
        n = int(patch.sum())
        return n / patch.size, n

    def supports(self, xyxy: Any) -> bool:
        """Whether a detection box could be a shapes-world object: painted in a saturated colour."""
        share, n = self.box_support(xyxy)
        return share >= MIN_BOX_SUPPORT and n >= MIN_BOX_PIXELS


def check_image(image: Any) -> DomainCheck:
    """Score a PIL image against the shapes world (a few ms: a 256 px copy, numpy, two PIL filters)."""
    from PIL import Image, ImageFilter

    img = image.convert("RGB")
    if max(img.size) > ANALYSIS_SIDE:
        f = ANALYSIS_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BOX)
    # a 3x3 blur takes the per-pixel noise of the "noisy" backgrounds down to a third
    px = np.asarray(img.filter(ImageFilter.BoxBlur(1)), np.int16)
    chroma = px.max(axis=2) - px.min(axis=2)
    saturated = chroma >= SATURATED_CHROMA
    pal = np.array(list(PALETTE.values()), np.int32)
    d2 = ((px[:, :, None, :].astype(np.int32) - pal[None, None]) ** 2).sum(axis=-1).min(axis=-1)
    palette = (d2 < PALETTE_DISTANCE ** 2).astype(np.uint8) * 255
    coloured = chroma >= BACKGROUND_CHROMA
    near_saturated = np.asarray(Image.fromarray(saturated.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(EDGE_REACH)))
    near_palette = np.asarray(Image.fromarray(palette).filter(ImageFilter.MaxFilter(EDGE_REACH)))
    unexplained = float((coloured & (near_saturated == 0)).mean())
    off_palette = float((coloured & (near_palette == 0)).mean())
    score = round(max(unexplained / UNEXPLAINED_MAX, off_palette / OFF_PALETTE_MAX), 4)
    reason = "photo" if score > 1.0 else "colourless" if saturated.sum() < MIN_SATURATED_PIXELS else None
    return DomainCheck(score=score, out_of_domain=reason is not None, reason=reason, saturated=saturated,
                       scale=img.width / image.width, unexplained=unexplained, off_palette=off_palette)
