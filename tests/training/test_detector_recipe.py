"""The detector recipe runs end to end on a handful of scenes: data, one epoch, a loadable .pt, eval JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from switchboard.settings import get_settings
from training import detector


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SWITCHBOARD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SWITCHBOARD_DETECT_WEIGHTS", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "cache"
    get_settings.cache_clear()


def test_yolo_dataset_matches_the_shapes_world(tmp_path: Path) -> None:
    from training.shapes import SHAPES, make_scene, scene_seed

    data = detector.build_dataset(tmp_path / "ds", seed=5, n_train=3, n_val=1, size=128)
    assert "names:" in data.read_text()
    labels = (tmp_path / "ds" / "labels" / "train" / "000001.txt").read_text().split("\n")
    scene = make_scene(scene_seed(5, 1), size=128)
    rows = [line.split() for line in labels if line]
    assert len(rows) == len(scene.objects)
    for row, obj in zip(rows, scene.objects, strict=True):
        assert SHAPES[int(row[0])] == obj.shape
        x1, y1, x2, y2 = obj.box
        assert abs(float(row[1]) - (x1 + x2) / 256) < 1e-5 and abs(float(row[3]) - (x2 - x1) / 128) < 1e-5
    # a finished dataset is reused, not regenerated
    stamp = (tmp_path / "ds" / "images" / "train" / "000000.png").stat().st_mtime_ns
    detector.build_dataset(tmp_path / "ds", seed=5, n_train=3, n_val=1, size=128)
    assert (tmp_path / "ds" / "images" / "train" / "000000.png").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_one_epoch_smoke_training(tmp_cache: Path, tmp_path: Path, no_network, capsys) -> None:
    out = tmp_path / "out"
    args = ["--n-train", "8", "--epochs", "1", "--imgsz", "64", "--batch", "4", "--run-dir", str(tmp_path / "runs")]
    assert detector.main_train([*args, "--out", str(out)]) == 0
    weights = out / "best.pt"
    assert weights.exists() and weights.stat().st_size < 8e6

    from ultralytics import YOLO

    from training.shapes import SHAPES, make_scene

    model = YOLO(str(weights))
    assert list(model.names.values()) == list(SHAPES)
    model.predict(make_scene(1).image, imgsz=64, device="cpu", verbose=False)

    # a finished run cannot be resumed, and says so
    capsys.readouterr()
    assert detector.main_train([*args, "--resume"]) == 2
    assert "finished" in capsys.readouterr().err

    # the evaluation runs on held-out scenes and prints one JSON object
    assert detector.main_eval(["--weights", str(weights), "--n", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"map50", "map50_95", "colour_accuracy", "n_images", "weights"}
    assert res["n_images"] == 4 and 0.0 <= res["map50"] <= 1.0


def test_eval_refuses_missing_weights(tmp_cache: Path, tmp_path: Path, capsys) -> None:
    assert detector.main_eval(["--weights", str(tmp_path / "nope.pt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_resume_without_a_run_is_a_clear_error(tmp_cache: Path, tmp_path: Path, capsys) -> None:
    rc = detector.main_train(["--resume", "--n-train", "8", "--epochs", "1", "--run-dir", str(tmp_path / "runs")])
    assert rc == 2
    assert "nothing to resume" in capsys.readouterr().err
