"""Detector recipe: train and evaluate the detect expert's embedded YOLO on the shapes world.

The classes are the *shapes* only; colour is read from the pixels inside each box by the expert
(experts.detect.read_colour), which also works unchanged for real detectors ("the red car").

    switchboard train detector                      # the shipped model (see models/detector/MODEL_CARD.md)
    switchboard train detector --n-train 8 --epochs 1 --out /tmp/x     # a smoke run, seconds
    switchboard train detector --resume             # continue the last run from its last.pt
    switchboard eval detector --json                # mAP on held-out scenes, as JSON

Datasets are generated once into the cache (``Settings.cache_dir / "datasets"``) and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training.shapes import SHAPES, make_scene, scene_seed

DEFAULT_SEED = 0
DEFAULT_EVAL_SEED = 999_999  # dataset seeds differ, so held-out scenes never appear in training
DEFAULT_IMGSZ = 160
DEFAULT_EPOCHS = 40
DEFAULT_N_TRAIN = 3000
DEFAULT_N_VAL = 200
SCENE_SIZE = 256  # scenes are rendered at the shapes world's canonical size; YOLO resizes to imgsz
RUN_NAME = "detector"
DEFAULT_MODEL = "yolo11t"
# Extra ultralytics YOLO11 scales: [depth, width, max_channels]. "t" is yolo11n at half the width:
# 0.8M parameters, 1.7x faster to train on one CPU core, and plenty for five flat shapes.
EXTRA_SCALES: dict[str, list[float]] = {"yolo11t": [0.50, 0.125, 1024]}


def _settings():
    from switchboard.settings import get_settings

    return get_settings()


def _cpu_threads(n: int) -> None:
    """Cap intra-op threads (the machine is shared; one core trains fastest per core anyway)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


# -- data -------------------------------------------------------------------------------------------
def _write_split(root: Path, split: str, seeds: list[int], size: int, desc: str) -> None:
    from tqdm import tqdm

    img_dir, lbl_dir = root / "images" / split, root / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    cls = {s: i for i, s in enumerate(SHAPES)}
    for i, s in enumerate(tqdm(seeds, desc=desc, unit="img")):
        scene = make_scene(s, size=size)
        stem = f"{i:06d}"
        scene.image.save(img_dir / f"{stem}.png")
        lines = []
        for o in scene.objects:
            x1, y1, x2, y2 = o.box
            lines.append(f"{cls[o.shape]} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} "
                         f"{(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}")
        (lbl_dir / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


def build_dataset(root: Path, *, seed: int, n_train: int, n_val: int, size: int = SCENE_SIZE) -> Path:
    """Write a YOLO-format shapes dataset (train from scenes 0..n_train-1 of ``seed``, val after them).

    Returns the data.yaml path. A finished dataset is reused (its manifest records what it holds).
    """
    root = Path(root)
    manifest = {"seed": seed, "n_train": n_train, "n_val": n_val, "size": size, "names": list(SHAPES)}
    done = root / "manifest.json"
    data_yaml = root / "data.yaml"
    if done.exists() and json.loads(done.read_text()) == manifest and data_yaml.exists():
        return data_yaml
    if root.exists():
        shutil.rmtree(root)
    train_seeds = [scene_seed(seed, i) for i in range(n_train)]
    val_seeds = [scene_seed(seed, n_train + i) for i in range(n_val)]
    _write_split(root, "train", train_seeds, size, "train scenes")
    if n_val:
        _write_split(root, "val", val_seeds, size, "val scenes")
    names = "\n".join(f"  {i}: {s}" for i, s in enumerate(SHAPES))
    data_yaml.write_text(f"path: {root.resolve()}\ntrain: images/train\n"
                         f"val: images/{'val' if n_val else 'train'}\nnames:\n{names}\n")
    done.write_text(json.dumps(manifest))
    return data_yaml


def dataset_dir(kind: str, seed: int, n: int, size: int = SCENE_SIZE) -> Path:
    return _settings().cache_dir / "datasets" / f"shapes-yolo-{kind}-s{seed}-n{n}-{size}"


# -- training ---------------------------------------------------------------------------------------
def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchboard train detector",
                                description="Train the detect expert's YOLO on shapes-world scenes (CPU).")
    p.add_argument("--out", type=Path, default=None, help="where best.pt goes (default: models/detector/)")
    p.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help=f"training scenes (default {DEFAULT_N_TRAIN})")
    p.add_argument("--n-val", type=int, default=None,
                   help=f"validation scenes (default {DEFAULT_N_VAL}, or n-train//4 for tiny runs)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--hours", type=float, default=None, help="train for this many hours instead (overrides epochs)")
    p.add_argument("--imgsz", type=int, default=DEFAULT_IMGSZ, help=f"input size (default {DEFAULT_IMGSZ})")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"ultralytics model yaml, or one of {', '.join(EXTRA_SCALES)} (default {DEFAULT_MODEL})")
    p.add_argument("--close-mosaic", type=int, default=None,
                   help="last epochs without mosaic augmentation (default min(10, epochs/5))")
    p.add_argument("--lr0", type=float, default=None,
                   help="AdamW learning rate (default: ultralytics' automatic choice, 0.0011 for 5 classes)")
    p.add_argument("--warmup-epochs", type=float, default=3.0, help="learning-rate warmup (default 3)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"dataset and training seed (default {DEFAULT_SEED})")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last.pt (give the arguments it was started with)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="ultralytics project dir (default: <cache>/runs/detector)")
    return p


def main_train(argv: list[str] | None = None) -> int:
    """``switchboard train detector``: generate data, train with ultralytics, copy best.pt to --out."""
    a = _train_parser().parse_args(argv)
    if a.n_train < 1 or a.epochs < 1 or a.imgsz < 32:
        print("train detector: --n-train and --epochs must be >= 1 and --imgsz >= 32", file=sys.stderr)
        return 2
    from experts.detect import prepare_ultralytics

    settings = _settings()
    prepare_ultralytics(settings)
    _cpu_threads(a.threads)
    out = Path(a.out) if a.out else settings.models_dir / "detector"
    project = Path(a.run_dir) if a.run_dir else settings.cache_dir / "runs" / "detector"
    n_val = a.n_val if a.n_val is not None else min(DEFAULT_N_VAL, max(1, a.n_train // 4))
    length = f"h{a.hours:g}" if a.hours else f"e{a.epochs}"
    run_name = f"{RUN_NAME}-s{a.seed}-n{a.n_train}-{length}-i{a.imgsz}"
    if a.model != DEFAULT_MODEL:  # e.g. fine-tuning from an earlier best.pt
        run_name += f"-from-{Path(a.model).stem}"
    last = project / run_name / "weights" / "last.pt"

    from ultralytics import YOLO

    t0 = time.time()
    if a.resume:
        if not last.exists():
            runs = sorted(p.parent.parent.name for p in project.glob("*/weights/last.pt"))
            print(f"train detector: nothing to resume: {last} does not exist. Resume with the arguments the "
                  f"run was started with; runs in {project}: {', '.join(runs) or '(none)'}", file=sys.stderr)
            return 2
        import torch

        # a finished run's last.pt has its optimizer stripped; ultralytics would then silently start a new
        # run on its default dataset (a download), so refuse here
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        if ckpt.get("optimizer") is None or int(ckpt.get("epoch", -1)) < 0:
            print(f"train detector: cannot resume {last}: that run is finished (its best.pt is in "
                  f"{last.parent}); start a new run without --resume", file=sys.stderr)
            return 2
        del ckpt
        model = YOLO(str(last))
        _keep_threads(model, a.threads)
        model.train(resume=True, device="cpu", workers=0, **({"time": a.hours} if a.hours else {}))
    else:
        data = build_dataset(dataset_dir("train", a.seed, a.n_train), seed=a.seed, n_train=a.n_train, n_val=n_val)
        model = YOLO(model_config(a.model))
        _keep_threads(model, a.threads)
        model.train(
            data=str(data), epochs=a.epochs, time=a.hours, imgsz=a.imgsz, batch=a.batch, device="cpu",
            workers=0, seed=a.seed, deterministic=True, project=str(project), name=run_name, exist_ok=True,
            amp=False, plots=False, cache="ram", val=True,
            # a .pt is fine-tuned from its weights; a yaml starts from scratch
            pretrained=str(a.model).endswith(".pt"), patience=max(a.epochs, 100),
            # left-right flips keep every shape what it is; up-down flips would make downward triangles,
            # which the world never draws. Hue shifts are off: colour is not the detector's job.
            fliplr=0.5, flipud=0.0, hsv_h=0.0, warmup_epochs=a.warmup_epochs, verbose=True,
            **({"optimizer": "AdamW", "lr0": a.lr0} if a.lr0 else {}),
            close_mosaic=a.close_mosaic if a.close_mosaic is not None else min(10, max(0, a.epochs // 5)),
        )
    import torch

    torch.use_deterministic_algorithms(False)  # ultralytics' deterministic=True is process-global
    trainer = model.trainer
    save_dir = Path(trainer.save_dir) if trainer is not None else last.parent.parent
    best = save_dir / "weights" / "best.pt"
    if not best.exists():
        best = save_dir / "weights" / "last.pt"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(best, out / "best.pt")
    minutes = (time.time() - t0) / 60
    print(f"trained in {minutes:.1f} min; weights: {out / 'best.pt'} ({(out / 'best.pt').stat().st_size / 1e6:.1f} MB); "
          f"curve: {save_dir / 'results.csv'}", file=sys.stderr)
    return 0


def model_config(name: str) -> str:
    """An ultralytics model yaml: ``name`` itself, or a generated yaml for one of EXTRA_SCALES."""
    if name not in EXTRA_SCALES:
        return name
    import yaml
    from ultralytics.utils import ROOT

    cfg = yaml.safe_load((ROOT / "cfg" / "models" / "11" / "yolo11.yaml").read_text())
    cfg["scales"] = {name[-1]: EXTRA_SCALES[name]}  # the only scale, so ultralytics picks it
    path = _settings().cache_dir / "ultralytics-models" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def _keep_threads(model: Any, n: int) -> None:
    # ultralytics' select_device resets torch threads to cpu_count-1; put our cap back before training
    model.add_callback("on_pretrain_routine_end", lambda trainer: _cpu_threads(n))


# -- evaluation -------------------------------------------------------------------------------------
def _box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def evaluate(weights: Path, *, n: int = 200, seed: int = DEFAULT_EVAL_SEED, imgsz: int | None = None,
             threads: int = 1) -> dict[str, Any]:
    """mAP (ultralytics val) and colour accuracy on ``n`` held-out scenes of dataset seed ``seed``.

    Colour accuracy: of the ground-truth objects found by a detection of the right shape (IoU >= 0.5,
    confidence >= 0.25), the fraction whose colour the expert reads correctly from the pixels.
    """
    from experts.colour import read_colour
    from experts.detect import prepare_ultralytics

    settings = _settings()
    prepare_ultralytics(settings)
    _cpu_threads(threads)
    from ultralytics import YOLO

    weights = Path(weights)
    model = YOLO(str(weights))
    train_args = getattr(model, "ckpt", {}) and model.ckpt.get("train_args", {}) or {}
    trained_on = str(train_args.get("data", ""))
    if f"-s{seed}-" in trained_on and "-train-" in trained_on:
        raise ValueError(f"eval seed {seed} is the seed this model was trained on ({trained_on}); pick another")
    imgsz = imgsz or int(train_args.get("imgsz", DEFAULT_IMGSZ))
    data = build_dataset(dataset_dir("eval", seed, n), seed=seed, n_train=n, n_val=0)
    project = settings.cache_dir / "runs" / "detector-eval"
    metrics = model.val(data=str(data), split="val", imgsz=imgsz, batch=16, device="cpu", workers=0,
                        plots=False, project=str(project), name="eval", exist_ok=True, verbose=False,
                        conf=0.001, iou=0.7)
    _cpu_threads(threads)

    # colour, read the way the expert reads it, on confident detections matched to ground truth
    names = model.names
    right = matched = 0
    seeds = [scene_seed(seed, i) for i in range(n)]
    for start in range(0, n, 16):
        scenes = [make_scene(s, size=SCENE_SIZE) for s in seeds[start:start + 16]]
        preds = model.predict([sc.image for sc in scenes], imgsz=imgsz, conf=0.25, device="cpu", verbose=False)
        for scene, pred in zip(scenes, preds, strict=True):
            boxes = pred.boxes.xyxy.tolist()
            labels = [names[int(c)] for c in pred.boxes.cls.tolist()]
            for obj in scene.objects:
                cands = [(_box_iou(list(obj.box), b), b) for b, lab in zip(boxes, labels, strict=True)
                         if lab == obj.shape]
                if not cands:
                    continue
                iou, b = max(cands, key=lambda t: t[0])
                if iou < 0.5:
                    continue
                matched += 1
                right += read_colour(scene.image, b) == obj.colour
    return {
        "map50": round(float(metrics.box.map50), 4),
        "map50_95": round(float(metrics.box.map), 4),
        "precision": round(float(metrics.box.mp), 4),
        "recall": round(float(metrics.box.mr), 4),
        "colour_accuracy": round(right / matched, 4) if matched else 0.0,
        "n_images": n,
        "n_objects_matched": matched,
        "seed": seed,
        "imgsz": imgsz,
        "weights": str(weights),
    }


@contextlib.contextmanager
def _quiet_stdout(enabled: bool) -> Iterator[None]:
    """Send prints and ultralytics' stdout log handler to stderr while active."""
    if not enabled:
        yield
        return
    import logging

    moved = []
    for handler in logging.getLogger("ultralytics").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            moved.append((handler, handler.setStream(sys.stderr)))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler, stream in moved:
            handler.setStream(stream)


def main_eval(argv: list[str] | None = None) -> int:
    """``switchboard eval detector [--weights PATH] [--n 200] [--seed 999999] [--json]``."""
    p = argparse.ArgumentParser(prog="switchboard eval detector",
                                description="Evaluate a detector on held-out shapes-world scenes.")
    p.add_argument("--weights", type=Path, default=None,
                   help="ultralytics .pt (default: SWITCHBOARD_DETECT_WEIGHTS or models/detector/best.pt)")
    p.add_argument("--n", type=int, default=200, help="held-out scenes (default 200)")
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, help=f"dataset seed (default {DEFAULT_EVAL_SEED})")
    p.add_argument("--imgsz", type=int, default=None, help="input size (default: the size it was trained at)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    settings = _settings()
    weights = a.weights or settings.detect_weights or settings.models_dir / "detector" / "best.pt"
    if not Path(weights).exists():
        print(f"eval detector: weights not found: {weights} (train with `switchboard train detector`)",
              file=sys.stderr)
        return 2
    if a.n < 1:
        print("eval detector: --n must be >= 1", file=sys.stderr)
        return 2
    try:
        # ultralytics logs to stdout; with --json, stdout must hold nothing but the JSON
        from experts.detect import prepare_ultralytics

        prepare_ultralytics(settings)
        import ultralytics  # noqa: F401  (creates its log handler now, so _quiet_stdout can move it)

        with _quiet_stdout(a.json):
            res = evaluate(Path(weights), n=a.n, seed=a.seed, imgsz=a.imgsz, threads=a.threads)
    except ValueError as e:
        print(f"eval detector: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>18}: {v}")
    return 0
