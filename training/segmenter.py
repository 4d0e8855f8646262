"""Train and evaluate the embedded segmenter: a small SAM on the shapes world.

    switchboard train segmenter --steps 5000 --out models/segmenter      # ~1 step/s on one core
    switchboard train segmenter --resume auto                             # continue from the last checkpoint
    switchboard train segmenter --smoke --out /tmp/seg                    # a few steps (CI)
    switchboard eval segmenter --json                                     # held-out seed: box, point, text mIoU

The recipe (why it looks like this):
- The model is ``segment_anything.modeling`` with small dims (see ``experts.sam_model.SmallSamConfig``):
  a patch-16 ViT at 256 px gives a 16x16 embedding and 64x64 decoder masks. Patch 8 is ~4.5x slower per
  step, so instead the loss is computed at the full 256 px (decoder logits upsampled bilinearly, as at
  inference), which teaches sub-cell boundaries where the ground truth is.
- The image encoder is the expensive part and the decoder is cheap, so every object of every image is
  prompted twice per step (a jittered box and 1-3 points), which amortises one encoder pass over ~7
  prompts.
- Token 0 learns every prompt; the three multimask tokens learn with SAM's min-over-outputs loss (so
  `multimask` gives sensible candidates); the IoU head regresses each token's real IoU.
  Mask loss: 20 x focal + dice, at 128 px against area-averaged (soft) ground truth.
- Points are drawn half at random inside the object (away from the edge) and half near the point
  farthest from the edge (distance-transform maximum); sometimes a negative point on the background.
- Scenes come from ``training.shapes`` (dataset seed ``--seed``), generated into a growing pool (one new
  scene per step) with the eight flips/rotations, so data generation costs little time per step.
- AdamW, linear warm-up then cosine decay; gradient clipping. One thread by default (shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from experts.sam_model import CONFIG_FILE, WEIGHTS_FILE, SmallSamConfig, build_small_sam, load_small_sam
from experts.sam_runner import SamRunner, load_small_runner

TRAIN_SEED = 0      # dataset seed of the training scenes
VAL_SEED = 2        # dataset seed of the small validation set logged during training
# held-out dataset seed of `switchboard eval segmenter`: the project's held-out seed, which neither this
# model nor the detector that grounds text targets has trained on (the detector trains on seeds 0 and 1)
EVAL_SEED = 999_999


# -- data ---------------------------------------------------------------------------------------------
class ScenePool:
    """Shapes-world scenes kept in memory (image + packed masks); grows by one scene per ``grow()``."""

    def __init__(self, seed: int, start: int, size: int, capacity: int) -> None:
        self.seed, self.next_index, self.size, self.capacity = seed, start, size, capacity
        self.images: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []  # n x packed bits
        self._slot = 0

    def grow(self, n: int = 1) -> None:
        from training.shapes import make_scene, scene_seed

        for _ in range(n):
            scene = make_scene(scene_seed(self.seed, self.next_index), size=self.size)
            self.next_index += 1
            img = np.asarray(scene.image, np.uint8)
            packed = np.packbits(np.stack([o.mask for o in scene.objects]), axis=-1)
            if len(self.images) < self.capacity:
                self.images.append(img)
                self.masks.append(packed)
            else:  # replace the oldest
                self.images[self._slot], self.masks[self._slot] = img, packed
                self._slot = (self._slot + 1) % self.capacity

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random scene under a random flip/rotation: image HxWx3 and masks n x H x W bool."""
        i = int(rng.integers(len(self.images)))
        img = self.images[i]
        masks = np.unpackbits(self.masks[i], axis=-1, count=self.size).astype(bool)
        k = int(rng.integers(4))
        img, masks = np.rot90(img, k, axes=(0, 1)), np.rot90(masks, k, axes=(1, 2))
        if rng.random() < 0.5:
            img, masks = img[:, ::-1], masks[:, :, ::-1]
        return np.ascontiguousarray(img), np.ascontiguousarray(masks)


def mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def jitter_box(box: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """SAM's box noise scaled to 256 px: std 8% of the side, at most 8 px per coordinate."""
    if rng.random() < 0.25:
        return box.copy()
    w, h = box[2] - box[0], box[3] - box[1]
    noise = rng.normal(0, 0.08, 4) * np.array([w, h, w, h])
    out = box + np.clip(noise, -8, 8)
    out = np.clip(out, 0, size)
    if out[2] - out[0] < 2 or out[3] - out[1] < 2:
        return box.copy()
    return out.astype(np.float32)


def _crop(mask: np.ndarray, margin: int) -> tuple[np.ndarray, int, int]:
    """The mask's bounding region plus ``margin`` (distance transforms on a crop are ~20x cheaper)."""
    ys, xs = np.nonzero(mask)
    y0, x0 = max(0, ys.min() - margin), max(0, xs.min() - margin)
    y1, x1 = min(mask.shape[0], ys.max() + 1 + margin), min(mask.shape[1], xs.max() + 1 + margin)
    return mask[y0:y1, x0:x1], x0, y0


def interior_point(mask: np.ndarray, rng: np.random.Generator, *, centre: bool, min_dist: float = 3.0) -> np.ndarray:
    """A pixel inside ``mask``: near the distance-transform maximum (``centre``) or at random among
    pixels at least ``min_dist`` from the edge (any pixel of the mask if none are)."""
    from scipy.ndimage import distance_transform_edt

    crop, x0, y0 = _crop(mask, 1)
    dist = distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    if centre:
        ys, xs = np.nonzero(dist >= dist.max() * 0.8)
    else:
        ys, xs = np.nonzero(dist >= min_dist)
        if len(xs) == 0:
            ys, xs = np.nonzero(crop)
    j = int(rng.integers(len(xs)))
    return np.array([xs[j] + x0, ys[j] + y0], np.float32)


def sample_points(mask: np.ndarray, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` positive points (the first one centre-ish half the time), the last one sometimes
    replaced by a negative point just outside the object."""
    pts = [interior_point(mask, rng, centre=rng.random() < 0.5)]
    pts += [interior_point(mask, rng, centre=False, min_dist=2.0) for _ in range(k - 1)]
    labels = [1] * k
    if k > 1 and rng.random() < 0.3:
        from scipy.ndimage import binary_dilation

        crop, x0, y0 = _crop(mask, 8)
        ring = binary_dilation(crop, iterations=6) & ~crop
        ys, xs = np.nonzero(ring)
        if len(xs):
            j = int(rng.integers(len(xs)))
            pts[-1] = np.array([xs[j] + x0, ys[j] + y0], np.float32)
            labels[-1] = 0
    return np.stack(pts), np.array(labels, np.int64)


# -- losses -------------------------------------------------------------------------------------------
def focal_loss(logits, target, alpha: float = 0.25, gamma: float = 2.0):
    import torch.nn.functional as F

    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1)


def dice_loss(logits, target):
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)


def mask_iou(logits, target):
    pred = (logits > 0).flatten(1).float()
    t = target.flatten(1)
    inter = (pred * t).sum(1)
    union = pred.sum(1) + t.sum(1) - inter
    return inter / union.clamp(min=1)


# -- one training step -----------------------------------------------------------------------------
def make_batch(pool: ScenePool, rng: np.random.Generator, batch: int, size: int,
               p_box: float = 0.5) -> list[dict[str, Any]]:
    """``batch`` scenes; every object gets one prompt: a jittered box (``p_box``) or 1-3 points."""
    items = []
    for _ in range(batch):
        img, masks = pool.sample(rng)
        n = len(masks)
        is_box = rng.random(n) < p_box
        ks = np.where(is_box, 0, rng.choice([1, 2, 3], size=n, p=[0.7, 0.2, 0.1]))
        boxes = np.stack([jitter_box(mask_box(m), rng, size) for m in masks])
        kmax = max(1, int(ks.max()))
        pts = np.zeros((n, kmax, 2), np.float32)
        labels = -np.ones((n, kmax), np.int64)  # -1 = padding ("not a point")
        for j in np.nonzero(~is_box)[0]:
            p, lab = sample_points(masks[j], rng, int(ks[j]))
            pts[j, :ks[j]], labels[j, :ks[j]] = p, lab
        items.append({"image": img, "masks": masks, "boxes": boxes, "points": pts, "labels": labels,
                      "is_box": is_box, "single": ks == 1})
    return items


def step_loss(sam, items: list[dict[str, Any]], loss_size: int = 128):
    """Loss and stats of one batch; see the module docstring for the recipe."""
    import torch
    import torch.nn.functional as F

    imgs = torch.stack([sam.preprocess(torch.from_numpy(it["image"]).permute(2, 0, 1).float()) for it in items])
    feats = sam.image_encoder(imgs)
    pe = sam.prompt_encoder.get_dense_pe()
    size = sam.image_encoder.img_size
    pad = sam.prompt_encoder.not_a_point_embed.weight
    losses, ious_box, ious_pt = [], [], []
    for i, it in enumerate(items):
        is_box = torch.from_numpy(it["is_box"])
        bi, pi = is_box.nonzero()[:, 0], (~is_box).nonzero()[:, 0]
        parts, dense = [], None
        if len(bi):
            sp, dense = sam.prompt_encoder(points=None, boxes=torch.from_numpy(it["boxes"])[bi], masks=None)
            parts.append(sp)
        if len(pi):
            pts = (torch.from_numpy(it["points"])[pi], torch.from_numpy(it["labels"])[pi])
            sp, dense_p = sam.prompt_encoder(points=pts, boxes=None, masks=None)
            parts.append(sp)
            dense = dense_p if dense is None else dense
        # pad the shorter token list with "not a point" so both prompt kinds decode in one call
        length = max(p.shape[1] for p in parts)
        parts = [p if p.shape[1] == length else torch.cat([p, pad.expand(p.shape[0], length - p.shape[1], -1)], 1)
                 for p in parts]
        sparse = torch.cat(parts)
        order = torch.cat([bi, pi])
        dense = dense[:1].expand(len(order), -1, -1, -1)
        low, iou_pred = sam.mask_decoder.predict_masks(feats[i:i + 1], pe, sparse, dense)
        # ground truth at the loss resolution as soft (area-averaged) targets: the logits are
        # upsampled bilinearly like at inference, so the decoder learns sub-cell boundaries
        gt_full = torch.from_numpy(it["masks"])[order].float()
        gt = F.adaptive_avg_pool2d(gt_full[:, None], loss_size)[:, 0] if loss_size != size else gt_full
        up0 = F.interpolate(low[:, :1], (loss_size, loss_size), mode="bilinear", align_corners=False)[:, 0]
        iou0 = mask_iou(up0.detach(), (gt > 0.5).float())
        # SAM's ambiguity-aware loss on the three multimask outputs: only the best one learns. Applied
        # to every prompt, so `multimask` is meaningful for boxes too; token 0 learns every prompt.
        upm = F.interpolate(low[:, 1:], (loss_size, loss_size), mode="bilinear", align_corners=False)
        lm = torch.stack([20 * focal_loss(upm[:, t], gt) + dice_loss(upm[:, t], gt) for t in range(3)], 1)
        per_prompt = 20 * focal_loss(up0, gt) + dice_loss(up0, gt) + lm.min(1).values
        hard = (gt > 0.5).float()
        iou_targets = torch.stack([iou0] + [mask_iou(upm[:, t].detach(), hard) for t in range(3)], 1)
        l_iou = ((iou_pred - iou_targets) ** 2).mean(1)
        losses.append(per_prompt + l_iou)
        nb = len(bi)
        ious_box.append(iou0[:nb])
        ious_pt.append(iou0[nb:])
    loss = torch.cat(losses).mean()
    ib, ip = torch.cat(ious_box), torch.cat(ious_pt)
    return loss, float(ib.mean()) if len(ib) else float("nan"), float(ip.mean()) if len(ip) else float("nan")


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.02) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# -- evaluation --------------------------------------------------------------------------------------
def iou_np(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def eval_prompts(runner: SamRunner, seed: int, n: int, size: int = 256) -> dict[str, float]:
    """Box and point mIoU (mean over objects) on ``n`` scenes of dataset ``seed``.

    Boxes are the ground-truth boxes; the point is one pixel chosen at random (seeded) among those at
    least 3 px inside the object (``miou_point``), or the distance-transform maximum (``miou_point_centre``).
    """
    from training.shapes import make_scene, scene_seed

    rng = np.random.default_rng(seed)
    box, point, centre, small = [], [], [], []
    for i in range(n):
        scene = make_scene(scene_seed(seed, i), size=size)
        (emb,) = runner.encode([np.asarray(scene.image)])
        gts = [o.mask for o in scene.objects]
        boxes = np.stack([mask_box(m) for m in gts])
        mb, _ = runner.predict(emb, boxes=boxes)
        pts = np.stack([interior_point(m, rng, centre=False) for m in gts])[:, None]
        mp, _ = runner.predict(emb, points=pts, labels=np.ones((len(gts), 1)))
        cpts = np.stack([interior_point(m, rng, centre=True) for m in gts])[:, None]
        mc, _ = runner.predict(emb, points=cpts, labels=np.ones((len(gts), 1)))
        for j, g in enumerate(gts):
            box.append(iou_np(mb[j, 0], g))
            point.append(iou_np(mp[j, 0], g))
            centre.append(iou_np(mc[j, 0], g))
            if g.sum() < 0.01 * size * size:
                small.append(box[-1])
    return {"miou_box": float(np.mean(box)), "miou_point": float(np.mean(point)),
            "miou_point_centre": float(np.mean(centre)),
            "miou_box_small": float(np.mean(small)) if small else float("nan"), "objects": len(box)}


def eval_text(seed: int, n: int, weights: Path | None, size: int = 256) -> dict[str, Any]:
    """mIoU of referring expressions segmented through the segment expert's ``target`` path (via detect)."""
    import tempfile

    from experts.segment import SegmentExpert
    from switchboard.artifacts import ArtifactStore
    from switchboard.expert import RunContext
    from switchboard.registry import get_registry
    from switchboard.settings import get_settings
    from training.shapes import make_scene, scene_seed

    registry = get_registry()
    if "detect" not in registry:  # not installed as an entry point (e.g. a source checkout mid-change)
        from experts.detect import DetectExpert

        registry.register(DetectExpert, "switchboard")
    expert = SegmentExpert(weights_dir=weights)
    ious: list[float] = []
    right: list[bool] = []
    unresolved, errors = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(Path(tmp))
        for i in range(n):
            scene = make_scene(scene_seed(seed, i), size=size)
            image_id = store.put_image(scene.image).id
            for text, j in scene.referring:
                try:
                    res = expert({"image": image_id, "target": text}, RunContext(store, call_id=f"e{i}", registry=get_registry()))
                except Exception as e:  # a crash scores 0 and is reported
                    errors.append(f"{text!r} (scene {i}): {type(e).__name__}: {e}")
                    ious.append(0.0)
                    continue
                if not res.objects:  # "no red circle found": scores 0
                    unresolved += 1
                    ious.append(0.0)
                    continue
                mask = np.asarray(store.open_image(res.artifacts[0].id, mode="L")) > 127
                per_object = [iou_np(mask, o.mask) for o in scene.objects]
                ious.append(per_object[j])
                right.append(int(np.argmax(per_object)) == j)
    detect_cls = type(registry.instance("detect"))
    weights_of = getattr(detect_cls, "weights_path", None)
    return {"miou_text": float(np.mean(ious)) if ious else float("nan"), "expressions": len(ious),
            "text_right_object": float(np.sum(right) / max(1, len(ious))),
            "detector": str(weights_of(get_settings())) if weights_of else detect_cls.__name__,
            "text_unresolved": unresolved, "text_errors": len(errors), "text_error_examples": errors[:5]}


# -- CLI ----------------------------------------------------------------------------------------------
def _default_out() -> Path:
    from switchboard.settings import get_settings

    return get_settings().models_dir / "segmenter"


def _default_work() -> Path:
    from switchboard.settings import get_settings

    return get_settings().cache_dir / "segmenter-run"


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_weights(sam, cfg: SmallSamConfig, out: Path, meta: dict[str, Any]) -> None:
    """Write the shipped form: a half-precision state dict and the config (plus training metadata)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half() if v.is_floating_point() else v for k, v in sam.state_dict().items()}
    _atomic_save(state, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), "training": meta}, indent=2) + "\n")


def _export_checkpoint(checkpoint: Path, out: Path) -> int:
    import torch

    if not checkpoint.exists():
        print(f"switchboard train segmenter: no checkpoint at {checkpoint}", file=sys.stderr)
        return 2
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = SmallSamConfig(**ck["config"])
    sam = build_small_sam(cfg)
    sam.load_state_dict(ck["model"])
    args = ck.get("args", {})
    meta = {"steps": ck["step"], "planned_steps": args.get("steps"), "batch": args.get("batch"),
            "lr": args.get("lr"), "warmup": args.get("warmup"), "dataset_seed": args.get("seed"),
            "scenes_seen": ck.get("pool_next"), "params": sum(p.numel() for p in sam.parameters()),
            "minutes": round(ck.get("elapsed", 0.0) / 60, 1), "smoke": bool(args.get("smoke"))}
    export_weights(sam.eval(), cfg, out, meta)
    (out / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ck["history"]))
    print(f"wrote {out / WEIGHTS_FILE} from {checkpoint} (step {ck['step']})", file=sys.stderr)
    return 0


def main_train(argv: list[str]) -> int:
    """``switchboard train segmenter``: see the module docstring."""
    p = argparse.ArgumentParser(prog="switchboard train segmenter", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="where the shipped weights go (default models/segmenter)")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints and log (default .cache/segmenter-run)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=8, help="images per step (every object is prompted)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=250)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help="dataset seed of the training scenes")
    p.add_argument("--pool", type=int, default=6000, help="scenes kept in memory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--resume", default=None, help="a checkpoint to continue from, or 'auto' (work-dir/last.pt)")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=500, help="validation mIoU every N steps (0: never)")
    p.add_argument("--eval-scenes", type=int, default=48)
    p.add_argument("--config", type=Path, default=None, help="a SmallSamConfig json (default dims otherwise)")
    p.add_argument("--smoke", action="store_true", help="tiny dims, batch 2, 3 steps (unless --steps): for CI")
    p.add_argument("--export-from", type=Path, default=None,
                   help="only write the shipped weights (--out) from this training checkpoint, then stop")
    a = p.parse_args(argv)

    if a.export_from is not None:
        return _export_checkpoint(a.export_from, a.out or _default_out())
    if a.smoke:
        if "--steps" not in argv:
            a.steps = 3
        a.batch, a.warmup, a.checkpoint_every, a.eval_every = 2, 1, 2, 0
    out = a.out or (_default_work().parent / "segmenter-smoke" if a.smoke else _default_out())
    work = a.work_dir or (out / ".run" if a.smoke else _default_work())
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    from tqdm import tqdm

    torch.set_num_threads(a.threads)
    cfg = SmallSamConfig.from_json(a.config) if a.config else SmallSamConfig()
    if a.smoke and a.config is None:  # tiny dims so CI trains a few steps in seconds
        cfg = SmallSamConfig(img_size=128, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                             encoder_global_attn_indexes=[0], prompt_embed_dim=32, decoder_mlp_dim=64,
                             decoder_num_heads=2, iou_head_hidden_dim=32)
    torch.manual_seed(a.seed)
    sam = build_small_sam(cfg)
    sam.train()
    opt = torch.optim.AdamW(sam.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    start, history, elapsed = 0, [], 0.0
    rng = np.random.default_rng(a.seed)
    pool_start = 0
    resume = (work / "last.pt") if a.resume == "auto" else (Path(a.resume) if a.resume else None)
    if resume is not None:
        if not resume.exists():
            print(f"switchboard train segmenter: no checkpoint at {resume}", file=sys.stderr)
            return 2
        ck = torch.load(resume, map_location="cpu", weights_only=False)
        cfg = SmallSamConfig(**ck["config"])
        sam = build_small_sam(cfg)
        sam.load_state_dict(ck["model"])
        sam.train()
        opt = torch.optim.AdamW(sam.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        opt.load_state_dict(ck["optimizer"])
        start, history, elapsed = ck["step"], ck["history"], ck.get("elapsed", 0.0)
        rng.bit_generator.state = ck["rng"]
        pool_start = ck["pool_next"]
        print(f"resumed from {resume} at step {start}", file=sys.stderr)
    n_params = sum(p.numel() for p in sam.parameters())
    pool = ScenePool(a.seed, pool_start, cfg.img_size, a.pool)
    pool.grow(4 if a.smoke else 200)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "log.jsonl"

    def checkpoint(step: int) -> None:
        _atomic_save({"model": sam.state_dict(), "optimizer": opt.state_dict(), "step": step,
                      "history": history, "rng": rng.bit_generator.state, "pool_next": pool.next_index,
                      "config": cfg.to_dict(), "elapsed": elapsed, "args": vars(a) | {"out": str(out)}},
                     work / "last.pt")

    def validate() -> dict[str, float]:
        sam.eval()
        res = eval_prompts(SamRunner(sam), VAL_SEED, a.eval_scenes, cfg.img_size)
        sam.train()
        return res

    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, desc="segmenter", unit="step",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    window: list[tuple[float, float, float]] = []
    t_last = time.perf_counter()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        items = make_batch(pool, rng, a.batch, cfg.img_size)
        loss, iou_box, iou_pt = step_loss(sam, items)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        pool.grow(1)
        window.append((loss.item(), iou_box, iou_pt))
        done = step + 1
        if done % 25 == 0 or done == a.steps:
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            w = np.array(window)
            rec: dict[str, Any] = {"step": done, "loss": float(w[:, 0].mean()),
                                   "train_iou_box": float(np.nanmean(w[:, 1])),
                                   "train_iou_point": float(np.nanmean(w[:, 2])), "lr": lr_at(step, a.steps, a.lr, a.warmup),
                                   "minutes": round(elapsed / 60, 2), "pool": len(pool.images)}
            if a.eval_every and (done % a.eval_every == 0 or done == a.steps):
                rec.update({f"val_{k}": v for k, v in validate().items() if k != "objects"})
            history.append(rec)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.3f}", box=f"{rec['train_iou_box']:.3f}",
                            pt=f"{rec['train_iou_point']:.3f}")
            window.clear()
        if done % a.checkpoint_every == 0 or done == a.steps:
            checkpoint(done)
    bar.close()
    meta = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "warmup": a.warmup, "dataset_seed": a.seed,
            "scenes_seen": pool.next_index, "params": n_params, "minutes": round(elapsed / 60, 1),
            "smoke": a.smoke}
    sam.eval()
    export_weights(sam, cfg, out, meta)
    (out / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    print(f"wrote {out / WEIGHTS_FILE} ({n_params / 1e6:.2f}M params, {a.steps} steps)", file=sys.stderr)
    return 0


def main_eval(argv: list[str]) -> int:
    """``switchboard eval segmenter``: box, point and text mIoU on a held-out dataset seed."""
    p = argparse.ArgumentParser(prog="switchboard eval segmenter", description="mIoU on held-out shapes scenes.")
    p.add_argument("--weights", type=Path, default=None, help="a directory with config.json + segmenter.pt")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help=f"held-out dataset seed (default {EVAL_SEED})")
    p.add_argument("--n", type=int, default=200, help="scenes (default 200)")
    p.add_argument("--no-text", action="store_true", help="skip the text (detect-grounded) evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.seed == TRAIN_SEED:
        print("switchboard eval segmenter: that is the training seed; pick a held-out one", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(a.threads)
    weights = a.weights or _default_out()
    if not (weights / WEIGHTS_FILE).exists():
        print(f"switchboard eval segmenter: no weights in {weights}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    res: dict[str, Any] = {"seed": a.seed, "scenes": a.n, "weights": str(weights)}
    # the expert's inference (with the config's mask refinement), and the raw decoder masks
    res.update(eval_prompts(load_small_runner(weights), a.seed, a.n))
    res.update({f"{k}_raw": v for k, v in eval_prompts(SamRunner(load_small_sam(weights)), a.seed, a.n).items()
                if k.startswith("miou")})
    if not a.no_text:
        res.update(eval_text(a.seed, a.n, weights))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>20}: {v:.4f}" if isinstance(v, float) else f"{k:>20}: {v}")
    return 0
