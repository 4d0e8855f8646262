"""The edit expert: contract, instruction parsing, pixels outside the mask kept exactly, edits that
the detector confirms, real diffusers inpainting folders, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experts.edit import EditExpert, EditRejected, crop_box, plan_edit
from switchboard.artifacts import ArtifactStore
from switchboard.expert import RunContext
from switchboard.settings import get_settings
from switchboard.testing import ExpertContract
from training.shapes import make_scene

from .diffusers_fixtures import build_tiny_sd

pytestmark = pytest.mark.usefixtures("no_network")
SHIPPED = get_settings().models_dir / "generator"
needs_weights = pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="models/generator not trained")


def scene_with_box_mask(store: ArtifactStore, seed: int = 3, grow: int = 3) -> tuple[str, str, np.ndarray, object]:
    scene = make_scene(seed, size=256, max_objects=3)
    obj = max(scene.objects, key=lambda o: o.area)
    x1, y1, x2, y2 = (int(v) for v in obj.box)
    mask = np.zeros((256, 256), bool)
    mask[max(0, y1 - grow):y2 + grow, max(0, x1 - grow):x2 + grow] = True
    img = store.put_image(scene.image).id
    m = store.put_image(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), kind="mask").id
    return img, m, mask, scene


@pytest.fixture(scope="module")
def editor() -> EditExpert:
    expert = EditExpert()
    expert.ensure_setup()
    return expert


@pytest.mark.parametrize(("instruction", "prompt", "action"), [
    ("replace it with a blue square", "a blue square", "replace"),
    ("Replace the red circle with an orange star.", "an orange star", "replace"),
    ("turn it into a hexagon", "a hexagon", "replace"),
    ("make it green", "a green shape", "recolour"),
    ("paint it yellow please", "a yellow shape", "recolour"),
    ("change it to purple", "a purple shape", "recolour"),
    ("remove it", "an empty background", "remove"),
    ("erase that", "an empty background", "remove"),
    ("get rid of the star", "an empty background", "remove"),
])
def test_plan_edit(instruction: str, prompt: str, action: str) -> None:
    plan = plan_edit(instruction)
    assert (plan.prompt, plan.action) == (prompt, action)
    assert (plan.strength < 1.0) == (action == "recolour")


def test_plan_edit_rejects_empty() -> None:
    with pytest.raises(EditRejected):
        plan_edit("   ")


def test_crop_box_is_square_and_contains_the_mask() -> None:
    mask = np.zeros((100, 200), bool)
    mask[10:30, 150:190] = True
    x1, y1, x2, y2 = crop_box(mask)
    assert 0 <= x1 <= 150 and 190 <= x2 <= 200 and 0 <= y1 <= 10 and 30 <= y2 <= 100
    assert x2 - x1 == y2 - y1


@needs_weights
class TestEdit(ExpertContract):
    expert_cls = EditExpert

    def make_args(self, store: ArtifactStore) -> dict:
        img, m, _, _ = scene_with_box_mask(store)
        return {"image": img, "mask": m, "instruction": "replace it with a blue square", "steps": 4, "seed": 1}

    def invalid_args(self, store: ArtifactStore) -> list[dict]:
        good = self.make_args(store)
        return [*super().invalid_args(store), {**good, "instruction": ""}, {k: v for k, v in good.items() if k != "mask"},
                {**good, "steps": 0}]

    def test_outside_the_mask_is_unchanged(self, editor: EditExpert, store: ArtifactStore) -> None:
        img, m, mask, scene = scene_with_box_mask(store, seed=8)
        res = editor({"image": img, "mask": m, "instruction": "make it blue", "steps": 5, "seed": 2}, RunContext(store))
        before, after = np.asarray(scene.image), np.asarray(store.open_image(res.artifacts[0].id))
        assert np.array_equal(before[~mask], after[~mask])
        assert not np.array_equal(before[mask], after[mask])
        assert res.changed_pixels == int(mask.sum())

    def test_same_seed_same_edit(self, editor: EditExpert, store: ArtifactStore) -> None:
        img, m, _, _ = scene_with_box_mask(store, seed=9)
        args = {"image": img, "mask": m, "instruction": "remove it", "steps": 4, "seed": 5}
        a, b = editor(args, RunContext(store)), editor(args, RunContext(store))
        assert a.artifacts[0].id == b.artifacts[0].id  # content-addressed: same pixels, same id

    def test_mask_size_mismatch_and_empty_mask(self, editor: EditExpert, store: ArtifactStore) -> None:
        img, _, _, _ = scene_with_box_mask(store)
        small = store.put_image(Image.new("L", (10, 10), 255), kind="mask").id
        with pytest.raises(EditRejected, match="must match"):
            editor({"image": img, "mask": small, "instruction": "remove it"}, RunContext(store))
        empty = store.put_image(Image.new("L", (256, 256), 0), kind="mask").id
        with pytest.raises(EditRejected, match="empty"):
            editor({"image": img, "mask": empty, "instruction": "remove it"}, RunContext(store))

    def test_progress(self, editor: EditExpert, store: ArtifactStore) -> None:
        img, m, _, _ = scene_with_box_mask(store)
        events: list[float] = []
        editor({"image": img, "mask": m, "instruction": "remove it", "steps": 4, "seed": 1},
               RunContext(store, progress=lambda f, _m: events.append(f)))
        assert events == [0.25, 0.5, 0.75, 1.0]

    @pytest.mark.slow
    def test_edits_the_detector_confirms(self, editor: EditExpert, store: ArtifactStore) -> None:
        from training.editor import edit_cases, judge_case
        from training.generator import Judge

        judge = Judge()
        cases = edit_cases(6)
        ok = 0
        for case in cases:
            img = store.put_image(case["scene"].image).id
            m = store.put_image(Image.fromarray(case["mask"].astype(np.uint8) * 255, mode="L"), kind="mask").id
            res = editor({"image": img, "mask": m, "instruction": case["instruction"], "seed": case["seed"]},
                         RunContext(store))
            edited = store.open_image(res.artifacts[0].id)
            ok += judge_case(case, judge.detector._predict([edited], 0.25)[0])
        assert ok >= 4, f"{ok}/6 edits confirmed by the detector"


def test_real_diffusers_inpainting_same_code(tmp_path_factory: pytest.TempPathFactory, store: ArtifactStore,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sd = build_tiny_sd(tmp_path_factory.mktemp("tiny-sd-edit"))
    monkeypatch.setenv("SWITCHBOARD_GENERATE_MODEL", str(sd))
    get_settings.cache_clear()
    try:
        expert = EditExpert()
        img, m, mask, scene = scene_with_box_mask(store)
        res = expert({"image": img, "mask": m, "instruction": "replace it with a blue square", "steps": 3, "seed": 1},
                     RunContext(store))
        assert type(expert._pipe).__name__ == "StableDiffusionInpaintPipeline"
        before, after = np.asarray(scene.image), np.asarray(store.open_image(res.artifacts[0].id))
        assert np.array_equal(before[~mask], after[~mask])
    finally:
        get_settings.cache_clear()


def test_missing_generator_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experts.generate import GeneratorWeightsMissing

    monkeypatch.setenv("SWITCHBOARD_GENERATE_MODEL", str(tmp_path / "nowhere"))
    get_settings.cache_clear()
    try:
        with pytest.raises(GeneratorWeightsMissing):
            EditExpert().ensure_setup()
    finally:
        get_settings.cache_clear()
