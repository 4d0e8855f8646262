"""Overlays: what detect and segment draw on the image to show what they found.

detect draws boxes with their labels (``draw_boxes``); segment tints and outlines masks
(``draw_masks``). Both return a new RGB image and leave the input alone.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

ASSETS = Path(__file__).resolve().parent / "assets"
FONT = ASSETS / "DejaVuSans.ttf"
# one colour per mask, in turn
MASK_COLOURS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (64, 220, 120), (220, 90, 255), (255, 140, 40)]


class LabelledBox(Protocol):
    """What ``draw_boxes`` draws: a pixel xyxy box, its label and score (detect's ``Detection``)."""

    xyxy: list[float]
    score: float

    @property
    def label(self) -> str: ...


_fonts = threading.local()


def _font(size: int) -> Any:
    """The label font at a pixel size, loaded once per size and thread (loading a TrueType file costs
    milliseconds; a FreeType face must not be used by two threads at once)."""
    from PIL import ImageFont

    cache = _fonts.__dict__.setdefault("by_size", {})
    if size not in cache:
        cache[size] = ImageFont.truetype(str(FONT), size) if FONT.exists() else ImageFont.load_default()
    return cache[size]


def draw_boxes(image: Image.Image, boxes: Sequence[LabelledBox]) -> Image.Image:
    """The image with each box and its label and score drawn on it."""
    from PIL import ImageDraw

    img = image.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    size = max(10, round(min(img.size) / 20))
    font = _font(size)
    line = max(1, round(min(img.size) / 128))
    for d in boxes:
        x1, y1, x2, y2 = d.xyxy
        draw.rectangle([x1, y1, x2, y2], outline=(0, 0, 0), width=line + 2)
        draw.rectangle([x1, y1, x2, y2], outline=(255, 255, 255), width=line)
        text = f"{d.label} {d.score:.2f}"
        tx, ty = x1, max(0, y1 - size - 2)
        bbox = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(bbox, fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)
    return img


def draw_masks(image: Image.Image, masks: Sequence[np.ndarray]) -> Image.Image:
    """The image with each mask tinted and outlined in its own colour."""
    from PIL import Image as PILImage

    out = np.asarray(image.convert("RGB")).astype(np.float32)
    for i, m in enumerate(masks):
        col = np.array(MASK_COLOURS[i % len(MASK_COLOURS)], np.float32)
        out[m] = out[m] * 0.5 + col * 0.5
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        out[m & ~inner] = col
    return PILImage.fromarray(out.clip(0, 255).astype(np.uint8))
