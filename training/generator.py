"""Generator recipe: train and evaluate the generate expert's embedded pixel-space diffusion model.

Data: shapes-world *icons* rendered on the fly: one object of the world's shapes and colours,
large and near the centre of a 32 px frame, on the world's grey backgrounds (plain, gradient,
noisy), plus a few empty backgrounds (what the edit expert asks for to remove an object).
Captions come from templates; ``HELDOUT_TEMPLATES`` never appear in training.

    switchboard train generator                         # the shipped model (models/generator/MODEL_CARD.md)
    switchboard train generator --steps 5 --tiny --out /tmp/g      # a smoke run, seconds
    switchboard train generator --resume                # continue the last run
    switchboard eval generator --json                   # prompt/colour/shape accuracy, judged by the detector

The judge is the shipped detector (``models/detector/best.pt``): each 32 px sample is upscaled 3x
and placed in the middle of a 192 px canvas of its own border colour (the detector was trained on
objects of 5–16 % of the frame's side); its top detection must have the requested shape and colour.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.shapes import BACKGROUNDS, COLOURS, SHAPES, _coverage

SIZE = 32
DEFAULT_OUT = "generator"            # under Settings.cache_dir / "runs"
DEFAULT_EVAL_SEED = 999_999
EMPTY_FRACTION = 0.06
CFG_DROP = 0.1

TRAIN_TEMPLATES = (
    "a {c} {s}", "{c} {s}", "a {c} {s} on a {bg} background", "a picture of a {c} {s}",
    "an image of a {c} {s}", "one {c} {s}", "draw a {c} {s}", "a single {c} {s}", "the {c} {s}",
    "a {s} that is {c}", "a {c} coloured {s}", "a {c} {s} in the middle", "create a {c} {s}",
    "a photo of one {c} {s}", "{c} {s} on {bg}",
)
HELDOUT_TEMPLATES = (
    "a {c} {s}", "generate a {c} {s}", "please make a {c} {s}", "an illustration of a {c} {s}",
    "show me a {c} {s}",
)
EMPTY_CAPTIONS = ("an empty {bg} background", "empty background", "nothing, just the background",
                  "a plain {bg} background", "no objects")


def _article_fix(text: str) -> str:
    for vowel in "aeiou":
        text = text.replace(f" a {vowel}", f" an {vowel}")
        if text.startswith(f"a {vowel}"):
            text = "an " + text[2:]
    return text


def caption(template: str, colour: str, shape: str, bg: str) -> str:
    return _article_fix(template.format(c=colour, s=shape, bg=bg))


def render_icon(rng: np.random.Generator, size: int = SIZE, shape: str | None = None,
                colour: str | None = None, empty: bool = False) -> tuple[np.ndarray, str, str, str]:
    """One training image (uint8 S×S×3) and its (shape, colour, background name); shape '' if empty."""
    bg_name = str(rng.choice(list(BACKGROUNDS)))
    base = np.array(BACKGROUNDS[bg_name], np.float32)
    style = rng.choice(["plain", "plain", "gradient", "noisy"])
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if style == "gradient":
        other = np.clip(base + rng.uniform(-50, 50), 0, 255)
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
        t = np.clip(math.cos(ang) * (xx - 0.5) + math.sin(ang) * (yy - 0.5) + 0.5, 0, 1)[..., None]
        img = base * (1 - t) + other * t
    if empty:
        shape_name, colour_name = "", ""
    else:
        shape_name = shape or str(rng.choice(SHAPES))
        colour_name = colour or str(rng.choice(list(COLOURS)))
        r = float(rng.uniform(0.27, 0.38)) * size
        cx = size / 2 + float(rng.uniform(-0.06, 0.06)) * size
        cy = size / 2 + float(rng.uniform(-0.06, 0.06)) * size
        rot = float(rng.uniform(-0.35, 0.35))
        a = _coverage(shape_name, cx, cy, r, rot, size)[..., None]
        col = np.clip(np.array(COLOURS[colour_name]) + rng.integers(-12, 13, size=3), 0, 255).astype(np.float32)
        img = img * (1 - a) + col * a
    if style == "noisy":
        img = img + rng.normal(0, float(rng.uniform(3, 8)), size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), shape_name, colour_name, bg_name


def all_captions() -> list[str]:
    """Every caption training can draw (so they are encoded once, up front)."""
    out = {""}
    for bg in BACKGROUNDS:
        out.update(t.format(bg=bg) for t in EMPTY_CAPTIONS)
        for s in SHAPES:
            for c in COLOURS:
                out.update(caption(t, c, s, bg) for t in TRAIN_TEMPLATES)
    return sorted(out)


def sample_batch(rng: np.random.Generator, n: int, size: int = SIZE) -> tuple[np.ndarray, list[str]]:
    images, captions = [], []
    for _ in range(n):
        empty = rng.random() < EMPTY_FRACTION
        img, shape, colour, bg = render_icon(rng, size, empty=empty)
        if empty:
            text = str(rng.choice(EMPTY_CAPTIONS)).format(bg=bg)
        else:
            text = caption(str(rng.choice(TRAIN_TEMPLATES)), colour, shape, bg)
        if rng.random() < CFG_DROP:
            text = ""
        images.append(img)
        captions.append(text)
    return np.stack(images), captions


# -- the judge ------------------------------------------------------------------------------------
def judge_canvas(img: np.ndarray, scale: int = 3, canvas: int = 192) -> Any:
    """Upscale a small sample and centre it on a canvas of its border's median colour (a PIL image)."""
    from PIL import Image

    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    big = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (canvas, canvas), fill)
    out.paste(big, ((canvas - big.width) // 2, (canvas - big.height) // 2))
    return out


class Judge:
    """The shipped detector: reads the top detection's shape and colour in an image."""

    def __init__(self) -> None:
        from experts.detect import DetectExpert

        self.detector = DetectExpert()
        self.detector.ensure_setup()

    def top(self, images: list[Any], conf: float = 0.2) -> list[tuple[str, str] | None]:
        out: list[tuple[str, str] | None] = []
        for i in range(0, len(images), 16):
            for dets in self.detector._predict(images[i:i + 16], conf):
                best = max(dets, key=lambda d: d.score, default=None)
                out.append((best.cls, best.colour) if best is not None else None)
        return out


def score(judged: list[tuple[str, str] | None], wanted: list[tuple[str, str]]) -> dict[str, float]:
    n = max(len(wanted), 1)
    shape_ok = sum(1 for j, (s, _) in zip(judged, wanted, strict=True) if j and j[0] == s)
    colour_ok = sum(1 for j, (_, c) in zip(judged, wanted, strict=True) if j and j[1] == c)
    both = sum(1 for j, w in zip(judged, wanted, strict=True) if j and j == w)
    return {"prompt_accuracy": round(both / n, 4), "shape_accuracy": round(shape_ok / n, 4),
            "colour_accuracy": round(colour_ok / n, 4), "n": len(wanted)}


def heldout_prompts(n: int, seed: int = DEFAULT_EVAL_SEED) -> list[tuple[str, str, str, int]]:
    """(prompt, shape, colour, sample seed): every colour×shape pair in turn, held-out templates."""
    rng = np.random.Generator(np.random.PCG64(seed))
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    out = []
    for k in range(n):
        s, c = pairs[k % len(pairs)]
        template = HELDOUT_TEMPLATES[(k // len(pairs) + k) % len(HELDOUT_TEMPLATES)]
        out.append((caption(template, c, s, "grey"), s, c, int(rng.integers(0, 2**31 - 1))))
    return out


def evaluate_pipeline(pipe: Any, judge: Judge, *, n: int = 150, steps: int = 20, guidance: float = 3.0,
                      seed: int = DEFAULT_EVAL_SEED, batch: int = 30) -> dict[str, Any]:
    prompts = heldout_prompts(n, seed)
    images: list[Any] = []
    for i in range(0, n, batch):
        chunk = prompts[i:i + batch]
        arr = pipe.generate([p for p, *_ in chunk], seeds=[sd for *_, sd in chunk], steps=steps, guidance=guidance)
        images.extend(judge_canvas(a) for a in arr)
    result = score(judge.top(images), [(s, c) for _, s, c, _ in prompts])
    result.update(steps=steps, guidance=guidance, seed=seed)
    return result


# -- training --------------------------------------------------------------------------------------
def _settings():
    from switchboard.settings import get_settings

    return get_settings()


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchboard train generator", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="run folder (default: <cache>/runs/generator)")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--minutes", type=float, default=None, help="stop after this long (checkpoint saved)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", default="32,64,64")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=500, help="steps between quick evals (0: never)")
    p.add_argument("--eval-n", type=int, default=60)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a tiny UNet (smoke runs and tests)")
    p.add_argument("--export", type=Path, default=None, help="also write the final EMA pipeline here")
    return p


def _log(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def main_train(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from tqdm import tqdm

    from experts.pixel_diffusion import PixelPipeline, scheduler_config, text_encoder, unet_config

    torch.set_num_threads(args.threads)
    out = args.out or Path(_settings().cache_dir) / "runs" / DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    channels = (16, 32) if args.tiny else tuple(int(c) for c in args.channels.split(","))
    cfg = unet_config(SIZE, channels, args.layers_per_block)
    state_path = out / "state.pt"
    step = 0
    rng_state = None
    if args.resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        cfg = state["unet_config"]
        unet = UNet2DConditionModel(**cfg)
        unet.load_state_dict(state["unet"])
        ema = UNet2DConditionModel(**cfg)
        ema.load_state_dict(state["ema"])
        step = int(state["step"])
        rng_state = state["rng"]
        print(f"resuming at step {step}", file=sys.stderr)
    else:
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel(**cfg)
        ema = copy.deepcopy(unet)
        (out / "curve.jsonl").unlink(missing_ok=True)
    unet = unet.to(memory_format=torch.channels_last).train()
    ema.eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    if args.resume and state_path.is_file():
        opt.load_state_dict(state["opt"])
    noise_sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    enc = text_encoder()
    enc(all_captions())
    rng = np.random.Generator(np.random.PCG64(args.seed))
    if rng_state is not None:
        rng.bit_generator.state = rng_state
    judge = Judge() if args.eval_every and not args.tiny else None
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet {channels} x{args.layers_per_block}: {n_params / 1e6:.2f}M parameters; run folder {out}",
          file=sys.stderr)

    def save() -> None:
        torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "rng": rng.bit_generator.state, "unet_config": cfg}, out / "state.tmp")
        os.replace(out / "state.tmp", state_path)
        PixelPipeline(ema, DDIMScheduler(**scheduler_config()), enc).save_pretrained(
            out / "pipeline", extra={"train_steps": step})

    started = time.monotonic()
    bar = tqdm(total=args.steps, initial=step, desc="generator", unit="step", dynamic_ncols=True)
    losses: list[float] = []
    while step < args.steps:
        if args.minutes is not None and time.monotonic() - started > args.minutes * 60:
            break
        imgs, texts = sample_batch(rng, args.batch)
        x0 = torch.from_numpy(imgs).float().div(127.5).sub(1).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last)
        states, mask, pooled = enc(texts)
        t = torch.from_numpy(rng.integers(0, 1000, size=args.batch)).long()
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        warm = min(1.0, (step + 1) / 300)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm
        pred = unet(xt, t, encoder_hidden_states=states, encoder_attention_mask=mask, class_labels=pooled).sample
        # min-SNR-5 weighting for v-prediction
        w = torch.clamp(snr[t], max=5.0) / (snr[t] + 1)
        loss = (w * (pred.float() - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % args.save_every == 0:
            save()
        if judge is not None and step % args.eval_every == 0:
            pipe = PixelPipeline(ema, DDIMScheduler(**scheduler_config()), enc)
            res = evaluate_pipeline(pipe, judge, n=args.eval_n, seed=12345)
            row = {"step": step, "minutes": round((time.monotonic() - started) / 60, 1),
                   "loss": round(float(np.mean(losses[-200:])), 5), **res}
            _log(out / "curve.jsonl", row)
            bar.write(json.dumps(row))
    bar.close()
    save()
    if args.export:
        PixelPipeline(ema, DDIMScheduler(**scheduler_config()), enc).save_pretrained(
            args.export, extra={"train_steps": step})
    print(json.dumps({"step": step, "out": str(out), "loss": float(np.mean(losses[-50:])) if losses else None}))
    return 0


# -- evaluation ------------------------------------------------------------------------------------
def main_eval(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="switchboard eval generator",
                                description="Prompt accuracy on held-out prompts, judged by the shipped detector.")
    p.add_argument("--model", type=Path, default=None, help="pipeline folder (default: the shipped generator)")
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from experts.pixel_diffusion import PixelPipeline

    torch.set_num_threads(args.threads)
    model = args.model or Path(_settings().models_dir) / "generator"
    pipe = PixelPipeline.from_pretrained(model)
    res = evaluate_pipeline(pipe, Judge(), n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed)
    res["model"] = str(model)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_train())
