"""Colour from pixels: the palette names that detect and segment report and that queries filter on.

Colour is never a class: it is read from the pixels of each object (``read_colour``), so "the red
circle" and "the red car" work the same way. The names here are the values of the referring
vocabulary's colour words (``experts.referring.COLOUR_WORDS``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

# Hue (degrees) of each palette colour; pixels are named by the nearest hue, which works for the
# shapes world's palette and for real photographs alike.
HUES: dict[str, float] = {"red": 0.0, "orange": 31.0, "yellow": 52.0, "green": 129.0, "blue": 224.0,
                          "purple": 279.0}
#: what an object with hardly any saturated pixels is called instead
GREYS: tuple[str, ...] = ("white", "grey", "black")
MIN_CHROMA = 60  # max(R,G,B) - min(R,G,B): below this a pixel is background-ish grey


@lru_cache(maxsize=64)  # one array per box size (up to a few MB each): keep the recent ones
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
