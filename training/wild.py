"""The wild evaluation set (``training/evalsets/wild.jsonl``): loading, its images, and its scorer.

The set holds requests written by someone who never saw the training data (see the folder's
README.md). **Never train on it**, never use its requests as templates, seeds or few-shot examples,
and never read its individual requests to tune a method: it measures generalisation, so look only
at the aggregate metrics that ``score`` returns.

    from training.wild import load, resolve_image, score
    items = load()
    preds = [my_router(it.request, it.image is not None) for it in items]   # expert sequences
    print(score(preds, items))

Images are resolved offline from files that installed packages bundle: scikit-image's sample data
(``skimage:astronaut`` …), ultralytics' assets (``ultralytics:bus.jpg``), matplotlib's sample data
(``matplotlib:grace_hopper.jpg``), and ``scene``: one deterministic shapes-world scene.

Scoring follows the README: the predicted expert sequence must equal the expected one, except that
a grounding ``detect`` directly before a ``segment`` may be added or dropped (the segmenter can
ground a text target itself), and an expected bare ``edit`` accepts ``segment → edit`` (edit needs a
mask). Dropping the ``segment`` before an expected ``edit`` is an error.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

WILD_SET = Path(__file__).resolve().parent / "evalsets" / "wild.jsonl"
CATEGORIES = ("generate", "detect", "segment", "edit", "crop", "chain", "none")
EXPERT_CATEGORIES = ("generate", "detect", "segment", "edit", "crop")
SCENE_SEED_INDEX = 0  # the wild set's "scene" is the first held-out shapes-world scene


@dataclass(frozen=True)
class WildItem:
    id: str
    request: str
    image: str | None
    expected: tuple[str, ...]
    args: tuple[dict[str, Any], ...] = field(default=())
    category: str = ""
    style: str = ""


def load(path: Path = WILD_SET) -> list[WildItem]:
    items = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: {e}") from None
        items.append(WildItem(row["id"], row["request"], row.get("image"), tuple(row["expected"]),
                              tuple(row.get("args") or ()), row.get("category", ""), row.get("style", "")))
    return items


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the wild set needs the package {name!r} for its images (pip install "
                                f"{'scikit-image' if name == 'skimage' else name})")
    return Path(next(iter(spec.submodule_search_locations)))


def image_path(ref: str) -> Path | None:
    """The bundled file behind an image reference (None for ``scene``, which is rendered)."""
    if ref == "scene":
        return None
    source, _, name = ref.partition(":")
    if source == "skimage":
        folder = _package_dir("skimage") / "data"
        hits = sorted(folder.glob(f"{name}.*"))
        if not hits:
            raise FileNotFoundError(f"scikit-image does not bundle {name!r} in {folder}")
        return hits[0]
    if source == "ultralytics":
        return _package_dir("ultralytics") / "assets" / name
    if source == "matplotlib":
        return _package_dir("matplotlib") / "mpl-data" / "sample_data" / name
    raise ValueError(f"unknown image source in {ref!r}")


@lru_cache(maxsize=16)
def resolve_image(ref: str):
    """The PIL image (RGB) of an image reference such as ``skimage:chelsea`` or ``scene``."""
    from PIL import Image

    if ref == "scene":
        from training.core_data import scene_image, scene_seeds

        return scene_image(scene_seeds("heldout", SCENE_SEED_INDEX + 1)[SCENE_SEED_INDEX]).convert("RGB")
    with Image.open(image_path(ref)) as im:
        return im.convert("RGB")


# -- scoring ----------------------------------------------------------------------------------------
def _drop_grounding(seq: Sequence[str]) -> tuple[str, ...]:
    """The sequence without any ``detect`` that directly precedes a ``segment``."""
    return tuple(e for i, e in enumerate(seq) if not (e == "detect" and i + 1 < len(seq) and seq[i + 1] == "segment"))


def _mask_bare_edits(seq: Sequence[str]) -> tuple[str, ...]:
    """``segment`` inserted before each ``edit`` that is not already preceded by one."""
    out: list[str] = []
    for e in seq:
        if e == "edit" and (not out or out[-1] != "segment"):
            out.append("segment")
        out.append(e)
    return tuple(out)


def sequence_matches(predicted: Sequence[str], expected: Sequence[str]) -> bool:
    """Whether a predicted expert sequence answers an expected one (see the module doc)."""
    p, e = _drop_grounding(list(predicted)), _drop_grounding(list(expected))
    return p == e or p == _drop_grounding(_mask_bare_edits(list(expected)))


def score(predicted: Sequence[Sequence[str]], items: Sequence[WildItem]) -> dict[str, Any]:
    """Aggregate routing metrics of predicted expert sequences (one per item, in order).

    ``expert_accuracy``: all items; ``none_accuracy``: items that expect no expert;
    ``chain_accuracy``: category chain; ``per_category`` (and ``per_expert``, its five single-expert
    categories): accuracy per category; ``n`` and ``counts`` per category; ``false_call_rate``: the
    share of no-expert items that got a call; ``missed_call_rate``: the share of items expecting a
    call that got none."""
    if len(predicted) != len(items):
        raise ValueError(f"{len(predicted)} predictions for {len(items)} items")
    ok_by: Counter[str] = Counter()
    n_by: Counter[str] = Counter()
    ok_all = none_ok = none_n = missed = call_n = 0
    for pred, it in zip(predicted, items, strict=True):
        ok = sequence_matches(list(pred), list(it.expected))
        ok_all += ok
        ok_by[it.category] += ok
        n_by[it.category] += 1
        if not it.expected:
            none_n += 1
            none_ok += not pred
        else:
            call_n += 1
            missed += not pred

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    per_category = {c: ratio(ok_by[c], n_by[c]) for c in sorted(n_by, key=lambda c: (
        CATEGORIES.index(c) if c in CATEGORIES else 99, c))}
    return {"expert_accuracy": ratio(ok_all, len(items)),
            "none_accuracy": ratio(none_ok, none_n),
            "chain_accuracy": ratio(ok_by["chain"], n_by["chain"]),
            "per_expert": {c: per_category[c] for c in EXPERT_CATEGORIES if c in per_category},
            "per_category": per_category,
            "false_call_rate": ratio(none_n - none_ok, none_n),
            "missed_call_rate": ratio(missed, call_n),
            "n": len(items), "counts": dict(n_by)}


def calls_to_sequence(calls: Sequence[Any]) -> list[str]:
    """Expert names of parsed calls (``orchestrator.commands`` Calls or dicts), in order."""
    return [c["expert"] if isinstance(c, dict) else c.expert for c in calls]
