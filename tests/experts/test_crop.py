"""The built-in crop expert passes the contract and crops where it is told."""

from __future__ import annotations

from PIL import Image

from experts.crop import CropExpert
from switchboard.artifacts import ArtifactStore
from switchboard.expert import RunContext
from switchboard.testing import ExpertContract


def _image(store: ArtifactStore) -> str:
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (100, 0, 200, 50))  # top-right quarter red
    return store.put_image(img).id


class TestCrop(ExpertContract):
    expert_cls = CropExpert

    def make_args(self, store: ArtifactStore) -> dict:
        return {"image": _image(store), "region": [500, 0, 1000, 500]}

    def invalid_args(self, store: ArtifactStore) -> list[dict]:
        img = _image(store)
        return [*super().invalid_args(store), {"image": img}, {"image": img, "region": [600, 0, 500, 500]},
                {"image": img, "region": [0, 0, 10]}]

    def test_crops_the_region(self, store: ArtifactStore) -> None:
        result = CropExpert()(self.make_args(store), RunContext(store))
        assert result.regions == [[100, 0, 200, 50]]
        crop = store.open_image(result.artifacts[0].id)
        assert crop.size == (100, 50) and crop.getpixel((50, 25)) == (255, 0, 0)

    def test_crops_boxes_from_another_call(self, store: ArtifactStore) -> None:
        img = _image(store)
        boxes = store.put_json({"boxes": [{"xyxy": [10, 10, 30, 20]}, {"xyxy": [0, 0, 5, 5]}]}, kind="boxes")
        result = CropExpert()({"image": img, "boxes": boxes.id}, RunContext(store))
        assert result.regions == [[10, 10, 30, 20], [0, 0, 5, 5]]
        assert len(result.artifacts) == 2
