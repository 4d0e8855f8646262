"""`switchboard chat` on real photographs never describes shapes that are not there (#31).

The shipped assistant (router + core + experts, in-process) is asked about each bundled photograph:
what is in it, and to find every object in it. The embedded core's vision and the embedded
detector only know the shapes world, so no answer may name a coloured shape.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.core.fusion import COLOUR_SHAPE
from switchboard.settings import REPO_ROOT, Settings
from tests.experts.photos import bundled_photos

CORE_DIR = REPO_ROOT / "models" / "core"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not CORE_DIR.is_dir(), reason="the shipped core is absent")
def test_chat_on_photos_names_no_shapes(tmp_path: Path) -> None:
    from orchestrator.runtime import build_assistant

    photos = bundled_photos()
    assert len(photos) >= 20
    assistant = build_assistant(Settings(artifact_dir=tmp_path / "artifacts"))
    told: list[str] = []
    for i, photo in enumerate(photos):
        image = assistant.store.import_image(photo.read_bytes()).id
        questions = ["What is in this picture?"] + (["find every object in this photo"] if i % 8 == 0 else [])
        for question in questions:
            result = assistant.run(question, images=[image])
            told.append(f"{photo.name} / {question}: {result.answer}")
            assert not COLOUR_SHAPE.search(result.answer), told[-1]
    # the honest answers say why, rather than nothing
    assert any("photograph" in t for t in told), told
