"""The edit expert: repaint the masked region of an image following an instruction.

Embedded default: inpainting with the shipped generator, RePaint-style (experts/pixel_diffusion.py).
The mask's bounding box is cut out with a margin so that the masked region fills as much of the
square crop as an object fills a training image, scaled to the model's 32 px, repainted there under
the prompt the instruction asks for, scaled back and pasted **only inside the mask**: every pixel
outside the mask is returned unchanged. Real weights, same code: with ``SWITCHBOARD_GENERATE_MODEL``
set to a diffusers folder, the edit runs ``AutoPipelineForInpainting`` on the same crop (an SD
inpainting folder, or any text-to-image folder diffusers can turn into an inpainting pipeline) and
composites the same way.

Instructions: "replace it with a blue square", "turn it into a star", "make it green", "remove it"
(and paraphrases). A replacement that names only a colour keeps the old content's structure: the
repaint starts part-way through the noise schedule from the original pixels (SDEdit). With the embedded
generator a recolour is done in place instead (``recolour_pixels``: the object's colour is shifted,
its shape, edges and shading kept), which the 32 px generator cannot do faithfully.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from experts.generate import GeneratorWeightsMissing, load_diffusers, model_path, torch_device
from switchboard.errors import SwitchboardError
from switchboard.expert import (
    Example,
    Expert,
    ExpertResult,
    ImageRef,
    MaskRef,
    RunContext,
    SimulatedScene,
    Simulation,
)

# the masked region's bounding box covers this fraction of the crop's side: objects in the
# generator's training images span 0.54-0.76 of the frame, so a new object comes out at about
# 0.8 of the box and is not clipped by it
FILL = 0.8
RECOLOUR_STRENGTH = 0.7
_EXAMPLE_MASK = "mask-000000000000000000000000"


class EditRejected(SwitchboardError):
    code = "edit_rejected"


class EditArgs(BaseModel):
    image: ImageRef
    mask: MaskRef
    instruction: str = Field(min_length=1, max_length=300, description="What to do inside the mask.")
    steps: int = Field(default=20, ge=1, le=200, description="Denoising steps.")
    guidance: float = Field(default=3.0, ge=0.0, le=30.0, description="Classifier-free guidance.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Random seed.")


class EditResult(ExpertResult):
    prompt: str = Field(description="What the masked region was repainted as.")
    changed_pixels: int = Field(description="Pixels inside the mask (the only ones that may change).")
    seed: int


@dataclass(frozen=True)
class EditPlan:
    prompt: str
    strength: float   # 1.0: repaint from pure noise; < 1: start from the noised original (keeps structure)
    action: str       # "replace", "recolour", "remove"
    colour: str = ""  # a recolour's new colour

    def naming(self, what: str) -> EditPlan:
        """A recolour that knows what it recolours: "a green shape" -> "a green square"."""
        if self.action != "recolour" or not what:
            return self
        return replace(self, prompt=f"{_a(self.colour)} {self.colour} {what}")


_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "gray", "pink",
            "brown", "cyan", "magenta")
_REMOVE = re.compile(r"\b(remove|erase|delete|get rid of|take (it|them) out|clear)\b")
_REPLACE = re.compile(r"\b(?:replace (?:it|them|this|that|the \w+(?: \w+)?) with|turn (?:it|them|this|that) into|"
                      r"change (?:it|them|this|that) (?:in)?to|swap (?:it|them) for|make (?:it|them) into|"
                      r"put|draw|paint in|fill (?:it|them) with)\s+(.+)$")
_RECOLOUR = re.compile(r"\b(?:make|paint|colou?r|turn|change)\b.*?\b(" + "|".join(_COLOURS) + r")\b")


def _a(word: str) -> str:
    """The article before a recolour's colour, as in the generator's training captions ("an orange")."""
    return "an" if word[:1] in "aeiou" else "a"


def plan_edit(instruction: str) -> EditPlan:
    """What an instruction asks for, as a generator prompt. Raises EditRejected if it is unclear."""
    text = " ".join(instruction.lower().strip().rstrip(".!").split())
    if _REMOVE.search(text):
        return EditPlan("an empty background", 1.0, "remove")
    m = _REPLACE.search(text)
    if m:
        what = m.group(1).strip()
        what = re.sub(r"^(an?|the|one)\s+", "", what)
        words = what.split()
        if words and all(w in _COLOURS for w in words):     # "turn it into red" is a recolour
            return EditPlan(f"{_a(what)} {what} shape", RECOLOUR_STRENGTH, "recolour", colour=what)
        article = "an" if what[:1] in "aeiou" else "a"
        return EditPlan(f"{article} {what}", 1.0, "replace")
    m = _RECOLOUR.search(text)
    if m:
        return EditPlan(f"{_a(m.group(1))} {m.group(1)} shape", RECOLOUR_STRENGTH, "recolour", colour=m.group(1))
    if text:
        # anything else is taken as a description of what should be there
        return EditPlan(text, 1.0, "replace")
    raise EditRejected(f"cannot tell what to do from the instruction {instruction!r}")


def crop_box(mask: np.ndarray, fill: float = FILL) -> tuple[int, int, int, int]:
    """A square around the mask's bounding box (which covers ``fill`` of its side), clipped to the image."""
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    side = int(np.ceil(max(x2 - x1, y2 - y1) / fill))
    h, w = mask.shape
    side = min(side, max(h, w))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(round(min(max(cx - side / 2, 0), max(w - side, 0))))
    top = int(round(min(max(cy - side / 2, 0), max(h - side, 0))))
    return left, top, min(left + side, w), min(top + side, h)


class EditExpert(Expert):
    name = "edit"
    description = "Repaint the masked region of an image following an instruction (replace, recolour, remove)."
    Args = EditArgs
    Result = EditResult
    time_limit = 300.0
    examples = [
        Example(request="remove it", args={"image": "{image}", "mask": _EXAMPLE_MASK, "instruction": "remove it"}),
        Example(request="now make it {colour}", args={"image": "{image}", "mask": _EXAMPLE_MASK,
                                                      "instruction": "make it {colour}"}),
        Example(request="erase that", args={"image": "{image}", "mask": _EXAMPLE_MASK, "instruction": "remove it"}),
        Example(request="paint it {colour}", args={"image": "{image}", "mask": _EXAMPLE_MASK,
                                                   "instruction": "make it {colour}"}),
        Example(request="turn it into a {shape}", args={"image": "{image}", "mask": _EXAMPLE_MASK,
                                                        "instruction": "turn it into a {shape}"}),
        Example(request="replace it with a {colour} {shape}",
                args={"image": "{image}", "mask": _EXAMPLE_MASK, "instruction": "replace it with a {colour} {shape}"}),
    ]

    @classmethod
    def simulate(cls, args: dict[str, str], scene: SimulatedScene, rng: random.Random) -> Simulation:
        """The edited image."""
        instruction = args.get("instruction", "")
        return Simulation(summary=f"edited the masked region: {instruction}", artifacts=[("image", "edited")],
                          answer=f"Done: I edited the image ({instruction}).")

    def __init__(self) -> None:
        super().__init__()
        self._pixel: Any = None
        self._pipe: Any = None
        self._namer: Any = None
        self._lock = threading.Lock()

    def setup(self) -> None:
        from experts.pixel_diffusion import PixelPipeline, is_pixel_pipeline
        from switchboard.settings import get_settings

        path = model_path(get_settings())
        if not (path / "model_index.json").is_file():
            raise GeneratorWeightsMissing(
                f"no diffusers pipeline at {path} (model_index.json missing); the edit expert inpaints with "
                "the generator: train it with `switchboard train generator` or set SWITCHBOARD_GENERATE_MODEL")
        if is_pixel_pipeline(path):
            self._pixel = PixelPipeline.from_pretrained(path)
            self._pixel.unet.to(torch_device())
        else:
            self._pipe = load_diffusers(path, "inpaint")

    def teardown(self) -> None:
        self._pixel = self._pipe = None
        super().teardown()

    def run(self, args: EditArgs, ctx: RunContext) -> EditResult:
        from PIL import Image

        image = ctx.open_image(args.image)
        mask_img = ctx.open_image(args.mask, mode="L")
        if mask_img.size != image.size:
            raise EditRejected(f"the mask is {mask_img.width}x{mask_img.height} but the image is "
                               f"{image.width}x{image.height}; they must match")
        mask = np.asarray(mask_img) >= 128
        if not mask.any():
            raise EditRejected("the mask is empty: nothing to edit")
        plan = plan_edit(args.instruction)
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31 - 1)
        x1, y1, x2, y2 = crop_box(mask)
        crop = image.crop((x1, y1, x2, y2))
        crop_mask = mask[y1:y2, x1:x2]

        def progress(done: int, total: int) -> None:
            ctx.progress(done / total, f"step {done}/{total}")

        with self._lock:
            if self._pixel is not None and plan.action == "recolour":
                # the object's colour shifted in place: its shape and edges kept, so nothing needs to
                # guess what the object is ("an orange shape": a detector's guess could contradict segment's)
                shifted = recolour_pixels(np.asarray(image.convert("RGB"), dtype=np.uint8), mask, plan.colour)
                if shifted is not None:
                    art = ctx.save_image(Image.fromarray(shifted), kind="image", role="edited")
                    n = int(mask.sum())
                    return EditResult(summary=f"recolour: repainted {n} masked pixels as {plan.prompt!r} (its colour "
                                              "changed, shape and shading kept); pixels outside the mask unchanged",
                                      artifacts=[art], prompt=plan.prompt, changed_pixels=n, seed=seed)
                plan = plan.naming(self._name_in_mask(image, mask))
            if self._pixel is not None:
                repainted = self._repaint_pixel(crop, crop_mask, plan, seed, args, progress)
            else:
                repainted = self._repaint_diffusers(crop, crop_mask, plan, seed, args, progress)
        out = np.asarray(image, dtype=np.uint8).copy()
        region = out[y1:y2, x1:x2]
        new = np.asarray(repainted.resize(crop.size, Image.Resampling.BICUBIC), dtype=np.uint8)
        region[crop_mask] = new[crop_mask]
        art = ctx.save_image(Image.fromarray(out), kind="image", role="edited")
        n = int(mask.sum())
        return EditResult(summary=f"{plan.action}: repainted {n} masked pixels as {plan.prompt!r}; "
                                  f"pixels outside the mask unchanged (seed {seed})",
                          artifacts=[art], prompt=plan.prompt, changed_pixels=n, seed=seed)

    def _name_in_mask(self, image: Any, mask: np.ndarray) -> str:
        """What the embedded detector sees in the mask ("square"), or "" (shapes world only)."""
        try:
            if self._namer is None:
                from experts.detect import DetectExpert

                self._namer = DetectExpert()
            self._namer.ensure_setup()
            dets = self._namer._predict([image], 0.25)[0]
        except Exception:  # no detector weights: recolour without naming the object
            return ""
        ys, xs = np.nonzero(mask)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

        def overlap(d: Any) -> float:
            x1, y1, x2, y2 = d.xyxy
            iw, ih = max(0.0, min(x2, box[2]) - max(x1, box[0])), max(0.0, min(y2, box[3]) - max(y1, box[1]))
            return iw * ih / max((x2 - x1) * (y2 - y1), 1e-6)

        best = max(dets, key=overlap, default=None)
        return best.cls if best is not None and overlap(best) > 0.5 else ""

    def _repaint_pixel(self, crop: Any, crop_mask: np.ndarray, plan: EditPlan, seed: int, args: EditArgs,
                       progress: Any) -> Any:
        from PIL import Image

        s = self._pixel.size
        small = np.asarray(crop.resize((s, s), Image.Resampling.BOX), dtype=np.uint8)
        # a masked pixel at full size marks its low-res pixel, grown by one so edges get repainted too
        m = np.asarray(Image.fromarray(crop_mask.astype(np.uint8) * 255).resize((s, s), Image.Resampling.BOX)) > 0
        m = _dilate(m, 1)
        arr = self._pixel.inpaint(small[None], m[None], [plan.prompt], seeds=[seed], steps=args.steps,
                                  guidance=args.guidance, strength=plan.strength, progress=progress)
        return Image.fromarray(arr[0])

    def _repaint_diffusers(self, crop: Any, crop_mask: np.ndarray, plan: EditPlan, seed: int, args: EditArgs,
                           progress: Any) -> Any:
        import torch
        from PIL import Image

        side = int(getattr(self._pipe.unet.config, "sample_size", 64)) * int(
            getattr(self._pipe, "vae_scale_factor", 8))
        img = crop.resize((side, side), Image.Resampling.BICUBIC)
        mimg = Image.fromarray(crop_mask.astype(np.uint8) * 255).resize((side, side), Image.Resampling.NEAREST)
        steps = args.steps

        def cb(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            progress(step + 1, steps)
            return kwargs

        out = self._pipe(prompt=plan.prompt, image=img, mask_image=mimg, height=side, width=side,
                         num_inference_steps=steps, guidance_scale=args.guidance, strength=plan.strength,
                         generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=cb)
        return out.images[0].convert("RGB")

    def run_batch(self, items: Sequence[tuple[Any, RunContext]]) -> list[EditResult]:
        return [self.run(a if isinstance(a, EditArgs) else EditArgs.model_validate(a), c) for a, c in items]


# RGB of the colour words an instruction may name (the shapes world's six are its palette's)
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 225), "yellow": (240, 215, 40),
    "purple": (150, 60, 200), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (20, 20, 20),
    "grey": (128, 128, 128), "gray": (128, 128, 128), "pink": (250, 150, 190), "brown": (140, 80, 30),
    "cyan": (30, 200, 220), "magenta": (220, 40, 200)}
RECOLOUR_MIN_CHROMA = 80  # an object pixel of the shapes world is saturated (see experts.domain)


def recolour_pixels(image: np.ndarray, mask: np.ndarray, colour: str) -> np.ndarray | None:
    """The image with the object inside ``mask`` turned ``colour``, every other pixel untouched; None
    when the mask holds no saturated object to recolour (the generator repaints it instead).

    Why not the generator: repainting from noise at 32 px and scaling back leaves 10-35% of a recoloured
    object grey or black (its edges, a smaller new shape). Here each masked pixel is read as a blend of
    the object's colour and the local background (its ``alpha``: how far it lies from the background
    toward the object's colour), and only the object's share is moved to the new colour, so the
    shape, the anti-aliased edges and the noise stay as they were.
    """
    if colour not in RGB or not mask.any():
        return None
    px = image.astype(np.float32)
    inside = px[mask]
    chroma = inside.max(axis=1) - inside.min(axis=1)
    solid = chroma >= RECOLOUR_MIN_CHROMA
    if solid.sum() < 12:
        return None
    old = np.median(inside[solid], axis=0)
    ring = _dilate(mask, 3) & ~mask
    around = px[ring] if ring.any() else inside[~solid]
    around = around[(around.max(axis=1) - around.min(axis=1)) < RECOLOUR_MIN_CHROMA] if len(around) else around
    background = np.median(around, axis=0) if len(around) else np.full(3, 128.0, np.float32)
    axis = old - background
    norm = float(axis @ axis)
    if norm < 1.0:
        return None
    alpha = np.clip((inside - background) @ axis / norm, 0.0, 1.0)[:, None]
    out = image.copy()
    out[mask] = np.clip(inside + alpha * (np.array(RGB[colour], np.float32) - old), 0, 255).round().astype(np.uint8)
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = np.zeros_like(mask)
            shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
            out |= shifted
    return out
