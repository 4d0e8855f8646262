"""The wild set's loader, images and scorer (aggregate use only: never train on the set)."""

from __future__ import annotations

import pytest

from training import wild


def test_set_loads_and_is_consistent():
    items = wild.load()
    assert len(items) == 458 and len({it.id for it in items}) == len(items)
    assert {it.category for it in items} == set(wild.CATEGORIES)
    assert all((it.category == "none") == (not it.expected) for it in items)


def test_gold_scores_perfectly_and_no_call_scores_the_none_share():
    items = wild.load()
    gold = wild.score([list(it.expected) for it in items], items)
    assert gold["expert_accuracy"] == 1.0 and gold["none_accuracy"] == 1.0 and gold["chain_accuracy"] == 1.0
    assert set(gold["per_expert"]) == set(wild.EXPERT_CATEGORIES)
    empty = wild.score([[] for _ in items], items)
    assert empty["none_accuracy"] == 1.0 and empty["missed_call_rate"] == 1.0
    assert empty["expert_accuracy"] == round(sum(not it.expected for it in items) / len(items), 4)
    with pytest.raises(ValueError):
        wild.score([[]], items)


def test_images_resolve_offline():
    pytest.importorskip("skimage")
    pytest.importorskip("ultralytics")
    refs = sorted({it.image for it in wild.load() if it.image})
    assert "scene" in refs
    for ref in refs:
        im = wild.resolve_image(ref)
        assert im.mode == "RGB" and min(im.size) >= 64, ref
