"""The generate expert: text-to-image with diffusers.

Embedded default: the shapes-world pixel UNet in ``models/generator/`` (see experts/pixel_diffusion.py
and its MODEL_CARD.md), 32 px native, returned upscaled to ``size`` (default 128). Real weights, same
code: point ``SWITCHBOARD_GENERATE_MODEL`` at any diffusers text-to-image folder (Stable Diffusion and
friends); it is loaded with ``AutoPipelineForText2Image.from_pretrained`` on the CPU, or the GPU if one
is visible, and run with the same arguments.

Out of its world: the embedded generator only draws the shapes world. A prompt that asks for something
else ("a bus") still gets a drawing (the nearest shapes-world picture), but the summary says what it can
draw and ``out_of_domain`` is set (``prompt_outside_world``), so an answer never passes it off as a bus.

Same arguments and seed, same image. Step progress goes through ``RunContext.progress`` (workers
forward it to the orchestrator as progress events).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from switchboard.errors import SwitchboardError
from switchboard.expert import Example, Expert, ExpertResult, RunContext, SimulatedScene, Simulation, compose

EMBEDDED_OUTPUT_SIZE = 128


class GeneratorWeightsMissing(SwitchboardError):
    code = "model_missing"
    status = 503


class GenerateArgs(BaseModel):
    prompt: str = Field(min_length=1, max_length=300, description="What to draw.")
    negative_prompt: str | None = Field(default=None, max_length=300, description="What to avoid.")
    size: int | None = Field(default=None, ge=16, le=1024,
                             description="Side in pixels (default: the model's; the embedded one gives 128).")
    steps: int = Field(default=20, ge=1, le=200, description="Denoising steps.")
    guidance: float = Field(default=3.0, ge=0.0, le=30.0, description="Classifier-free guidance.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Random seed (same seed, same image).")


class GenerateResult(ExpertResult):
    seed: int = Field(description="The seed used (pass it again to get the same image).")
    size: int = Field(description="Side of the returned image in pixels.")
    model: str = Field(description="Which weights drew it.")
    out_of_domain: bool = Field(
        default=False, description="True when the embedded shapes-world generator was asked for something outside "
                                   "its world: it still drew (the nearest shapes-world picture) and says so.")


# What the embedded generator can draw, in words (the shapes world's vocabulary, training/shapes.py).
WORLD_SHAPES = ("circle", "square", "triangle", "hexagon", "star")
WORLD_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
_WORLD_WORDS = {
    *WORLD_SHAPES, *(w + "s" for w in WORLD_SHAPES), *WORLD_COLOURS, "white", "grey", "gray", "light", "dark",
    "black", "beige", "slate", "background", "backgrounds", "gradient", "noisy", "textured", "plain", "shape",
    "shapes", "object", "objects", "picture", "image", "scene", "drawing", "big", "small", "large", "little",
    "tiny", "huge", "left", "right", "top", "bottom", "middle", "centre", "center", "next", "near", "above",
    "below", "one", "two", "three", "four", "five", "six", "some", "several", "many", "single",
}
_FILLER = {"a", "an", "the", "and", "or", "on", "in", "of", "with", "at", "to", "by", "some", "its", "side",
           "each", "other", "is", "are", "there", "that", "this", "please", "me", "us", "draw", "photo"}


def prompt_outside_world(prompt: str) -> list[str]:
    """The words of ``prompt`` that name nothing of the shapes world ("bus", "sunset"), in order."""
    import re

    from experts.referring import CLASS_SYNONYMS, COLOUR_WORDS, GENERIC_NOUNS

    # the words detect and segment understand for the same world: colour and shape synonyms ("crimson ball")
    known = _WORLD_WORDS | set(COLOUR_WORDS) | GENERIC_NOUNS | {
        w for syns in CLASS_SYNONYMS.values() for syn in syns for w in re.findall(r"[a-z]+", syn)}
    words = re.findall(r"[a-z]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w.removesuffix("s") not in known and w not in known
                              and w not in _FILLER and len(w) > 1))


def world_note(unknown: list[str]) -> str:
    """The summary's sentence for a prompt outside the embedded generator's world."""
    return (f"note: {', '.join(repr(w) for w in unknown)} is outside the embedded generator's world; it only "
            f"draws {', '.join(s + 's' for s in WORLD_SHAPES)} in {', '.join(WORLD_COLOURS)} on grey, white, "
            "black, beige or slate backgrounds, so this is the nearest shapes-world picture (set "
            "SWITCHBOARD_GENERATE_MODEL to a diffusers text-to-image folder for anything else)")


def model_path(settings: Any) -> Path:
    """``Settings.generate_model`` (SWITCHBOARD_GENERATE_MODEL), else the shipped generator."""
    return Path(settings.generate_model) if settings.generate_model else Path(settings.models_dir) / "generator"


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class GenerateExpert(Expert):
    name = "generate"
    description = "Draw a new image from a text prompt (diffusers)."
    Args = GenerateArgs
    Result = GenerateResult
    time_limit = 300.0
    examples = [
        Example(request="draw {prompt}", args={"prompt": "{prompt}"}),
        Example(request="generate an image of {prompt}", args={"prompt": "{prompt}"}),
        Example(request="make a picture of {prompt}", args={"prompt": "{prompt}"}),
        Example(request="I'd like a new image showing {prompt}", args={"prompt": "{prompt}"}),
        Example(request="paint {prompt}", args={"prompt": "{prompt}"}),
        Example(request="generate {prompt} with seed 7", args={"prompt": "{prompt}", "seed": 7}),
        Example(request="draw {prompt} without anything {colour}",
                args={"prompt": "{prompt}", "negative_prompt": "{colour}"}),
        Example(request="create {prompt}", args={"prompt": "{prompt}"}),
        Example(request="render {prompt} at 128 pixels", args={"prompt": "{prompt}", "size": 128}),
        Example(request="generate {prompt} quickly, 10 steps", args={"prompt": "{prompt}", "steps": 10}),
        Example(request="sketch {prompt}", args={"prompt": "{prompt}"}),
        Example(request="produce an image: {prompt}", args={"prompt": "{prompt}"}),
    ]
    verbs = ["draw", "generate", "make", "create", "paint", "render", "produce", "sketch",
             "illustrate", "design", "dream up", "come up with", "whip up", "craft",
             "put together"]
    train_verbs = [
        *compose(["make", "create", "produce", "give me", "show me", "I want", "I'd like", "render"],
                 ["a picture of", "an image of", "a drawing of", "an illustration of", "some art of",
                  "a new image of", "a fresh picture of", "a synthetic image of", "artwork of"]),
        "generate me", "draw up", "conjure", "imagine", "visualise", "visualize", "depict", "picture",
        "compose", "doodle", "mock up", "synthesise", "cook up", "draw me", "make me", "create me",
        "output", "build", "invent", "fabricate",
    ]

    @classmethod
    def simulate(cls, args: dict[str, str], scene: SimulatedScene, rng: random.Random) -> Simulation:
        """One generated image of the prompt."""
        size, prompt = args.get("size", "64"), args.get("prompt", "")
        return Simulation(summary=f"generated a {size}x{size} image of '{prompt}'", artifacts=[("image", "generated")],
                          answer=f"Here is the image I made: {prompt}.", facts=[prompt.split()[-1]] if prompt else [])

    def __init__(self) -> None:
        super().__init__()
        self._pixel: Any = None      # experts.pixel_diffusion.PixelPipeline (embedded)
        self._pipe: Any = None       # a diffusers pipeline (real weights)
        self._path: Path | None = None
        self._lock = threading.Lock()

    # -- loading ------------------------------------------------------------------------------------
    def setup(self) -> None:
        from experts.pixel_diffusion import PixelPipeline, is_pixel_pipeline
        from switchboard.settings import get_settings

        path = model_path(get_settings())
        if not (path / "model_index.json").is_file():
            raise GeneratorWeightsMissing(
                f"no diffusers pipeline at {path} (model_index.json missing); train the embedded one with "
                "`switchboard train generator` or set SWITCHBOARD_GENERATE_MODEL to a diffusers folder")
        if is_pixel_pipeline(path):
            self._pixel = PixelPipeline.from_pretrained(path)
            self._pixel.unet.to(torch_device())
        else:
            self._pipe = load_diffusers(path, "text2image")
        self._path = path

    def teardown(self) -> None:
        self._pixel = self._pipe = None
        super().teardown()

    @property
    def model_name(self) -> str:
        return self._path.name if self._path else "?"

    # -- running ------------------------------------------------------------------------------------
    def run(self, args: GenerateArgs, ctx: RunContext) -> GenerateResult:
        return self.run_batch([(args, ctx)])[0]

    def run_batch(self, items: Sequence[tuple[Any, RunContext]]) -> list[GenerateResult]:
        """One batched denoising loop for every call with the same steps/guidance/size."""
        self.ensure_setup()
        items = [(a if isinstance(a, GenerateArgs) else GenerateArgs.model_validate(a), c) for a, c in items]
        seeds = [a.seed if a.seed is not None else random.SystemRandom().randrange(2**31 - 1) for a, _ in items]
        groups: dict[tuple, list[int]] = {}
        for i, (a, _) in enumerate(items):
            groups.setdefault((a.steps, a.guidance, a.size), []).append(i)
        results: list[GenerateResult | None] = [None] * len(items)
        for (steps, guidance, size), idx in groups.items():
            ctxs = [items[i][1] for i in idx]

            def progress(done: int, total: int, ctxs: list[RunContext] = ctxs) -> None:
                for c in ctxs:
                    c.progress(done / total, f"step {done}/{total}")

            images = self._draw([items[i][0].prompt for i in idx],
                                [items[i][0].negative_prompt or "" for i in idx],
                                [seeds[i] for i in idx], steps=steps, guidance=guidance, size=size,
                                progress=progress)
            for i, img in zip(idx, images, strict=True):
                a, ctx = items[i]
                art = ctx.save_image(img, kind="image", role="generated")
                summary = f"generated a {img.width}x{img.height} image of {a.prompt!r} (seed {seeds[i]})"
                unknown = prompt_outside_world(a.prompt) if self._pixel is not None else []
                if unknown:
                    summary += "; " + world_note(unknown)
                results[i] = GenerateResult(summary=summary, artifacts=[art], seed=seeds[i], size=img.width,
                                            model=self.model_name, out_of_domain=bool(unknown))
        return [r for r in results if r is not None]

    def _draw(self, prompts: list[str], negatives: list[str], seeds: list[int], *, steps: int, guidance: float,
              size: int | None, progress: Any) -> list[Any]:
        from PIL import Image

        with self._lock:
            if self._pixel is not None:
                arr = self._pixel.generate(prompts, seeds=seeds, negative_prompts=negatives, steps=steps,
                                           guidance=guidance, progress=progress)
                side = size or EMBEDDED_OUTPUT_SIZE
                return [Image.fromarray(a).resize((side, side), Image.Resampling.BICUBIC) for a in arr]
            return run_diffusers_text2image(self._pipe, prompts, negatives, seeds, steps=steps, guidance=guidance,
                                            size=size, progress=progress)


# -- real diffusers pipelines -------------------------------------------------------------------------
def load_diffusers(path: Path, task: str) -> Any:
    """A diffusers pipeline from a local folder, offline; ``task``: "text2image" or "inpaint"."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image

    cls = AutoPipelineForText2Image if task == "text2image" else AutoPipelineForInpainting
    pipe = cls.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch_device())


def _callback(progress: Any, total: int):
    def cb(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        progress(step + 1, total)
        return kwargs

    return cb


def _generators(seeds: Sequence[int]) -> list[Any]:
    import torch

    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def run_diffusers_text2image(pipe: Any, prompts: list[str], negatives: list[str], seeds: list[int], *,
                             steps: int, guidance: float, size: int | None, progress: Any) -> list[Any]:
    kwargs: dict[str, Any] = {}
    if size:
        kwargs.update(height=int(size), width=int(size))
    out = pipe(prompt=prompts, negative_prompt=negatives if any(negatives) else None, num_inference_steps=steps,
               guidance_scale=guidance, generator=_generators(seeds), output_type="pil",
               callback_on_step_end=_callback(progress, steps), **kwargs)
    return [img.convert("RGB") for img in out.images]
