"""The segment expert's run_batch: every kind of prompt in one batch gives exactly what run() gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from experts.segment import WEIGHTS_FILE, SegmentArgs, SegmentExpert
from switchboard.artifacts import ArtifactStore
from switchboard.expert import RunContext
from switchboard.registry import get_registry
from switchboard.settings import get_settings
from training.shapes import make_scene

pytestmark = pytest.mark.usefixtures("no_network")
SHIPPED = get_settings().models_dir / "segmenter"


def test_run_batch_matches_run_for_every_prompt_kind(tmp_path: Path) -> None:
    if not (SHIPPED / WEIGHTS_FILE).exists():
        pytest.skip("models/segmenter not trained")
    store = ArtifactStore(tmp_path / "artifacts")
    scenes = [make_scene(s) for s in (7, 11, 12)]
    ids = [store.put_image(sc.image).id for sc in scenes]
    gt = store.put_json({"image": ids[1], "width": 256, "height": 256, "boxes": [
        {"xyxy": list(o.box), "label": o.label} for o in scenes[1].objects]}, kind="boxes").id
    empty = store.put_json({"image": ids[2], "width": 256, "height": 256, "boxes": []}, kind="boxes").id
    calls = [
        {"image": ids[0], "points": [[500, 500]]},
        {"image": ids[1], "boxes": gt},
        {"image": ids[0], "points": [[250, 250], [500, 500]], "labels": [1, 0]},  # another point count
        {"image": ids[2], "points": [[400, 600]], "multimask": True},
        {"image": ids[2], "boxes": empty},
        {"image": ids[1], "target": "the largest shape"},
        {"image": ids[1], "boxes": gt, "multimask": True},
    ]
    items = [(SegmentArgs.model_validate(c), RunContext(store, call_id=f"c{i}", registry=get_registry())) for i, c in enumerate(calls)]
    batched = SegmentExpert()
    encoded: list[int] = []
    batched.ensure_setup()
    batched.runner.sam.image_encoder.register_forward_hook(lambda m, i, o: encoded.append(i[0].shape[0]))
    got = batched.run_batch(items)
    assert sorted(encoded) == [1, 2]  # three distinct images, two at a time on the CPU
    single = SegmentExpert()
    for (args, ctx), res in zip(items, got, strict=True):
        want = single(args, ctx)
        assert res.model_dump() == want.model_dump(), args
    assert len(got[1].objects) == len(scenes[1].objects) and got[4].objects == []
    assert len(got[3].objects[0].candidates) == 2  # multimask: the other two candidates
