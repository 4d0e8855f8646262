"""The ocr expert: the shared expert contract, plus reading rendered words back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError
from switchboard_ocr import OcrArgs, OcrExpert, OcrResult
from switchboard_ocr.expert import OcrLine, merge_into_lines, summarize

import switchboard
from switchboard.artifacts import ArtifactStore
from switchboard.expert import RunContext
from switchboard.testing import ExpertContract

WORDS = ["HELLO WORLD", "OPEN 24 HOURS"]
FONT = Path(switchboard.__file__).resolve().parent.parent / "experts" / "assets" / "DejaVuSans.ttf"


def render_text(lines: list[str], size: tuple[int, int] = (480, 200), font_size: int = 48) -> Image.Image:
    """Black text on white, one entry per line, in a large TrueType font (easy for any OCR)."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(str(FONT), font_size)
    for i, line in enumerate(lines):
        draw.text((20, 20 + i * round(font_size * 1.8)), line, fill="black", font=font)
    return img


def _read(expert: OcrExpert, store: ArtifactStore, **args: Any) -> OcrResult:
    result = expert(args, RunContext(store, call_id="c1"))
    assert isinstance(result, OcrResult)
    return result


class TestOcr(ExpertContract):
    expert_cls = OcrExpert

    def make_args(self, store: ArtifactStore) -> dict[str, Any]:
        return {"image": store.put_image(render_text(WORDS)).id}

    def invalid_args(self, store: ArtifactStore) -> list[dict[str, Any]]:
        good = self.make_args(store)
        return [*super().invalid_args(store),
                {**good, "region": [0, 0, 1000]},
                {**good, "region": [600, 0, 400, 1000]},
                {**good, "region": [0, 0, 1000, 1001]},
                {**good, "min_confidence": 1.5},
                {"image": "not an artifact id but far too long to be one " * 3}]

    def test_reads_rendered_words(self, expert: OcrExpert, contract_store: ArtifactStore) -> None:
        result = _read(expert, contract_store, **self.make_args(contract_store))
        assert [line.text.upper() for line in result.lines] == WORDS
        assert result.text.upper() == "\n".join(WORDS)
        assert all(0.5 <= line.score <= 1.0 for line in result.lines)
        # boxes are pixels of the whole image, top line first
        (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = (line.box for line in result.lines)
        assert 0 <= ax1 < ax2 <= 480 and 0 <= ay1 < ay2 <= 200 and ay2 <= by1 + 5
        assert result.summary.upper().startswith('READ 2 LINES: "HELLO WORLD / OPEN 24 HOURS"')

        kinds = {a.role: a.kind for a in result.artifacts}
        assert kinds == {"text": "text", "overlay": "overlay"}
        text_id = next(a.id for a in result.artifacts if a.kind == "text")
        assert contract_store.read_bytes(text_id).decode() == result.text
        overlay_id = next(a.id for a in result.artifacts if a.kind == "overlay")
        overlay = contract_store.open_image(overlay_id)
        assert overlay.size == (480, 200)
        # boxes were drawn: the overlay has coloured pixels, the input only black and white
        pixels = np.asarray(overlay).astype(int)
        assert ((pixels[..., 0] > 200) & (pixels[..., 1] < 100)).any()

    def test_region_reads_only_inside(self, expert: OcrExpert, contract_store: ArtifactStore) -> None:
        image = contract_store.put_image(render_text(WORDS)).id
        result = _read(expert, contract_store, image=image, region=[0, 450, 1000, 1000])
        assert result.text.upper() == "OPEN 24 HOURS"
        (x1, y1, x2, y2), = (line.box for line in result.lines)
        assert y1 >= 90, "boxes are offset back into the whole image"

    def test_blank_image_reads_nothing(self, expert: OcrExpert, contract_store: ArtifactStore) -> None:
        image = contract_store.put_image(render_text([])).id
        result = _read(expert, contract_store, image=image)
        assert result.lines == [] and result.text == ""
        assert result.summary == "no text found"

    def test_min_confidence_filters(self, expert: OcrExpert, contract_store: ArtifactStore) -> None:
        image = contract_store.put_image(render_text(WORDS)).id
        loose = _read(expert, contract_store, image=image, min_confidence=0.0)
        strict = _read(expert, contract_store, image=image, min_confidence=0.995)
        assert all(line.score >= 0.995 for line in strict.lines)
        assert len(strict.lines) <= len(loose.lines)


def test_import_does_not_load_the_engine() -> None:
    # the registry imports every plugin; onnxruntime and the weights load only in setup()
    code = "import sys, switchboard_ocr; print(sorted({'onnxruntime', 'cv2', 'rapidocr_onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


def test_merge_into_lines_joins_words_and_splits_columns() -> None:
    pieces = [OcrLine(text="WORLD", score=0.9, box=[120, 10, 200, 40]),
              OcrLine(text="HELLO", score=0.8, box=[10, 12, 100, 42]),
              OcrLine(text="FAR", score=0.9, box=[400, 10, 460, 40]),
              OcrLine(text="NEXT", score=0.95, box=[10, 60, 90, 90])]
    lines = merge_into_lines(pieces)
    assert [(ln.text, ln.score, ln.box) for ln in lines] == [
        ("HELLO WORLD", 0.8, [10, 10, 200, 42]), ("FAR", 0.9, [400, 10, 460, 40]), ("NEXT", 0.95, [10, 60, 90, 90])]


def test_summary_is_one_short_line() -> None:
    long = [OcrLine(text="word " * 30, score=1.0, box=[0, 0, 1, 1])] * 3
    summary = summarize(long)
    assert "\n" not in summary and len(summary) < 100 and summary.endswith('…"')
    assert summarize([OcrLine(text="EXIT", score=1.0, box=[0, 0, 1, 1])]) == 'read 1 line: "EXIT"'


def test_args_schema_marks_image_as_artifact() -> None:
    schema = OcrArgs.model_json_schema()
    assert schema["required"] == ["image"]
    assert schema["properties"]["image"]["x-artifact"] == "image"
    with pytest.raises(ValidationError):
        OcrArgs.model_validate({"image": "image-" + "0" * 24, "region": [0, 0, 0, 0]})
