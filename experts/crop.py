"""The crop expert: cut a region out of an image (0–1000 coordinates, or the boxes another call found)."""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field, model_validator

from switchboard.expert import (
    BoxesRef,
    Example,
    Expert,
    ExpertResult,
    ImageRef,
    NamedValues,
    RunContext,
    SimulatedScene,
    Simulation,
    compose,
    exactly_one,
)


class CropArgs(BaseModel):
    model_config = ConfigDict(json_schema_extra=exactly_one("region", "boxes"))

    image: ImageRef
    region: list[int] | None = Field(
        default=None, min_length=4, max_length=4,
        description="[x1, y1, x2, y2] on a 0-1000 scale of the image's width and height.")
    boxes: BoxesRef | None = Field(default=None, description="Crop each box another call found.")
    margin: int = Field(default=0, ge=0, le=500, description="Extra border, 0-1000 scale.")

    @model_validator(mode="after")
    def _one_source(self) -> CropArgs:
        if (self.region is None) == (self.boxes is None):
            raise ValueError("give exactly one of region or boxes")
        if self.region is not None:
            x1, y1, x2, y2 = self.region
            if not (0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000):
                raise ValueError("region must be x1 < x2 and y1 < y2 within 0-1000")
        return self


class CropResult(ExpertResult):
    regions: list[list[int]] = Field(description="Pixel xyxy of each crop.")


class CropExpert(Expert):
    name = "crop"
    description = "Cut a region out of an image, given 0-1000 coordinates or the boxes another call found."
    Args = CropArgs
    Result = CropResult
    time_limit = 30.0
    examples = [
        Example(request="crop the top left quarter", args={"image": "{image}", "region": [0, 0, 500, 500]}),
        Example(request="cut out the middle of the picture", args={"image": "{image}", "region": [250, 250, 750, 750]}),
        Example(request="zoom in on the right half", args={"image": "{image}", "region": [500, 0, 1000, 1000]}),
    ]
    verbs = ["crop", "trim", "cut out", "crop out", "zoom in on", "clip"]
    train_verbs = ["cut down to", "crop in on", "snip", "frame", "crop away everything but", "focus on",
                   "close in on", "enlarge", "magnify", "zoom into", "tighten the frame on", "cut the image to",
                   "reframe on", "crop tightly around", "keep only"]
    # named regions (0-1000 coordinates): values read from the request, not memorised with one example
    named_values = [NamedValues(
        arg="region", args={"image": "{image}"}, rate=0.5,
        values={
            "top half": [0, 0, 1000, 500], "upper half": [0, 0, 1000, 500], "bottom half": [0, 500, 1000, 1000],
            "lower half": [0, 500, 1000, 1000], "left half": [0, 0, 500, 1000], "right half": [500, 0, 1000, 1000],
            "left side": [0, 0, 500, 1000], "right side": [500, 0, 1000, 1000], "top part": [0, 0, 1000, 500],
            "bottom part": [0, 500, 1000, 1000], "top-left quarter": [0, 0, 500, 500],
            "top right quarter": [500, 0, 1000, 500], "bottom-left quarter": [0, 500, 500, 1000],
            "bottom right quarter": [500, 500, 1000, 1000], "top left corner": [0, 0, 500, 500],
            "bottom right corner": [500, 500, 1000, 1000], "centre": [250, 250, 750, 750],
            "center": [250, 250, 750, 750], "middle": [250, 250, 750, 750], "central part": [250, 250, 750, 750],
        },
        requests=compose(
            ["crop to", "crop the image to", "keep only", "just keep", "zoom into", "zoom in on", "cut it down to",
             "trim it to", "cut away everything except", "show me only", "reduce it to",
             "crop everything but", "give me just", "crop it so only", "leave only"],
            ["the {value}", "the {value} of the picture", "the {value} of the image", "the {value} of it"]))]

    @classmethod
    def simulate(cls, args: dict[str, str], scene: SimulatedScene, rng: random.Random) -> Simulation:
        """One crop per region, or one to three for boxes, of made-up sizes."""
        w = rng.choice([64, 96, 128, 256, 512])
        n = rng.randint(1, 3) if args.get("boxes") else 1
        sizes = ", ".join(f"{rng.randint(16, w)}x{rng.randint(16, w)}" for _ in range(n))
        return Simulation(summary=f"{n} crop(s) of {w}x{w} image: {sizes}",
                          artifacts=[("image", f"crop {i + 1}") for i in range(n)],
                          answer=f"Done: {n} crop{'s' if n != 1 else ''} ({sizes}).", facts=[str(n)])

    def run(self, args: CropArgs, ctx: RunContext) -> CropResult:
        img = ctx.open_image(args.image)
        w, h = img.size
        if args.boxes is not None:
            data = ctx.read_json(args.boxes)
            pixel_boxes = [b["xyxy"] for b in data.get("boxes", [])]
            if not pixel_boxes:
                return CropResult(summary="nothing to crop: the boxes are empty", regions=[])
        else:
            x1, y1, x2, y2 = args.region or (0, 0, 1000, 1000)
            pixel_boxes = [[x1 * w / 1000, y1 * h / 1000, x2 * w / 1000, y2 * h / 1000]]
        mx, my = args.margin * w / 1000, args.margin * h / 1000
        regions, artifacts = [], []
        for i, (x1, y1, x2, y2) in enumerate(pixel_boxes):
            box = [max(0, round(x1 - mx)), max(0, round(y1 - my)), min(w, round(x2 + mx)), min(h, round(y2 + my))]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            regions.append(box)
            artifacts.append(ctx.save_image(img.crop(tuple(box)), kind="image", role=f"crop {i + 1}"))
            ctx.progress((i + 1) / len(pixel_boxes), f"crop {i + 1}")
        sizes = ", ".join(f"{b[2] - b[0]}x{b[3] - b[1]}" for b in regions)
        return CropResult(summary=f"{len(regions)} crop(s) of {w}x{h} image: {sizes}", artifacts=artifacts,
                          regions=regions)
