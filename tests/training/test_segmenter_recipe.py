"""The segmenter recipe trains (a few tiny steps), resumes, and writes weights the expert can load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experts.sam_model import CONFIG_FILE, WEIGHTS_FILE, load_small_sam
from experts.segment import SegmentExpert
from switchboard.artifacts import ArtifactStore
from switchboard.expert import RunContext
from training import segmenter
from training.shapes import make_scene

pytestmark = pytest.mark.usefixtures("no_network")


def test_smoke_training_writes_loadable_weights(tmp_path: Path) -> None:
    out, work = tmp_path / "segmenter", tmp_path / "run"
    assert segmenter.main_train(["--smoke", "--steps", "2", "--out", str(out), "--work-dir", str(work)]) == 0
    assert (out / WEIGHTS_FILE).stat().st_size < 2_000_000
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["training"]["steps"] == 2 and cfg["training"]["smoke"] is True
    sam = load_small_sam(out)
    assert sam.image_encoder.img_size == cfg["img_size"]

    # resuming continues from the checkpoint instead of starting over
    assert segmenter.main_train(["--smoke", "--steps", "4", "--out", str(out), "--work-dir", str(work),
                                 "--resume", "auto"]) == 0
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert json.loads((out / CONFIG_FILE).read_text())["training"]["steps"] == 4

    # the expert runs on what was written
    store = ArtifactStore(tmp_path / "artifacts")
    image = store.put_image(make_scene(3).image).id
    res = SegmentExpert(weights_dir=out)({"image": image, "points": [[500, 500]]}, RunContext(store))
    mask = np.asarray(store.open_image(res.objects[0].mask, mode="L"))
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}


def test_export_from_checkpoint(tmp_path: Path) -> None:
    work = tmp_path / "run"
    assert segmenter.main_train(["--smoke", "--steps", "2", "--out", str(tmp_path / "a"), "--work-dir", str(work)]) == 0
    assert segmenter.main_train(["--export-from", str(work / "last.pt"), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / CONFIG_FILE).read_text())["training"]["steps"] == 2
    load_small_sam(tmp_path / "b")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert segmenter.main_train(["--smoke", "--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w"),
                                 "--resume", "auto"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_eval_refuses_the_training_seed(capsys: pytest.CaptureFixture) -> None:
    assert segmenter.main_eval(["--seed", str(segmenter.TRAIN_SEED)]) == 2
    assert "training seed" in capsys.readouterr().err


def test_points_are_inside_and_boxes_jitter_stays_in_the_image() -> None:
    rng = np.random.default_rng(0)
    scene = make_scene(5)
    for obj in scene.objects:
        for centre in (True, False):
            x, y = segmenter.interior_point(obj.mask, rng, centre=centre).astype(int)
            assert obj.mask[y, x]
        box = segmenter.mask_box(obj.mask)
        for _ in range(20):
            j = segmenter.jitter_box(box, rng, 256)
            assert (0 <= j).all() and (j <= 256).all() and j[2] > j[0] and j[3] > j[1]
            assert np.abs(j - box).max() <= 8
