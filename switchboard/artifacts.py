"""Content-addressed artifact store on disk.

Layout under the root::

    blobs/ab/abcdef…          the bytes, named by their sha256
    meta/<id>.json            metadata of an artifact id
    owners/<owner>/<id>       an empty file: ``owner`` (an API key's tenant) may read artifact ``id``

Ids are content hashes, so anyone holding an image could compute its id: who may read an artifact is
therefore recorded per owner (``claim``/``owned_by``), never derived from the id. Uploads larger than
``import_max_side`` are downscaled once at import (see ``import_image``).

An artifact id is ``<kind>-<first 24 hex digits of sha256(kind + bytes)>``. Ids are checked against a
strict pattern before anything touches the filesystem, and paths are built from the hex digits only,
so no client string ever becomes a path. Writes are atomic (temp file + rename), so several worker
processes can share one store (a mounted volume under docker-compose).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from switchboard.errors import ArtifactNotFound, ImageRejected, ImageTooLarge, InvalidArtifactId

KINDS = ("image", "overlay", "mask", "boxes", "text", "json")
ID_PATTERN = re.compile(r"^(?P<kind>image|overlay|mask|boxes|text|json)-(?P<hex>[0-9a-f]{24})$")
# An owner (tenant) name is a path component: checked against this before it touches the filesystem.
OWNER_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Image formats we decode; everything else is refused before PIL's plugin zoo sees it.
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
# An overlay or a mask is still an image: an image argument accepts any of these (accepted_kinds).
IMAGE_KINDS = ("image", "overlay", "mask")
# zlib level of the PNGs experts write: 1 encodes several times faster than Pillow's default 6 (a large
# share of a small call: overlays and masks are written on every call) for larger files (+15 to +60 %)
PNG_COMPRESS_LEVEL = 1


class ArtifactMeta(BaseModel):
    """What the store knows about an artifact."""

    id: str
    kind: str
    media_type: str
    size: int
    sha256: str
    width: int | None = None
    height: int | None = None
    call_id: str | None = None
    conversation_id: str | None = None
    created: float
    extra: dict[str, Any] = {}


def accepted_kinds(kind: str) -> tuple[str, ...]:
    """The artifact kinds an argument of ``kind`` accepts: an image argument takes any image kind."""
    return IMAGE_KINDS if kind == "image" else (kind,)


def is_artifact_id(value: str) -> bool:
    return bool(ID_PATTERN.match(value))


def _check_id(artifact_id: str) -> re.Match[str]:
    if not isinstance(artifact_id, str):
        raise InvalidArtifactId(f"artifact id must be a string, got {type(artifact_id).__name__}")
    m = ID_PATTERN.match(artifact_id)
    if m is None:
        shown = artifact_id if len(artifact_id) <= 80 else artifact_id[:77] + "..."
        raise InvalidArtifactId(
            f"{shown!r} is not an artifact id (expected <kind>-<24 hex digits>, kind one of {', '.join(KINDS)})"
        )
    return m


def _pil_open():
    """PIL's own ``Image.open``.

    ultralytics replaces ``PIL.Image.open`` with a wrapper that, on an unidentified image, tries to
    pip-install pi-heif (network at run time) and raises ImportError offline. Untrusted uploads go
    through PIL's original function, whatever was imported before.
    """
    import sys

    from PIL import Image

    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    return original if original is not None and Image.open is not original else Image.open


def sniff_image(data: bytes, *, max_bytes: int, max_pixels: int) -> tuple[str, int, int]:
    """Check encoded image bytes without decoding pixels. Returns (format, width, height).

    Refuses oversized files, unknown formats and decompression bombs with a clear error.
    """
    from PIL import Image

    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes} bytes")
    if not data:
        raise ImageRejected("image is empty (0 bytes)")
    try:
        with _pil_open()(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as im:
            fmt, (w, h) = im.format or "", im.size
    except Image.UnidentifiedImageError:
        raise ImageRejected(
            f"not a supported image (supported: {', '.join(sorted(IMAGE_FORMATS))}); "
            f"the first bytes are {data[:8]!r}"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image refused as a decompression bomb: {e}") from None
    except Exception as e:  # PIL raises many types for truncated headers
        raise ImageRejected(f"corrupt image header: {e}") from None
    if w <= 0 or h <= 0:
        raise ImageRejected(f"image has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels")
    return fmt, w, h


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, mode: str = "RGB", max_side: int | None = None):
    """Safely decode image bytes into a PIL image in ``mode`` (pixels loaded, file closed).

    ``max_side``: the image is made to fit ``max_side`` x ``max_side`` (aspect kept); a JPEG is then
    decoded at a reduced DCT scale, so a large photo never exists in memory at full size.
    """
    from PIL import Image

    sniff_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pil_open()(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as im:
                if max_side is not None and max(im.size) > max_side and im.format == "JPEG":
                    im.draft("RGB", (max_side, max_side))
                im.load()
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                out = im.convert(mode)
            if max_side is not None and max(out.size) > max_side:
                out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageTooLarge(f"image refused as a decompression bomb: {e}") from None
    except ImageRejected:
        raise
    except Exception as e:
        raise ImageRejected(f"corrupt image data: {e}") from None
    return out


class ArtifactStore:
    """Artifacts on disk, addressed by content. Safe to share between processes."""

    def __init__(self, root: Path | str, *, max_image_bytes: int = 20 * 1024 * 1024,
                 max_image_pixels: int = 40_000_000, import_max_side: int | None = None) -> None:
        self.root = Path(root)
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.import_max_side = import_max_side
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "meta").mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Any) -> ArtifactStore:
        """The store the settings describe (``switchboard.settings.Settings``)."""
        s = settings
        return cls(s.artifact_dir, max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels,
                   import_max_side=getattr(s, "import_max_side", None))

    # -- paths (only ever from validated hex digits) --------------------------------------------
    def _blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / sha

    def _meta_path(self, artifact_id: str) -> Path:
        m = _check_id(artifact_id)
        return self.root / "meta" / f"{m['kind']}-{m['hex']}.json"

    def _atomic_write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- writing --------------------------------------------------------------------------------
    def put_bytes(self, data: bytes, *, kind: str, media_type: str, call_id: str | None = None,
                  conversation_id: str | None = None, width: int | None = None, height: int | None = None,
                  extra: dict[str, Any] | None = None) -> ArtifactMeta:
        """Store bytes as an artifact of ``kind``. Storing the same bytes twice gives the same id."""
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}; kinds: {', '.join(KINDS)}")
        sha = hashlib.sha256(data).hexdigest()
        # The kind is part of the id, so the same bytes stored as an image and as a mask stay distinct.
        digest = hashlib.sha256(kind.encode() + b"\0" + data).hexdigest()[:24]
        artifact_id = f"{kind}-{digest}"
        blob = self._blob_path(sha)
        if not blob.exists():
            self._atomic_write(blob, data)
        meta_path = self._meta_path(artifact_id)
        if meta_path.exists():  # content-addressed: the first producer's metadata stays
            return self.get(artifact_id)
        meta = ArtifactMeta(id=artifact_id, kind=kind, media_type=media_type, size=len(data), sha256=sha,
                            width=width, height=height, call_id=call_id, conversation_id=conversation_id,
                            created=time.time(), extra=extra or {})
        self._atomic_write(meta_path, meta.model_dump_json().encode())
        return meta

    def put_image(self, image, *, kind: str = "image", **kw: Any) -> ArtifactMeta:
        """Store a PIL image as PNG (masks as 8-bit greyscale)."""
        if kind not in IMAGE_KINDS:
            raise ValueError(f"{kind!r} is not an image kind ({', '.join(IMAGE_KINDS)})")
        if kind == "mask" and image.mode not in ("L", "1"):
            image = image.convert("L")
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return self.put_bytes(buf.getvalue(), kind=kind, media_type="image/png", width=image.width,
                              height=image.height, **kw)

    def import_image(self, data: bytes, **kw: Any) -> ArtifactMeta:
        """Store an uploaded image after checking it: size, pixel count, format, and a full decode.

        An image larger than ``import_max_side`` on its longest side is downscaled here, once, and the
        downscaled copy is the artifact the conversation, the core and every expert read (the core's
        vision and the detectors work at well under 2048 px; decoding a 40 MP upload on every call is
        what made memory and latency grow). The original is stored as its own image artifact, named
        in ``extra["original"]`` (with its size), for an expert that wants full resolution; it lives
        and goes with the downscaled one (``switchboard gc``).
        """
        fmt, w, h = sniff_image(data, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
        side = self.import_max_side
        if side is None or max(w, h) <= side:
            decode_image(data, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
            return self.put_bytes(data, kind="image", media_type=IMAGE_FORMATS[fmt], width=w, height=h, **kw)
        small = decode_image(data, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, max_side=side)
        original = self.put_bytes(data, kind="image", media_type=IMAGE_FORMATS[fmt], width=w, height=h, **kw)
        extra = {**(kw.pop("extra", None) or {}), "original": original.id, "original_width": w, "original_height": h}
        buf = io.BytesIO()
        if fmt == "JPEG":  # a photo: PNG would be several times larger
            small.save(buf, format="JPEG", quality=92)
            media_type = "image/jpeg"
        else:
            small.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            media_type = "image/png"
        return self.put_bytes(buf.getvalue(), kind="image", media_type=media_type, width=small.width,
                              height=small.height, extra=extra, **kw)

    def put_json(self, obj: Any, *, kind: str = "json", **kw: Any) -> ArtifactMeta:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        return self.put_bytes(data, kind=kind, media_type="application/json", **kw)

    def put_text(self, text: str, **kw: Any) -> ArtifactMeta:
        return self.put_bytes(text.encode(), kind="text", media_type="text/plain; charset=utf-8", **kw)

    # -- reading --------------------------------------------------------------------------------
    def get(self, artifact_id: str) -> ArtifactMeta:
        """Metadata of an artifact; raises InvalidArtifactId or ArtifactNotFound."""
        path = self._meta_path(artifact_id)
        try:
            return ArtifactMeta.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {artifact_id!r}") from None

    def exists(self, artifact_id: str) -> bool:
        try:
            return self._meta_path(artifact_id).exists()
        except InvalidArtifactId:
            return False

    def path(self, artifact_id: str) -> Path:
        """The file holding the artifact's bytes (for serving; never built from client text)."""
        meta = self.get(artifact_id)
        return self._blob_path(meta.sha256)

    def read_bytes(self, artifact_id: str) -> bytes:
        return self.path(artifact_id).read_bytes()

    def open_image(self, artifact_id: str, mode: str = "RGB"):
        meta = self.get(artifact_id)
        if meta.kind not in IMAGE_KINDS:
            raise ImageRejected(f"artifact {artifact_id} is {meta.kind!r}, not an image")
        return decode_image(self.read_bytes(artifact_id), max_bytes=self.max_image_bytes,
                            max_pixels=self.max_image_pixels, mode=mode)

    def read_json(self, artifact_id: str) -> Any:
        return json.loads(self.read_bytes(artifact_id))

    def list(self) -> list[ArtifactMeta]:
        out = []
        for p in sorted((self.root / "meta").glob("*.json")):
            try:
                out.append(ArtifactMeta.model_validate_json(p.read_bytes()))
            except FileNotFoundError:  # removed meanwhile (gc)
                continue
        return out

    # -- owners ---------------------------------------------------------------------------------
    def _owner_dir(self, owner: str) -> Path:
        if not isinstance(owner, str) or not OWNER_PATTERN.match(owner):
            raise ValueError(f"{str(owner)[:70]!r} is not an owner name (lowercase letters, digits, - and _)")
        return self.root / "owners" / owner

    def claim(self, artifact_id: str, owner: str) -> None:
        """Record that ``owner`` may read ``artifact_id`` (idempotent)."""
        m = _check_id(artifact_id)
        folder = self._owner_dir(owner)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{m['kind']}-{m['hex']}").touch()

    def owned_by(self, artifact_id: str, owner: str) -> bool:
        """Whether ``owner`` may read ``artifact_id`` (False for an id that is not one)."""
        m = ID_PATTERN.match(artifact_id) if isinstance(artifact_id, str) else None
        return m is not None and (self._owner_dir(owner) / f"{m['kind']}-{m['hex']}").exists()

    def owners(self, artifact_id: str) -> list[str]:
        m = _check_id(artifact_id)
        root = self.root / "owners"
        return sorted(d.name for d in root.iterdir() if (d / f"{m['kind']}-{m['hex']}").exists()) if root.is_dir() else []

    # -- removing -------------------------------------------------------------------------------
    def remove(self, artifact_ids: list[str] | set[str]) -> int:
        """Remove artifacts: their metadata, their owners' entries, and each blob no other artifact
        still uses (the same bytes may be stored under several kinds). Returns how many were removed."""
        doomed = {a for a in artifact_ids if self.exists(a)}
        if not doomed:
            return 0
        gone_shas: set[str] = set()
        for artifact_id in doomed:
            try:
                gone_shas.add(self.get(artifact_id).sha256)
            except ArtifactNotFound:
                continue
        owner_dirs = [d for d in (self.root / "owners").iterdir() if d.is_dir()] if (self.root / "owners").is_dir() else []
        for artifact_id in doomed:
            self._meta_path(artifact_id).unlink(missing_ok=True)
            for d in owner_dirs:
                (d / artifact_id).unlink(missing_ok=True)
        still_used = {m.sha256 for m in self.list()}
        for sha in gone_shas - still_used:
            self._blob_path(sha).unlink(missing_ok=True)
        return len(doomed)
