"""Retention (``collect_garbage``, ``switchboard gc``), owners in the artifact store, where
conversations live, and the one-time downscale of large uploads."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.session import Conversation, ConversationStore, collect_garbage
from switchboard.artifacts import ArtifactStore
from switchboard.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0


def _png(size=(40, 30), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _conv(store: ConversationStore, artifacts: list[str], age_days: float) -> Conversation:
    conv = store.create()
    for a in artifacts:
        conv.add_artifact(a, "image")
    store.save(conv)
    # save() stamps "updated" now; write the age directly, as an old file would have it
    conv.updated = time.time() - age_days * DAY
    (store.root / f"{conv.id}.json").write_text(conv.model_dump_json())
    return conv


def _age(store: ArtifactStore, artifact_id: str, days: float) -> None:
    meta = store.get(artifact_id)
    meta.created = time.time() - days * DAY
    store._meta_path(artifact_id).write_text(meta.model_dump_json())


def test_gc_removes_old_conversations_and_only_their_artifacts(tmp_path: Path) -> None:
    store, convs = ArtifactStore(tmp_path / "artifacts"), ConversationStore(tmp_path / "conversations")
    only_old = store.import_image(_png(colour=(1, 2, 3))).id
    shared = store.import_image(_png(colour=(4, 5, 6))).id
    only_new = store.import_image(_png(colour=(7, 8, 9))).id
    orphan_old = store.put_text("an intermediate result").id
    orphan_young = store.put_text("made a moment ago").id
    same_bytes = store.put_bytes(store.read_bytes(only_old), kind="mask", media_type="image/png").id
    for a in (only_old, shared, only_new, orphan_old, same_bytes):
        _age(store, a, 5)
        store.claim(a, "key-a")
    _conv(convs, [only_old, shared], age_days=3)
    new = _conv(convs, [shared, only_new, same_bytes], age_days=0.5)

    report = collect_garbage(convs, store, retention_days=1)
    assert (report.conversations_removed, report.conversations_kept) == (1, 1)
    assert {c.id for c in convs} == {new.id}
    left = {m.id for m in store.list()}
    assert left == {shared, only_new, same_bytes, orphan_young}
    assert (report.artifacts_removed, report.artifacts_kept) == (2, 4)
    # the blob of only_old is still the mask's bytes; only_old's owner entry went with it
    assert store.read_bytes(same_bytes) == _png(colour=(1, 2, 3))
    assert not store.owned_by(only_old, "key-a") and store.owned_by(shared, "key-a")
    blobs = {p.name for p in (store.root / "blobs").rglob("*") if p.is_file()}
    assert blobs == {store.get(a).sha256 for a in left}  # orphan_old's blob is gone too

    # retention 0: every conversation, then every artifact, goes
    report = collect_garbage(convs, store, retention_days=0)
    assert report.conversations_removed == 1 and not list(convs) and not store.list()
    assert not [p for p in (store.root / "blobs").rglob("*") if p.is_file()]


def test_switchboard_gc_command(tmp_path: Path) -> None:
    env = {**os.environ, "SWITCHBOARD_ARTIFACT_DIR": str(tmp_path / "a"),
           "SWITCHBOARD_CONVERSATIONS_DIR": str(tmp_path / "c")}
    env.pop("SWITCHBOARD_RETENTION_DAYS", None)
    store, convs = ArtifactStore(tmp_path / "a"), ConversationStore(tmp_path / "c")
    image = store.import_image(_png()).id
    _conv(convs, [image], age_days=2)
    kept = _conv(convs, [], age_days=0)
    cmd = [sys.executable, "-m", "orchestrator.cli", "gc"]

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "SWITCHBOARD_RETENTION_DAYS" in proc.stderr

    proc = subprocess.run([*cmd, "--json"], env={**env, "SWITCHBOARD_RETENTION_DAYS": "1"}, capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["conversations_removed"] == 1 and out["conversations_kept"] == 1
    assert out["artifacts_removed"] == 0  # the image is younger than the retention
    assert [c.id for c in convs] == [kept.id]

    proc = subprocess.run([*cmd, "--days", "0"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "removed 1 conversation(s) and 1 artifact(s)" in proc.stdout, proc.stdout
    assert not store.list() and not list(convs)


def test_conversations_dir_is_a_setting(tmp_path: Path) -> None:
    s = Settings(artifact_dir=tmp_path / "art")
    assert ConversationStore.from_settings(s).root == tmp_path / "conversations"
    s = Settings(artifact_dir=tmp_path / "art", conversations_dir=tmp_path / "elsewhere")
    conv = ConversationStore.from_settings(s).create("key-x")
    assert (tmp_path / "elsewhere" / f"{conv.id}.json").exists()


def test_owners_are_recorded_not_derived(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    a = store.import_image(_png()).id
    assert not store.owned_by(a, "key-a")
    store.claim(a, "key-a")
    assert store.owned_by(a, "key-a") and not store.owned_by(a, "key-b") and store.owners(a) == ["key-a"]
    assert not store.owned_by("../../etc/passwd", "key-a")
    with pytest.raises(ValueError):
        store.claim(a, "../escape")


def test_large_uploads_are_downscaled_once_and_the_original_kept(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, import_max_side=256)
    big = _png((1200, 300), (30, 60, 90))
    meta = store.import_image(big)
    assert (meta.width, meta.height) == (256, 64) and store.open_image(meta.id).size == (256, 64)
    original = store.get(meta.extra["original"])
    assert (original.width, original.height) == (1200, 300) and store.read_bytes(original.id) == big
    assert (meta.extra["original_width"], meta.extra["original_height"]) == (1200, 300)
    buf = io.BytesIO()
    Image.new("RGB", (900, 900), (5, 5, 5)).save(buf, format="JPEG")
    photo = store.import_image(buf.getvalue())
    assert photo.media_type == "image/jpeg" and (photo.width, photo.height) == (256, 256)
    small = store.import_image(_png((100, 50)))
    assert (small.width, small.height) == (100, 50) and "original" not in small.extra

    # a live conversation keeps the original of its (downscaled) image
    convs = ConversationStore(tmp_path / "conversations")
    _conv(convs, [meta.id], age_days=0)
    for m in store.list():
        _age(store, m.id, 5)
    collect_garbage(convs, store, retention_days=1)
    assert store.exists(meta.id) and store.exists(original.id) and not store.exists(photo.id)
