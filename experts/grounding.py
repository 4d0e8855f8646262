"""Grounding a text target for segment: which object does "the largest red square" mean?

detect is asked for everything in the image (through ``ctx.call``, at a low confidence: the
expression's constraints do the picking). Every detection is segmented, detections of one object
under different classes are merged, and each candidate's colour is read from the pixels under its
mask. The expression (parsed with ``experts.referring``, the vocabulary detect uses too) then picks
one: colour, noun (the detector's class, a synonym of one, or whatever detect's own query matching
finds for the words), and a pick (largest/smallest by mask area, left/right/top/bottom by the
centre of the mask's box). detect's boxes and the candidates are memoised per image, so several
targets on one image run the detector once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from experts.colour import read_colour
from experts.referring import QueryMatcher, box_iou, parse_target, pick_one
from experts.sam_runner import LRU, ImageEmbedding, SamRunner, mask_bbox
from switchboard.errors import SwitchboardError, UnknownExpert
from switchboard.expert import RunContext

if TYPE_CHECKING:
    from PIL import Image


class TargetUnresolvable(SwitchboardError):
    """A text target that cannot be grounded (no detect expert, or nothing to segment it with)."""

    code = "target_unresolvable"


def mask_colour(image: Image.Image, mask: np.ndarray, fallback: str | None) -> str | None:
    """The colour name of the pixels under ``mask`` (the reader detect uses), else what detect said."""
    box = mask_bbox(mask)
    if box[2] <= box[0]:
        return fallback
    return read_colour(image, box, mask)


class Grounder:
    """Grounds text targets with one segmenter (``runner``), detect's boxes at ``confidence``, and a
    memo shared across calls (detect's boxes and the segmented candidates, per image and query)."""

    def __init__(self, runner: SamRunner, memo: LRU, confidence: float) -> None:
        self.runner = runner
        self.memo = memo
        self.confidence = confidence
        #: detect's own words when it judged the image outside its world (then there is nothing to ground)
        self.out_of_domain: str | None = None

    def ground(self, target: str, image_id: str, image: Image.Image, emb: ImageEmbedding,
               ctx: RunContext) -> tuple[list[float] | None, list[str], str]:
        """Find the box of the object ``target`` names: detect, segment every detection, filter, rank.

        detect is asked for everything (at a low confidence: the expression's constraints do the
        picking); detections of one object under different classes are merged into one candidate that
        keeps every class guess and its score. The colour is read from the pixels under each
        candidate's mask. The noun keeps candidates whose best guess is that class, or failing that,
        whose guesses include it with at least half the best score (detectors confuse shapes far more
        often than colours); with no such candidate, the closest object of the right colour is taken.
        """
        q = parse_target(target)
        cands = self._candidates(ctx, image_id, image, emb, "everything")
        pool = [c for c in cands if q.colours is None or c["colour"] in q.colours]
        how = "matched"
        if q.noun and pool:
            classes = self._noun_classes(ctx, image_id, q.noun, cands)
            strict = [c for c in pool if max(c["classes"], key=c["classes"].get) in classes]
            loose = [c for c in pool
                     if max((c["classes"].get(k, 0.0) for k in classes), default=0.0) >= 0.5 * max(c["classes"].values())]
            if strict or loose:
                pool = strict or loose
                how = "matched" if strict else f"matched a second guess of {q.noun}"
            elif q.colours:
                colour = "/".join(sorted(q.colours))
                how = f"no {colour} {q.noun} detected; closest {colour} object"
            else:
                pool = []
        self.out_of_domain = self.memo.get(("out_of_domain", image_id))
        if self.out_of_domain and not cands:
            # not "no bus found (found: blue star …)": the detector said it cannot see this image
            return None, [], f"cannot ground {target!r}: {self.out_of_domain}"
        if not pool:
            seen = ", ".join(sorted({c["name"] for c in cands}))
            return None, [], f"no {q.what} found in the image" + (f" (found: {seen})" if seen else "")
        if q.pick is not None:
            # positions are the centres of the masks' boxes: the visible part, as a person sees it
            pick = pick_one(pool, q.pick, area=lambda c: c["area"],
                            centre=lambda c: ((c["mbox"][0] + c["mbox"][2]) / 2, (c["mbox"][1] + c["mbox"][3]) / 2))
        else:
            pick = max(pool, key=lambda c: c["score"])
        return pick["box"], [pick["name"]], f"{target!r} -> {pick['name']} ({how}; {len(pool)} candidate(s))"

    def _detect(self, ctx: RunContext, image_id: str, query: str) -> list[dict[str, Any]]:
        """The boxes of a detect call (the boxes artifact's entries), memoised per image like the
        embeddings: several targets on one image run the detector once."""
        key = ("detect", image_id, query, self.confidence)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        boxes = self._run_detect(ctx, image_id, query)
        self.memo.put(key, boxes)
        return boxes

    def _run_detect(self, ctx: RunContext, image_id: str, query: str) -> list[dict[str, Any]]:
        try:
            det = ctx.call("detect", {"image": image_id, "query": query, "confidence": self.confidence})
        except UnknownExpert as e:
            raise TargetUnresolvable("cannot ground a text target: the detect expert is not installed; "
                                     "give boxes or points instead") from e
        if det.get("out_of_domain"):
            self.memo.put(("out_of_domain", image_id), str(det.get("summary", "judged the image out of its domain")))
        boxes_art = next((a for a in det.get("artifacts", []) if a.get("kind") == "boxes"), None)
        return list(ctx.read_json(boxes_art["id"]).get("boxes", [])) if boxes_art else []

    def _noun_classes(self, ctx: RunContext, image_id: str, noun: str, cands: list[dict[str, Any]]) -> set[str]:
        """The detector classes ``noun`` names: itself or the class it is a synonym of, when that is a
        class seen here, else whatever detect's own query matching (similar words) finds for it."""
        known = {k for c in cands for k in c["classes"]}
        named = noun if noun in known else QueryMatcher(sorted(known)).lookup(noun)
        if named is not None:
            return {named}
        return {_box_class(b) for b in self._detect(ctx, image_id, noun)}

    def _candidates(self, ctx: RunContext, image_id: str, image: Image.Image, emb: ImageEmbedding,
                    query: str) -> list[dict[str, Any]]:
        """detect's boxes for ``query``, each segmented (mask area, colour of the masked pixels)."""
        key = ("candidates", image_id, query, self.confidence)
        hit = self.memo.get(key)
        if hit is None:
            hit = self._segment_detections(image, emb, self._detect(ctx, image_id, query))
            self.memo.put(key, hit)
        return hit

    def _segment_detections(self, image: Image.Image, emb: ImageEmbedding,
                            found: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not found:
            return []
        masks, scores = self.runner.predict(emb, boxes=np.array([b["xyxy"] for b in found], np.float32))
        cands = []
        for b, m, s in zip(found, masks[:, 0], scores[:, 0], strict=True):
            if not m.any():
                continue
            score = float(b.get("score", s))
            cands.append({"box": [float(v) for v in b["xyxy"]], "mask": m, "area": int(m.sum()), "mbox": mask_bbox(m),
                          "classes": {_box_class(b): score}, "score": score, "fallback_colour": b.get("colour")})
        cands = _merge_duplicates(cands)
        for c in cands:
            c["colour"] = mask_colour(image, c["mask"], c.pop("fallback_colour"))
            noun = max(c["classes"], key=c["classes"].get)
            c["name"] = f"{c['colour']} {noun}" if c["colour"] else noun
        return cands


def _box_class(box: dict[str, Any]) -> str:
    """The class of a detect box: its ``shape`` field, else the last word of its label."""
    return str(box.get("shape") or (str(box.get("label", "")).split() or ["object"])[-1])


def _merge_duplicates(cands: list[dict[str, Any]], thresh: float = 0.7) -> list[dict[str, Any]]:
    """Detections of one object under different classes (boxes with IoU > ``thresh``; a detector's
    per-class NMS keeps both) become one candidate: the best-scored one's box and mask, with every
    class guess of the group and its best score."""
    out: list[dict[str, Any]] = []
    for c in sorted(cands, key=lambda c: -c["score"]):
        for o in out:
            if box_iou(o["box"], c["box"]) > thresh:
                for k, v in c["classes"].items():
                    o["classes"][k] = max(v, o["classes"].get(k, 0.0))
                break
        else:
            out.append({**c, "classes": dict(c["classes"])})
    return out
