"""CoreModel: inputs, greedy generation, streaming, logits processors — on a tiny random LLaVA."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from orchestrator.core import model as cm  # noqa: E402
from orchestrator.core.format import IM_END  # noqa: E402
from tests.orchestrator.core.tiny import tiny_core  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
IMG = "image-3f9a2b1c0d4e5f6a7b8c9d0e"


@pytest.fixture(scope="module")
def core():
    return tiny_core()


@pytest.fixture(scope="module")
def image():
    from training.shapes import make_scene

    return make_scene(7, size=64).image


def test_encode_expands_images_and_masks_the_prompt(core, image):
    msgs = [{"role": "user", "content": "find the red circle", "images": [IMG]}]
    enc = core.encode(msgs, {IMG: image}, answer="ok")
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.count(core.image_token_id) == core.image_seq_length == 16
    n_answer = sum(1 for x in labels if x != -100)
    assert labels[-n_answer:] == ids[-n_answer:]
    assert core.tokenizer.decode(ids[-n_answer:]) == "ok" + IM_END
    assert enc["images"] == [image]


def test_missing_pixels_is_a_clear_error(core):
    with pytest.raises(ValueError, match=IMG):
        core.encode([{"role": "user", "content": "x", "images": [IMG]}], {})


def test_pixel_values_are_normalised(core, image):
    pv = core.pixel_values([image, image.convert("L")])
    assert pv.shape == (2, 3, cm.IMAGE_SIZE, cm.IMAGE_SIZE)
    assert -1.0 <= float(pv.min()) and float(pv.max()) <= 1.0


def test_generate_streams_what_it_returns(core, image):
    pieces: list[str] = []
    msgs = [{"role": "user", "content": "hello", "images": [IMG]}]
    text = core.generate(msgs, {IMG: image}, max_new_tokens=6, on_text=pieces.append)
    assert isinstance(text, str)
    assert "".join(pieces) == text


def test_batch_matches_one_at_a_time(core, image):
    a = ([{"role": "user", "content": "hi"}], {})
    b = ([{"role": "user", "content": "a much longer request about the picture", "images": [IMG]}], {IMG: image})
    batch = core.generate_batch([a, b], max_new_tokens=5)
    assert batch == [core.generate(*a, max_new_tokens=5), core.generate(*b, max_new_tokens=5)]


def test_logits_processor_is_applied(core):
    from transformers import LogitsProcessor

    only = core.tokenizer("a", add_special_tokens=False)["input_ids"][0]

    class OnlyA(LogitsProcessor):
        def __call__(self, input_ids, scores):
            mask = torch.full_like(scores, float("-inf"))
            mask[:, only] = 0
            return scores + mask

    text = core.generate([{"role": "user", "content": "x"}], {}, max_new_tokens=4, logits_processor=[OnlyA()])
    assert text == "aaaa"


def test_load_refuses_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one"):
        cm.CoreModel.load(tmp_path / "nothing")


@pytest.mark.slow
def test_shipped_core_routes_a_detection_request():
    shipped = REPO / "models" / "core"
    if not (shipped / "adapter").exists():
        pytest.skip("no shipped core")
    from orchestrator.commands import parse
    from training.shapes import make_scene

    core = cm.CoreModel.load(shipped)
    msgs = [{"role": "user", "content": "find the red circle", "images": [IMG]}]
    reply = core.generate(msgs, {IMG: make_scene(1, size=128).image}, max_new_tokens=60)
    calls = parse(reply).calls
    assert calls and calls[0].expert == "detect" and calls[0].args.get("image") == IMG
