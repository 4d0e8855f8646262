"""Real photographs that ship inside installed packages: the out-of-domain set of the embedded models.

One list for every test that checks the embedded (shapes-world) experts on real photos. Every file is
bundled with its package (ultralytics' assets, matplotlib's sample_data, scikit-image's ``data``
folder), so nothing is downloaded; a package that is missing just contributes no photos.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# scikit-image's bundled photographs (colour and grayscale); its synthetic images (chessboard,
# colorwheel, logo, phantom, horse silhouette, binary blobs) are left out: they are not photos.
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png",
    "retina.jpg", "motorcycle_left.png", "motorcycle_right.png", "camera.png", "coins.png", "moon.png",
    "brick.png", "grass.png", "gravel.png", "clock_motion.png", "page.png", "text.png", "cell.png",
    "microaneurysms.png",
)
ULTRALYTICS_PHOTOS: tuple[str, ...] = ("bus.jpg", "zidane.jpg")
MATPLOTLIB_PHOTOS: tuple[str, ...] = ("grace_hopper.jpg",)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


def bundled_photos() -> list[Path]:
    """Paths of the bundled real photographs that exist in this environment (sorted by package)."""
    out: list[Path] = []
    if (root := _package_dir("ultralytics")) is not None:
        out += [root / "assets" / n for n in ULTRALYTICS_PHOTOS]
    if (root := _package_dir("matplotlib")) is not None:
        out += [root / "mpl-data" / "sample_data" / n for n in MATPLOTLIB_PHOTOS]
    if (root := _package_dir("skimage")) is not None:
        out += [root / "data" / n for n in SKIMAGE_PHOTOS]
    return [p for p in out if p.is_file()]
