"""Artifact store: content addressing, ids that never become client-chosen paths, image safety."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from switchboard.artifacts import ArtifactStore, is_artifact_id
from switchboard.errors import ArtifactNotFound, ImageRejected, ImageTooLarge, InvalidArtifactId


def _png(w: int = 8, h: int = 6, colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_content_addressed_and_metadata(store: ArtifactStore) -> None:
    a = store.import_image(_png(), call_id="c1", conversation_id="conv-1")
    b = store.import_image(_png(), call_id="c9")
    assert a.id == b.id and a.id.startswith("image-") and is_artifact_id(a.id)
    meta = store.get(a.id)
    assert (meta.kind, meta.media_type, meta.width, meta.height) == ("image", "image/png", 8, 6)
    assert meta.call_id == "c1" and meta.conversation_id == "conv-1"  # first producer kept
    assert store.open_image(a.id).size == (8, 6)
    other = store.import_image(_png(colour=(0, 0, 255)))
    assert other.id != a.id


def test_same_bytes_different_kind_different_id(store: ArtifactStore) -> None:
    img = Image.new("L", (4, 4), 255)
    m = store.put_image(img, kind="mask")
    i = store.put_image(img, kind="image")
    assert m.id.startswith("mask-") and i.id.startswith("image-") and m.sha256 == i.sha256
    assert len(list((store.root / "blobs").rglob("*"))) == 2  # one folder + one shared blob


def test_json_and_text(store: ArtifactStore) -> None:
    j = store.put_json({"boxes": [[1, 2, 3, 4]]}, kind="boxes")
    assert store.read_json(j.id) == {"boxes": [[1, 2, 3, 4]]}
    t = store.put_text("héllo")
    assert store.read_bytes(t.id).decode() == "héllo"
    with pytest.raises(ImageRejected, match="not an image"):
        store.open_image(j.id)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "image-../../x", "image-" + "g" * 24, "IMAGE-" + "a" * 24,
                                 "image-" + "a" * 23, "image-" + "a" * 24 + "/x", "", "blob-" + "a" * 24])
def test_ids_never_become_paths(store: ArtifactStore, bad: str) -> None:
    with pytest.raises(InvalidArtifactId):
        store.get(bad)
    assert not store.exists(bad)


@given(st.text(max_size=80))
def test_any_string_is_rejected_or_looked_up_safely(tmp_path_factory, s: str) -> None:
    store = ArtifactStore(tmp_path_factory.mktemp("a"))
    try:
        store.get(s)
    except (InvalidArtifactId, ArtifactNotFound):
        pass


def test_unknown_id(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound, match="no artifact"):
        store.get("image-" + "0" * 24)


def test_corrupt_and_unsupported_images(store: ArtifactStore) -> None:
    with pytest.raises(ImageRejected, match="not a supported image"):
        store.import_image(b"hello, world, this is not an image")
    with pytest.raises(ImageRejected, match="empty"):
        store.import_image(b"")
    truncated = _png(64, 64)[:60]
    with pytest.raises(ImageRejected):
        store.import_image(truncated)
    assert store.list() == []  # nothing half-stored


def test_size_limits(tmp_path) -> None:
    small = ArtifactStore(tmp_path, max_image_bytes=100, max_image_pixels=10_000)
    with pytest.raises(ImageTooLarge, match="bytes"):
        small.import_image(_png(8, 6) + b"\0" * 200)
    with pytest.raises(ImageTooLarge, match="pixels"):
        ArtifactStore(tmp_path, max_image_pixels=100).import_image(_png(20, 20))


def _bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG header claiming huge dimensions (a decompression bomb), with a small IDAT."""
    def chunk(t: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding(store: ArtifactStore) -> None:
    with pytest.raises(ImageTooLarge, match="pixels|decompression bomb"):
        store.import_image(_bomb_png(100_000, 100_000))


def test_mask_saved_as_greyscale(store: ArtifactStore) -> None:
    meta = store.put_image(Image.new("RGB", (5, 5), (255, 255, 255)), kind="mask")
    assert store.open_image(meta.id, mode="L").getpixel((0, 0)) == 255
    with pytest.raises(ValueError, match="not an image kind"):
        store.put_image(Image.new("RGB", (2, 2)), kind="boxes")


def test_shared_between_instances(tmp_path) -> None:
    a = ArtifactStore(tmp_path)
    meta = a.put_text("shared")
    assert ArtifactStore(tmp_path).read_bytes(meta.id) == b"shared"


def test_uploads_bypass_ultralytics_pil_patch(store: ArtifactStore) -> None:
    """ultralytics patches PIL.Image.open to pip-install pi-heif on unknown images; uploads must not."""
    import ultralytics.utils.patches  # noqa: F401  (applies the patch)

    with pytest.raises(ImageRejected, match="not a supported image"):
        store.import_image(b"hello, world, this is not an image")
