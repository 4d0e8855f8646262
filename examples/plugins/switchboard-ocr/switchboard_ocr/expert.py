"""The ocr expert: read the text in an image with PP-OCR (rapidocr-onnxruntime; the weights ship in its wheel).

encode (open the image, cut the region) -> forward (detect, orient, recognise text regions) -> decode
(keep confident regions, merge them into reading-order lines, draw an overlay, write a summary).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, model_validator

from switchboard import Example, Expert, ExpertResult, ImageRef, RunContext, compose

if TYPE_CHECKING:
    from PIL import Image

#: onnxruntime threads per session; unset or -1 lets onnxruntime decide (all cores). Set it when several
#: worker processes share a machine.
THREADS_ENV = "SWITCHBOARD_OCR_THREADS"
SUMMARY_CHARS = 60
OVERLAY_COLOUR = (255, 0, 160)
REGION_COLOUR = (0, 120, 255)


class OcrArgs(BaseModel):
    image: ImageRef
    region: list[int] | None = Field(
        default=None, min_length=4, max_length=4,
        description="Only read inside [x1, y1, x2, y2], on a 0-1000 scale of the image's width and height.")
    min_confidence: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Drop text the recogniser is less sure of than this (0-1).")

    @model_validator(mode="after")
    def _check_region(self) -> OcrArgs:
        if self.region is not None:
            x1, y1, x2, y2 = self.region
            if not (0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000):
                raise ValueError("region must be x1 < x2 and y1 < y2 within 0-1000")
        return self


class OcrLine(BaseModel):
    """One line of text as read: the words left to right, the weakest word's score, its pixel box."""

    text: str
    score: float = Field(description="Recognition confidence, 0-1 (the lowest of the line's pieces).")
    box: list[int] = Field(description="Pixel xyxy in the whole image.")


class OcrResult(ExpertResult):
    text: str = Field(description="Every line read, top to bottom, joined by newlines.")
    lines: list[OcrLine]


class OcrExpert(Expert):
    name = "ocr"
    description = ("Read the text in an image (signs, labels, documents, screenshots); "
                   "returns the text, its lines with boxes, and an overlay.")
    Args = OcrArgs
    Result = OcrResult
    time_limit = 60.0
    examples = [
        Example(request="what does the sign say", args={"image": "{image}"}),
        Example(request="read the text in this picture", args={"image": "{image}"}),
        Example(request="transcribe the writing", args={"image": "{image}"}),
        Example(request="what is written on it?", args={"image": "{image}"}),
        Example(request="read the words at the top of the image",
                args={"image": "{image}", "region": [0, 0, 1000, 500]}),
        Example(request="what does the label on the left say",
                args={"image": "{image}", "region": [0, 0, 500, 1000]}),
        Example(request="read the text, only the parts you are sure of",
                args={"image": "{image}", "min_confidence": 0.8}),
        # more phrasings, questions as well as commands: a router learns what this expert is for from
        # these (item i % 4 == 3 of the list is held out of the core's training)
        Example(request="what text is in the image?", args={"image": "{image}"}),
        Example(request="read this for me", args={"image": "{image}"}),
        Example(request="can you tell me what the writing on it reads?", args={"image": "{image}"}),
        Example(request="extract the text from this image", args={"image": "{image}"}),
        Example(request="which words appear in the picture?", args={"image": "{image}"}),
        Example(request="copy out the printed text", args={"image": "{image}"}),
        Example(request="what do the letters on it spell?", args={"image": "{image}"}),
        Example(request="get the text at the bottom of the image",
                args={"image": "{image}", "region": [0, 500, 1000, 1000]}),
        Example(request="OCR this image", args={"image": "{image}"}),
    ]
    # Train-only breadth for the plain call (examples[0]): many more ways to ask to read the text.
    phrasings = [
        *compose(["read", "read out", "transcribe", "extract", "pull out", "copy", "give me", "tell me",
                  "show me", "recognise", "decode", "type out", "write out", "grab", "list", "get me",
                  "spell out", "dictate"],
                 ["the text", "the writing", "the words", "the printed words", "the lettering", "the caption",
                  "the characters", "any text", "all the text", "the handwriting", "the label text",
                  "what it says", "the inscription"],
                 ["", "in this picture", "on the sign", "from the photo", "in the screenshot", "on the label",
                  "in the document", "from this image", "on it", "from the scan", "in the attachment"]),
        *compose(["what does", "what exactly does", "can you tell me what", "I need to know what"],
                 ["the sign", "the label", "the caption", "the writing", "this note", "the poster",
                  "the banner", "the text", "the screen", "the page", "the heading", "the board", "it"],
                 ["say?", "read?", "say, word for word?"]),
        *compose(["what are the words", "what's the text", "what are the letters", "what's the wording",
                  "what's the caption", "is there any text", "are there any words", "what's printed",
                  "what's the writing", "what characters are"],
                 ["on the sign?", "in the photo?", "on this?", "on the label?", "here?", "in this screenshot?",
                  "on the page?", "in this scan?"]),
        *compose(["run OCR on", "do OCR on", "apply text recognition to", "use OCR on",
                  "perform OCR on", "run text recognition on"],
                 ["the picture", "the photo", "this scan", "the screenshot", "the attachment", "the document"]),
        *compose(["OCR", "please OCR", "quickly OCR", "OCR and transcribe"],
                 ["the scan", "the screenshot", "the document", "the sign", "it", "that", "the label", "this page",
                  "the poster", "the receipt"]),
        *compose(["which letters", "which characters", "what words", "which numbers", "what lettering"],
                 ["are on the sign?", "are printed on the label?", "can you make out on the poster?",
                  "show up in the screenshot?", "are written on the board?", "are on the receipt?"]),
        "read it out loud", "read me the sign", "what does it say?", "can you read this?", "transcribe it",
        "turn the text in the picture into plain text", "I can't read the sign, help",
        "the writing is too small for me, what does it say?", "convert the image text to a string",
    ]

    def __init__(self) -> None:
        super().__init__()
        self._engine: Any = None

    def setup(self) -> None:
        from rapidocr_onnxruntime import RapidOCR

        threads = int(os.environ.get(THREADS_ENV, "-1"))
        # text_score=0 keeps every recognised region; run() applies the call's own min_confidence, so
        # one engine serves every call without mutating shared state.
        self._engine = RapidOCR(text_score=0.0, intra_op_num_threads=threads, inter_op_num_threads=threads)

    def teardown(self) -> None:
        self._engine = None
        super().teardown()

    def run(self, args: OcrArgs, ctx: RunContext) -> OcrResult:
        img = ctx.open_image(args.image)
        w, h = img.size
        x1, y1, x2, y2 = args.region or (0, 0, 1000, 1000)
        left, top = round(x1 * w / 1000), round(y1 * h / 1000)
        right, bottom = max(left + 1, round(x2 * w / 1000)), max(top + 1, round(y2 * h / 1000))
        ctx.progress(0.1, "reading text")

        raw, _elapsed = self._engine(img.crop((left, top, right, bottom)))
        pieces = []
        for quad, text, score in raw or []:
            text = " ".join(str(text).split())
            if not text or float(score) < args.min_confidence:
                continue
            xs, ys = [p[0] + left for p in quad], [p[1] + top for p in quad]
            pieces.append(OcrLine(text=text, score=round(float(score), 4),
                                  box=[round(min(xs)), round(min(ys)), round(max(xs)), round(max(ys))]))
        lines = merge_into_lines(pieces)
        ctx.progress(0.9, f"read {len(lines)} line(s)")

        text = "\n".join(line.text for line in lines)
        overlay = draw_overlay(img, lines, (left, top, right, bottom) if args.region else None)
        artifacts = [ctx.save_text(text, role="text"), ctx.save_image(overlay, kind="overlay", role="overlay")]
        return OcrResult(summary=summarize(lines, args.region is not None), artifacts=artifacts,
                         text=text, lines=lines)


def merge_into_lines(pieces: list[OcrLine]) -> list[OcrLine]:
    """Join the detector's text regions into lines in reading order.

    PP-OCR's detector often splits a line at wide spaces; regions that share most of their height and
    sit close together left to right are one line. Lines are ordered top to bottom, then left to right.
    """
    rows: list[list[OcrLine]] = []
    for piece in sorted(pieces, key=lambda p: (p.box[1] + p.box[3]) / 2):
        for row in rows:
            top, bottom = min(p.box[1] for p in row), max(p.box[3] for p in row)
            overlap = min(bottom, piece.box[3]) - max(top, piece.box[1])
            if overlap >= 0.5 * min(bottom - top, piece.box[3] - piece.box[1]):
                row.append(piece)
                break
        else:
            rows.append([piece])

    lines: list[OcrLine] = []
    for row in rows:
        row.sort(key=lambda p: p.box[0])
        height = max(p.box[3] - p.box[1] for p in row)
        group = [row[0]]
        for piece in row[1:]:
            # a wide gap means another column, not the next word
            if piece.box[0] - max(p.box[2] for p in group) > 2 * height:
                lines.append(_join(group))
                group = []
            group.append(piece)
        lines.append(_join(group))
    lines.sort(key=lambda ln: (ln.box[1], ln.box[0]))
    return lines


def _join(group: list[OcrLine]) -> OcrLine:
    return OcrLine(text=" ".join(p.text for p in group), score=min(p.score for p in group),
                   box=[min(p.box[0] for p in group), min(p.box[1] for p in group),
                        max(p.box[2] for p in group), max(p.box[3] for p in group)])


def draw_overlay(img: Image.Image, lines: list[OcrLine], region: tuple[int, int, int, int] | None) -> Image.Image:
    """The image with a box around each line read (and the searched region, if one was given)."""
    from PIL import ImageDraw

    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    if region is not None:
        draw.rectangle(region, outline=REGION_COLOUR, width=max(1, width // 2))
    for line in lines:
        draw.rectangle(line.box, outline=OVERLAY_COLOUR, width=width)
    return out


def summarize(lines: list[OcrLine], in_region: bool = False) -> str:
    """One line for the conversation: how many lines and the start of the text."""
    if not lines:
        return "no text found in the region" if in_region else "no text found"
    preview = " / ".join(line.text for line in lines)
    if len(preview) > SUMMARY_CHARS:
        preview = preview[: SUMMARY_CHARS - 1].rstrip() + "…"
    return f'read {len(lines)} line{"" if len(lines) == 1 else "s"}: "{preview}"'
