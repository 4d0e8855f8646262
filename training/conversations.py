"""Closed-loop evaluation: scripted multi-turn conversations through the real loop (issue #26).

    switchboard eval conversations --json [--n N] [--seed S] [--errors FILE]   # N: 200 by default
    switchboard eval conversations --n 200 --turns T.jsonl --artifacts DIR   # keep what it needs to ...
    switchboard eval conversations --rescore T.jsonl --artifacts DIR         # ... check again, loop not rerun

Each conversation attaches a HELD-OUT shapes-world scene (``training.core_data`` held-out scene
seeds, never used in training) and talks to the assistant exactly as ``switchboard chat`` does
(``orchestrator.runtime.build_assistant``: router, core, experts, fusion; nothing teacher-forced).
Every turn's outcome is checked on the scene's ground truth (boxes, masks, pixels) and every answer's
claims against the call results and the scene. Conversations cycle through five scripts:

* ``describe`` — "what is in this picture?": the colour-shape pairs the answer names vs the scene's.
* ``count``    — "how many <shape>s are there?": the number the answer gives vs the scene's count.
* ``find``     — "find <ref>" (a detect box of the object, IoU >= 0.5; no box on another object),
  then the follow-ups "now segment it" (the masks' union has IoU >= 0.5 with the object's mask) and
  "now remove it" (an edit whose output no longer shows the object's colour inside its mask, and
  whose pixels outside the (slightly dilated) mask are unchanged).
* ``recolour`` — "make <ref> <colour2>": most of the pixels inside the object's mask (a majority)
  are now nearest to colour2 of the palette (object colours and backgrounds), the pixels outside
  unchanged.
* ``refseg``   — "segment <ref>" in phrasings written here (not the training templates): success is
  a mask IoU >= 0.85; ``referring_miou`` is the mean IoU (0 without a mask).

``<ref>`` is one of the scene's referring expressions (it picks out exactly one object).

Metrics: ``answer_faithfulness`` (share of answers whose every claim — colour-shape pairs named,
counts, actions said: found / masked / drew / removed / recoloured, failures owned up to — is true
of the call results or of the scene, and that say what an edit of the turn did: a count that matches
what a call returned is faithful even when the call miscounted, which ``count_exact``/``turn_success``
then record), ``turn_success``, ``followup_success`` (follow-up turns only), ``success_by_turn`` and
``faithfulness_by_turn`` (per kind of turn), ``describe_f1`` (micro F1 of colour-shape pairs named vs
present), ``count_exact``, ``referring_miou``, counts and seconds. Measurement only: nothing is trained
(``switchboard train conversations`` says so). The default is the issue's 200 conversations (280 turns);
on the 2-core development machine that is ~30-60 min (describe and count turns, answered from the
detector's evidence, take ~1 s; edit turns ~15 s), so develop with ``--n 20``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from training.core_data import HELDOUT_SCENE_SEED
from training.shapes import BACKGROUNDS, COLOURS, PLURALS, SHAPES, Scene, make_scene, scene_seed

SCRIPTS = ("describe", "count", "find", "recolour", "refseg")
FOLLOWUP_KINDS = ("segment_followup", "remove_followup")
SCENE_SIZE = 256  # the shapes world's canonical size (what the detector and segmenter were trained on)

# Thresholds (module constants so the report can quote them).
FIND_IOU = 0.5         # a detect box counts as the object at this box IoU
SEGMENT_IOU = 0.5      # "now segment it": the masks' union vs the object's mask
REFSEG_IOU = 0.85      # referring segmentation success
REMOVED_MAX_LEFT = 0.2   # share of the object's pixels still nearest its colour after a removal
RECOLOURED_MIN = 0.5     # share of the object's pixels nearest the new colour after a recolour (a majority)
OUTSIDE_DILATE = 3       # pixels: the edit may bleed this far past the ground-truth mask
OUTSIDE_TOLERANCE = 8    # max |channel difference| still counted as "unchanged"
OUTSIDE_MAX_CHANGED = 0.005  # share of the pixels outside the dilated mask allowed to change

# -- phrasings (the find/segment/remove follow-ups are the issue's; the referring-segmentation ones
#    are written here and are not in the core's or router's training templates) ----------------------
DESCRIBE_PHRASINGS = ["what is in this picture?", "what do you see in this image?",
                      "describe this picture for me", "what's in the image?"]
COUNT_PHRASINGS = ["how many {plural} are there?", "how many {plural} can you see?",
                   "how many {plural} are in this picture?"]
FIND_PHRASINGS = ["find {ref}", "find {ref} in this picture", "where is {ref}?"]
SEGMENT_FOLLOWUPS = ["now segment it", "now segment it please", "great, now segment it"]
REMOVE_FOLLOWUPS = ["now remove it", "ok, now remove it", "now remove it from the picture"]
RECOLOUR_PHRASINGS = ["make {ref} {colour2}", "please make {ref} {colour2}"]
REFSEG_PHRASINGS = [
    "which pixels make up {ref}? I need them as a mask",
    "could you separate {ref} out of this image for me, pixel by pixel",
    "I'd like a precise segmentation covering just {ref}",
    "please produce a mask that covers only {ref}",
    "highlight exactly the area taken up by {ref}, as a mask",
    "can you give me the pixel region that belongs to {ref}?",
]

_NUMBER_WORDS = {"no": 0, "zero": 0, "none": 0, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4,
                 "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_NUM_RE = r"\d+|" + "|".join(_NUMBER_WORDS) + r"|an|a"
# "<number>? <colour>? <shape>(s)" — e.g. "two red circles", "no stars", "a blue square", "hexagon"
_OBJECT = re.compile(rf"\b(?:(?P<num>{_NUM_RE})\s+)?(?:(?P<colour>{_COLOUR_RE})\s+)?(?P<shape>{_SHAPE_RE})(?:e?s)?\b")
_BARE_NUMBER = re.compile(rf"\b(\d+|{'|'.join(k for k in _NUMBER_WORDS if k != 'none')})\b")
_FAILURE = re.compile(r"\b(could ?n[o']?t|could not|cannot|can't|unable|fail(?:ed|s|ure)?|sorry|error|"
                      r"not (?:able|found|possible)|nothing (?:found|to)|did ?n[o']?t find|no match(?:es)?)\b")
_NEGATION = re.compile(r"\b(no|not|never|nothing|none|without)\b|n't\b")
ACTIONS: dict[str, re.Pattern[str]] = {
    "found": re.compile(r"\b(found|detected|located|spotted|boxed)\b"),
    # not "repainted 1295 masked pixels" (an edit's summary)
    "masked": re.compile(r"\b(segmented|masked(?! pixels| region| area)|outlined|isolated|traced|masks? of|\d+ masks?)\b"),
    "drew": re.compile(r"\b(drew|drawn|generated|rendered)\b"),
    "removed": re.compile(r"\b(removed|erased|deleted|got rid of|remove:)"),
    "edited": re.compile(r"\b(repainted|edited|inpainted)\b"),
}
# "recoloured it blue", "made the red circle blue", "recolour: repainted ... as 'blue square'"
_RECOLOUR_VERB = re.compile(r"\b(recolou?red|recolou?r:|recolou?r|painted|coloured|colored|made|turned|changed)\b")
# an answer to a turn with an edit must say what the edit did ("Here is the mask" after a recolour does not)
_SAYS_EDIT = {
    "remove": re.compile(r"\b(remov\w*|eras\w*|delet\w*|gone|got rid)"),
    "recolour": re.compile(r"\b(recolou?r\w*|colou?red|colored|painted|repainted|made|turned|changed)\b"),
    "replace": re.compile(r"\b(replac\w*|turned|changed|swapp\w*|repainted|put|drew|drawn)\b"),
}
_NOT_RECOLOUR = re.compile(r"\b(masks?|box(?:es)?|overlay|crop|drawing|picture of|image of)\b")


# -- scripts ---------------------------------------------------------------------------------------
@dataclass
class Turn:
    """One user message of a script and what it asks for (``target``: the scene object's index)."""

    kind: str  # describe, count, find, segment_followup, remove_followup, recolour, refseg
    message: str
    target: int | None = None
    shape: str | None = None    # count: the shape counted
    colour: str | None = None   # recolour: the new colour
    ref: str | None = None      # the referring expression used

    @property
    def followup(self) -> bool:
        return self.kind in FOLLOWUP_KINDS


@dataclass
class Script:
    """A scripted conversation on one held-out scene."""

    index: int
    kind: str
    scene_seed: int
    turns: list[Turn]


def heldout_scene_seed(seed: int, index: int) -> int:
    """The held-out scene ``index`` of draw ``seed`` (``training.core_data`` HELDOUT scene seed)."""
    return scene_seed(HELDOUT_SCENE_SEED, seed * 100_000 + index)


@lru_cache(maxsize=512)
def scene_for(seed: int, size: int = SCENE_SIZE) -> Scene:
    return make_scene(seed, size=size)


def _script_for(kind: str, scene: Scene, rng: random.Random) -> list[Turn] | None:
    """The turns of a ``kind`` script on ``scene`` (None when the scene cannot serve it)."""
    if kind == "describe":
        return [Turn("describe", rng.choice(DESCRIBE_PHRASINGS))]
    if kind == "count":
        present = sorted({o.shape for o in scene.objects})
        absent = [s for s in SHAPES if s not in present]
        shape = rng.choice(absent) if absent and rng.random() < 0.25 else rng.choice(present)
        return [Turn("count", rng.choice(COUNT_PHRASINGS).format(plural=PLURALS[shape]), shape=shape)]
    if not scene.referring:
        return None
    ref, target = rng.choice(scene.referring)
    if kind == "find":
        return [Turn("find", rng.choice(FIND_PHRASINGS).format(ref=ref), target=target, ref=ref),
                Turn("segment_followup", rng.choice(SEGMENT_FOLLOWUPS), target=target, ref=ref),
                Turn("remove_followup", rng.choice(REMOVE_FOLLOWUPS), target=target, ref=ref)]
    if kind == "recolour":
        colour2 = rng.choice([c for c in COLOURS if c != scene.objects[target].colour])
        return [Turn("recolour", rng.choice(RECOLOUR_PHRASINGS).format(ref=ref, colour2=colour2), target=target,
                     colour=colour2, ref=ref)]
    if kind == "refseg":
        return [Turn("refseg", rng.choice(REFSEG_PHRASINGS).format(ref=ref), target=target, ref=ref)]
    raise ValueError(f"unknown script kind {kind!r}; kinds: {', '.join(SCRIPTS)}")


def make_scripts(n: int, seed: int = 0, size: int = SCENE_SIZE, kinds: tuple[str, ...] = SCRIPTS) -> list[Script]:
    """``n`` scripted conversations (deterministic for ``seed``): kinds in turn, each on the next
    held-out scene that can serve it."""
    rng = random.Random(f"conversations:{seed}")
    out: list[Script] = []
    index = 0
    for i in range(n):
        kind = kinds[i % len(kinds)]
        while True:
            s = heldout_scene_seed(seed, index)
            index += 1
            turns = _script_for(kind, scene_for(s, size), rng)
            if turns is not None:
                out.append(Script(i, kind, s, turns))
                break
    return out


# -- geometry and pixels ---------------------------------------------------------------------------
def box_iou(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def decode_rle(rle: dict[str, Any], shape: tuple[int, int] | None = None) -> np.ndarray:
    """A COCO RLE (``counts`` str or bytes) as a boolean mask, resized (nearest) to ``shape`` if given."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    m = mask_utils.decode({"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts})
    m = m.astype(bool)
    if shape is not None and m.shape != tuple(shape):
        from PIL import Image

        img = Image.fromarray(m.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        m = np.asarray(img) >= 128
    return m


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square dilation by ``r`` pixels (numpy only)."""
    if r <= 0:
        return mask.copy()
    h, w = mask.shape
    p = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy:dy + h, dx:dx + w]
    return out


_PALETTE_NAMES = [*COLOURS, *(f"bg:{b}" for b in BACKGROUNDS)]
_PALETTE = np.array([*COLOURS.values(), *BACKGROUNDS.values()], np.float32)


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """The nearest palette name (an object colour, or ``bg:<background>``) of each of (N, 3) pixels."""
    d = ((pixels.astype(np.float32)[:, None, :] - _PALETTE[None]) ** 2).sum(-1)
    return np.array(_PALETTE_NAMES)[d.argmin(1)]


def outside_changed(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    """Share of the pixels outside ``mask`` (dilated by OUTSIDE_DILATE) that the edit changed."""
    outside = ~dilate(mask, OUTSIDE_DILATE)
    if not outside.any():
        return 0.0
    diff = np.abs(before.astype(np.int16) - after.astype(np.int16)).max(-1)
    return float((diff[outside] > OUTSIDE_TOLERANCE).mean())


def removal_check(before: np.ndarray, after: np.ndarray, mask: np.ndarray, colour: str) -> dict[str, Any]:
    """Did an edit remove the object (its colour gone from its mask) and leave the rest alone?"""
    if before.shape != after.shape:
        return {"ok": False, "reason": f"edited image is {after.shape[1]}x{after.shape[0]}, "
                f"not {before.shape[1]}x{before.shape[0]}"}
    left = float((nearest_colour(after[mask]) == colour).mean()) if mask.any() else 0.0
    changed = outside_changed(before, after, mask)
    ok = left <= REMOVED_MAX_LEFT and changed <= OUTSIDE_MAX_CHANGED
    return {"ok": ok, "colour_left": round(left, 4), "outside_changed": round(changed, 5)}


def recolour_check(before: np.ndarray, after: np.ndarray, mask: np.ndarray, colour2: str) -> dict[str, Any]:
    """Is the object's mask now nearest ``colour2``, with the rest left alone?"""
    if before.shape != after.shape:
        return {"ok": False, "reason": f"edited image is {after.shape[1]}x{after.shape[0]}, "
                f"not {before.shape[1]}x{before.shape[0]}"}
    names = nearest_colour(after[mask]) if mask.any() else np.array([], str)
    share = float((names == colour2).mean()) if names.size else 0.0
    top = Counter(names.tolist()).most_common(1)[0][0] if names.size else ""
    changed = outside_changed(before, after, mask)
    ok = share >= RECOLOURED_MIN and top == colour2 and changed <= OUTSIDE_MAX_CHANGED
    return {"ok": ok, "new_colour_share": round(share, 4), "most_pixels": top, "outside_changed": round(changed, 5)}


# -- call results ----------------------------------------------------------------------------------
def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _done(calls: list[Any], expert: str) -> list[dict[str, Any]]:
    """The results of the done calls to ``expert``, in order."""
    return [_get(c, "result") or {} for c in calls if _get(c, "expert") == expert and _get(c, "status") == "done"]


def _call_failed(c: Any) -> bool:
    if _get(c, "status") != "done":
        return True
    r = _get(c, "result") or {}
    return (("boxes" in r and not r["boxes"]) or ("objects" in r and not r["objects"])
            or bool(r.get("out_of_domain")))


def _edit_action(result: dict[str, Any]) -> str:
    """``remove``, ``recolour`` or ``replace`` (the edit summary starts with it), or ""."""
    m = re.match(r"\s*(remove|recolour|replace)\b", str(result.get("summary", "")))
    return m.group(1) if m else ""


def result_labels(calls: list[Any]) -> list[str]:
    """'<colour> <shape>' labels the detect and segment calls of a turn returned."""
    labels = [str(lbl) for r in _done(calls, "detect") for lbl in r.get("labels", [])]
    labels += [str(_get(o, "label", "")) for r in _done(calls, "segment") for o in r.get("objects", [])]
    return [" ".join(lbl.lower().split()) for lbl in labels if lbl]


def result_masks(calls: list[Any], shape: tuple[int, int]) -> list[np.ndarray]:
    """The masks of the LAST done segment call (one per object)."""
    done = _done(calls, "segment")
    if not done:
        return []
    return [decode_rle(o["rle"], shape) for o in done[-1].get("objects", []) if o.get("rle")]


def edited_image_id(calls: list[Any]) -> str | None:
    """The image the LAST done edit call made."""
    done = _done(calls, "edit")
    if not done:
        return None
    arts = [a for a in done[-1].get("artifacts", []) if _get(a, "kind") == "image"]
    return str(_get(arts[0], "id")) if arts else None


# -- claims ----------------------------------------------------------------------------------------
@dataclass
class ObjectClaim:
    """'two red circles' → (2, 'red', 'circle'); 'a star' → (None, None, 'star') (an existence claim)."""

    count: int | None
    colour: str | None
    shape: str
    text: str


def object_claims(text: str) -> list[ObjectClaim]:
    out = []
    for m in _OBJECT.finditer(text.lower()):
        num = m.group("num")
        if num is None or num in ("a", "an"):
            count = None
        else:
            count = int(num) if num.isdigit() else _NUMBER_WORDS[num]
        out.append(ObjectClaim(count, m.group("colour"), m.group("shape"), m.group(0)))
    return out


def named_pairs(text: str) -> set[str]:
    """The colour-shape pairs a text names as present ('no red stars' names none)."""
    return {f"{c.colour} {c.shape}" for c in object_claims(text) if c.colour and c.count != 0}


def scene_pairs(scene: Scene) -> set[str]:
    return {o.label for o in scene.objects}


def answer_count(text: str, shape: str) -> int | None:
    """The number of ``shape``s an answer gives: a colourless count ('3 circles'), else the sum of
    its per-colour counts ('2 red circles and a blue circle'), else its first bare number. In a
    negative sentence ("I couldn't find any circles") a shape without a number counts 0."""
    claims = []
    for sent in _sentences(text):
        negative = bool(_NEGATION.search(sent) or _FAILURE.search(sent))
        for c in object_claims(sent):
            if c.shape == shape:
                claims.append(ObjectClaim(0, c.colour, c.shape, c.text) if c.count is None and negative else c)
    for c in claims:
        if c.colour is None and c.count is not None:
            return c.count
    coloured = {c.colour: (1 if c.count is None else c.count) for c in claims if c.colour}
    if coloured:
        return sum(coloured.values())
    if claims:  # "there is a circle"
        return 1
    low = text.lower()
    if re.search(rf"\bno(?:ne)?\b[^.]*\b{shape}", low) or re.search(r"\b(none|zero)\b", low):
        return 0
    m = _BARE_NUMBER.search(low)
    if m:
        w = m.group(1)
        return int(w) if w.isdigit() else _NUMBER_WORDS[w]
    return None


def recolour_claims(sentence: str) -> list[tuple[str, str | None]]:
    """The recolourings a sentence says were done: (its words, the new colour or None)."""
    out = []
    for m in _RECOLOUR_VERB.finditer(sentence):
        window = sentence[m.end(): m.end() + 60]
        explicit = m.group(1).startswith("recolo")
        if not explicit and re.match(r"\s*[:;,.!?)]", window):
            # the verb ends its clause, so it has no object or colour to make anything into: "the mask I
            # made: 1 candidate (red hexagon)" claims no recolouring; "made it red" still does
            continue
        cols = re.findall(rf"\b({_COLOUR_RE})\b", window)
        if not explicit and (not cols or _NOT_RECOLOUR.search(window[:window.find(cols[-1])])):
            continue
        out.append((m.group(0) + window[: window.find(cols[-1]) + len(cols[-1])] if cols else m.group(0),
                    cols[-1] if cols else None))
    return out


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;\n])\s+|\n", text.lower()) if s.strip()]


def check_answer(answer: str, calls: list[Any], scene: Scene, turn: Turn) -> list[str]:
    """The answer's claims that are not true of the call results or of the scene (empty: faithful).

    * a colour-shape pair named as present must be in the scene or in a call's labels (after a
      recolour, the object in its new colour counts as present);
    * a count ('2 red circles', 'no stars') must equal the scene's count or what a call returned (its
      labels, its number of results, or the counts its summary gives);
    * saying something is not there is false when the scene has it and a call reported it;
    * an action said ('found', 'masked', 'drew', 'removed', 'recoloured', 'repainted') needs a done
      call that did it (an edit's action is read from its summary); the colour a recolour names must
      be the colour the edit was asked for;
    * owning up to a failure ('could not', 'sorry') needs a call that failed or found nothing, or no
      call at all.
    """
    problems: list[str] = []
    labels = result_labels(calls)
    pairs = scene_pairs(scene) | set(labels)
    if turn.kind == "recolour" and turn.target is not None and turn.colour:
        pairs.add(f"{turn.colour} {scene.objects[turn.target].shape}")
    scene_counts = Counter(o.label for o in scene.objects) + Counter(o.shape for o in scene.objects)
    result_counts = Counter(labels) + Counter(lbl.split()[-1] for lbl in labels if lbl.split())
    # what the calls' summaries say is there ("no circles found; the image has 1 purple hexagon")
    summaries = " ".join(str((_get(c, "result") or {}).get("summary", "")) for c in calls
                         if _get(c, "status") == "done")
    told: dict[str, set[int]] = {}
    for c in object_claims(summaries):
        key = f"{c.colour} {c.shape}" if c.colour else c.shape
        told.setdefault(key, set()).add(1 if c.count is None else c.count)
    n_results = {len(r.get("boxes", [])) for r in _done(calls, "detect")}
    n_results |= {len(r.get("objects", [])) for r in _done(calls, "segment")}

    def counts_true(key: str) -> set[int]:
        """The counts of ``key`` ('red circle' or 'circle') that the scene or the calls support."""
        truths = {scene_counts[key], result_counts[key]} | told.get(key, set()) | {n for n in n_results if n}
        if scene_counts[key] and any(told.get(key, ())):
            truths.discard(0)  # the scene has it and a call said so: "none" is false of both
        return truths

    for sent in _sentences(answer):
        failure = bool(_FAILURE.search(sent))
        for c in object_claims(sent):
            key = f"{c.colour} {c.shape}" if c.colour else c.shape
            if c.count is not None:
                if c.count not in counts_true(key):
                    problems.append(f"count '{c.text}' (scene has {scene_counts[key]})")
            elif failure or _NEGATION.search(sent):
                # "I couldn't find any purple hexagons": false when the scene has one and a call saw it
                if scene_counts[key] and (result_counts[key] or any(told.get(key, ()))):
                    problems.append(f"says '{c.text}' is not there, but it is")
            elif c.colour and key not in pairs:
                problems.append(f"invented '{key}'")
            elif not c.colour and not scene_counts[key] and not result_counts[key]:
                problems.append(f"invented '{key}'")
        if failure:
            if calls and not any(_call_failed(c) for c in calls):
                problems.append(f"claims a failure: '{sent.strip()[:80]}'")
            continue
        if _NEGATION.search(sent) and not any(p.search(sent) for k, p in ACTIONS.items() if k != "found"):
            continue  # "no stars found": a count claim, checked above
        for action, pat in ACTIONS.items():
            m = pat.search(sent)
            if not m:
                continue
            if action == "found":
                ok = any(r.get("boxes") for r in _done(calls, "detect")) or any(
                    r.get("objects") for r in _done(calls, "segment"))
            elif action == "masked":
                ok = any(r.get("objects") for r in _done(calls, "segment"))
            elif action == "drew":
                ok = bool(_done(calls, "generate"))
            elif action == "removed":
                ok = any(_edit_action(r) == "remove" for r in _done(calls, "edit"))
            else:  # edited
                ok = bool(_done(calls, "edit"))
            if not ok:
                problems.append(f"says '{m.group(0)}' but no call did that")
        for said, colour in recolour_claims(sent):
            edits = [r for r in _done(calls, "edit") if _edit_action(r) in ("recolour", "replace")]
            if not edits:
                problems.append(f"says '{said.strip()}' but no call recoloured anything")
                continue
            asked = " ".join(f"{r.get('prompt', '')} {r.get('summary', '')}" for r in edits)
            asked += " " + " ".join(str((_get(c, "args") or {}).get("instruction", "")) for c in calls
                                    if _get(c, "expert") == "edit")
            if colour and colour not in asked.lower():
                problems.append(f"says '{said.strip()}' but the edit was not to {colour}")
    for r in _done(calls, "edit"):
        action = _edit_action(r)
        if action and not _SAYS_EDIT[action].search(answer.lower()):
            problems.append(f"does not say what the edit did ({action})")
    return problems


# -- turn outcomes ---------------------------------------------------------------------------------
@dataclass
class TurnOutcome:
    conversation: int
    script: str
    scene_seed: int
    kind: str
    followup: bool
    message: str
    answer: str
    success: bool
    faithful: bool
    problems: list[str] = field(default_factory=list)  # unfaithful claims
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    plan: str = ""
    route: list[str] | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)


def check_turn(turn: Turn, result: Any, scene: Scene, open_image: Any = None) -> dict[str, Any]:
    """Whether a turn did what was asked, on the scene's ground truth: ``{"ok": bool, ...details}``.
    ``open_image(artifact_id)`` gives an edited image (PIL or array); needed for the edit turns."""
    calls = list(_get(result, "calls", []) or [])
    answer = str(_get(result, "answer", ""))
    h, w = scene.image.height, scene.image.width
    target = scene.objects[turn.target] if turn.target is not None else None

    if turn.kind == "describe":
        named, present = named_pairs(answer), scene_pairs(scene)
        return {"ok": named == present, "named": sorted(named), "present": sorted(present)}
    if turn.kind == "count":
        got = answer_count(answer, turn.shape or "")
        want = sum(o.shape == turn.shape for o in scene.objects)
        return {"ok": got == want, "count": got, "expected": want}
    if turn.kind == "find":
        assert target is not None
        dets = _done(calls, "detect")
        if not dets:
            return {"ok": False, "reason": "no done detect call"}
        boxes = [list(map(float, b)) for b in dets[-1].get("boxes", [])]
        ious = [box_iou(b, target.box) for b in boxes]
        others = [j for j, o in enumerate(scene.objects) if j != turn.target
                  and any(box_iou(b, o.box) >= FIND_IOU for b in boxes)]
        ok = bool(ious) and max(ious) >= FIND_IOU and not others
        return {"ok": ok, "n_boxes": len(boxes), "best_iou": round(max(ious), 4) if ious else 0.0,
                "boxes_on_other_objects": len(others)}
    if turn.kind in ("segment_followup", "refseg"):
        assert target is not None
        masks = result_masks(calls, (h, w))
        if not masks:
            return {"ok": False, "iou": 0.0, "reason": "no done segment call with a mask"}
        iou = mask_iou(np.logical_or.reduce(masks), target.mask)
        need = SEGMENT_IOU if turn.kind == "segment_followup" else REFSEG_IOU
        return {"ok": iou >= need, "iou": round(iou, 4), "n_masks": len(masks)}
    if turn.kind in ("remove_followup", "recolour"):
        assert target is not None
        image_id = edited_image_id(calls)
        if image_id is None or open_image is None:
            return {"ok": False, "reason": "no done edit call with an image"}
        img = open_image(image_id)
        after = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, dtype=np.uint8)
        before = np.asarray(scene.image.convert("RGB"), dtype=np.uint8)
        if turn.kind == "remove_followup":
            return removal_check(before, after, target.mask, target.colour)
        return recolour_check(before, after, target.mask, turn.colour or "")
    raise ValueError(f"unknown turn kind {turn.kind!r}")


def _call_json(c: Any) -> dict[str, Any]:
    return {"expert": _get(c, "expert"), "status": _get(c, "status"), "args": _get(c, "args", {}),
            "result": _get(c, "result"), "error": _get(c, "error")}


def _brief(outcome: dict[str, Any]) -> dict[str, Any]:
    """A turn outcome for the errors file: call results without their masks' RLE."""
    out = dict(outcome)
    out["calls"] = [{**c, "result": {k: v for k, v in (c.get("result") or {}).items() if k not in ("objects", "lines")}
                     | ({"objects": [{k: v for k, v in o.items() if k not in ("rle", "candidates")}
                                     for o in (c.get("result") or {}).get("objects", [])]}
                        if (c.get("result") or {}).get("objects") else {})}
                    for c in outcome.get("calls", [])]
    return out


# -- running ---------------------------------------------------------------------------------------
def _png(scene: Scene) -> bytes:
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG")
    return buf.getvalue()


def score_turn(turn: Turn, result: Any, scene: Scene, base: dict[str, Any], *, open_image: Any = None,
               seconds: float = 0.0) -> TurnOutcome:
    """Check one turn's result (a ChatResult, or its JSON) → its outcome (``base``: the turn's identity)."""
    calls = list(_get(result, "calls", []) or [])
    answer = str(_get(result, "answer", ""))
    try:
        details = check_turn(turn, result, scene, open_image=open_image)
    except Exception as e:  # noqa: BLE001 — a checker crash (an unreadable artifact) fails the turn
        details = {"ok": False, "reason": f"check failed: {type(e).__name__}: {e}"}
    problems = check_answer(answer, calls, scene, turn)
    ok = bool(details.pop("ok"))
    return TurnOutcome(**base, answer=answer, success=ok, faithful=not problems, problems=problems, details=details,
                       seconds=round(seconds, 2), plan=str(_get(result, "plan", "")), route=_get(result, "route"),
                       calls=[_call_json(c) for c in calls])


def rescore(turns: list[dict[str, Any]], *, seed: int = 0, size: int = SCENE_SIZE, open_image: Any = None,
            kinds: tuple[str, ...] = SCRIPTS) -> tuple[dict[str, Any], list[TurnOutcome]]:
    """Check again the turns a run wrote (``--turns``), e.g. after a checker changed, without running
    the loop again; ``open_image`` reads the run's kept artifacts (``--artifacts``)."""
    n = max(t["conversation"] for t in turns) + 1
    scripts = make_scripts(n, seed, size, kinds)
    outcomes = []
    for t in turns:
        script = scripts[t["conversation"]]
        turn = next(x for x in script.turns if x.kind == t["kind"])
        if (script.scene_seed, turn.message) != (t["scene_seed"], t["message"]):
            raise ValueError(f"turn {t['conversation']}:{t['kind']} is not from a run with --seed {seed}")
        if t["details"].get("reason") in ("crashed", "skipped"):
            outcomes.append(TurnOutcome(**t))
            continue
        base = {k: t[k] for k in ("conversation", "script", "scene_seed", "kind", "followup", "message")}
        outcomes.append(score_turn(turn, t, scene_for(script.scene_seed, size), base, open_image=open_image,
                                   seconds=t.get("seconds", 0.0)))
    res = metrics(outcomes, scripts, size)
    res["seconds"] = round(sum(o.seconds for o in outcomes), 1)
    res["seed"] = seed
    return res, outcomes


def run_script(assistant: Any, script: Script, size: int = SCENE_SIZE, log: Any = None) -> list[TurnOutcome]:
    """Run one scripted conversation through ``assistant`` (``run`` / ``store``) and check each turn."""
    scene = scene_for(script.scene_seed, size)
    image_id = assistant.store.import_image(_png(scene)).id
    conv_id: str | None = None
    out: list[TurnOutcome] = []
    for k, turn in enumerate(script.turns):
        t0 = time.time()
        base = dict(conversation=script.index, script=script.kind, scene_seed=script.scene_seed, kind=turn.kind,
                    followup=turn.followup, message=turn.message)
        if k and conv_id is None:  # the first turn crashed: its follow-ups could not be asked
            out.append(TurnOutcome(**base, answer="", success=False, faithful=False,
                                   problems=["not asked: an earlier turn failed to run"],
                                   details={"reason": "skipped"}))
            continue
        try:
            result = assistant.run(turn.message, images=[image_id] if k == 0 else [], conversation_id=conv_id)
        except Exception as e:  # noqa: BLE001 — a crash is a failed turn, recorded with its error
            out.append(TurnOutcome(**base, answer="", success=False, faithful=False,
                                   problems=[f"error: {type(e).__name__}: {e}"], details={"reason": "crashed"},
                                   seconds=round(time.time() - t0, 2)))
            if k == 0:
                conv_id = None
            continue
        conv_id = _get(result, "conversation_id")
        out.append(score_turn(turn, result, scene, base, open_image=assistant.store.open_image,
                              seconds=time.time() - t0))
        ok, problems, answer = out[-1].success, out[-1].problems, out[-1].answer
        if log:
            log(f"[{script.index}:{turn.kind}] {'ok ' if ok else 'FAIL'} {'faithful' if not problems else 'UNFAITHFUL'}"
                f"  {turn.message!r} -> {answer[:100]!r}")
    return out


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def metrics(outcomes: list[TurnOutcome], scripts: list[Script], size: int = SCENE_SIZE) -> dict[str, Any]:
    """The aggregate metrics of the turn outcomes (see the module doc)."""
    res: dict[str, Any] = {}
    n = len(outcomes)
    fol = [o for o in outcomes if o.followup]
    res["answer_faithfulness"] = _ratio(sum(o.faithful for o in outcomes), n)
    res["turn_success"] = _ratio(sum(o.success for o in outcomes), n)
    res["followup_success"] = _ratio(sum(o.success for o in fol), len(fol))
    # describe: micro F1 of the pairs named vs present
    tp = fp = fn = 0
    by_conv = {s.index: s for s in scripts}
    for o in outcomes:
        if o.kind == "describe":
            present = scene_pairs(scene_for(by_conv[o.conversation].scene_seed, size))
            named = named_pairs(o.answer)
            tp, fp, fn = tp + len(named & present), fp + len(named - present), fn + len(present - named)
    res["describe_f1"] = round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None
    counts = [o for o in outcomes if o.kind == "count"]
    res["count_exact"] = _ratio(sum(o.success for o in counts), len(counts))
    refs = [o for o in outcomes if o.kind == "refseg"]
    res["referring_miou"] = round(float(np.mean([o.details.get("iou", 0.0) for o in refs])), 4) if refs else None
    res["referring_success"] = _ratio(sum(o.success for o in refs), len(refs))
    kinds = ["describe", "count", "find", "segment_followup", "remove_followup", "recolour", "refseg"]
    res["success_by_turn"] = {k: _ratio(sum(o.success for o in outcomes if o.kind == k),
                                        sum(o.kind == k for o in outcomes)) for k in kinds
                              if any(o.kind == k for o in outcomes)}
    res["faithfulness_by_turn"] = {k: _ratio(sum(o.faithful for o in outcomes if o.kind == k),
                                             sum(o.kind == k for o in outcomes)) for k in kinds
                                   if any(o.kind == k for o in outcomes)}
    res["n_conversations"] = len(scripts)
    res["n_turns"] = n
    res["n_followup_turns"] = len(fol)
    res["n_failed_turns"] = sum(not o.success for o in outcomes)
    res["n_unfaithful_answers"] = sum(not o.faithful for o in outcomes)
    res["n_crashed_turns"] = sum(o.details.get("reason") in ("crashed", "skipped") for o in outcomes)
    secs = [o.seconds for o in outcomes if o.details.get("reason") != "skipped"]
    res["seconds_per_turn"] = round(float(np.mean(secs)), 2) if secs else None
    return res


def evaluate(assistant: Any = None, *, n: int = 20, seed: int = 0, size: int = SCENE_SIZE,
             kinds: tuple[str, ...] = SCRIPTS, log: Any = None,
             artifacts: Path | None = None) -> tuple[dict[str, Any], list[TurnOutcome]]:
    """Run ``n`` scripted conversations (held-out scenes) through ``assistant`` (default: the shipped
    one, ``build_assistant``, with its artifacts and conversations under ``artifacts``, or in a
    temporary folder removed afterwards) → (metrics, every turn's outcome)."""
    t0 = time.time()
    tmp = None
    if assistant is None:
        from orchestrator.runtime import build_assistant
        from switchboard.settings import get_settings

        if artifacts is None:
            tmp = artifacts = Path(tempfile.mkdtemp(prefix="switchboard-conversations-"))
        assistant = build_assistant(get_settings().model_copy(update={"artifact_dir": Path(artifacts) / "artifacts"}))
    load_s = time.time() - t0
    try:
        scripts = make_scripts(n, seed, size, kinds)
        outcomes: list[TurnOutcome] = []
        for s in scripts:
            outcomes += run_script(assistant, s, size, log=log)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    res = metrics(outcomes, scripts, size)
    res["seconds"] = round(time.time() - t0, 1)
    res["load_seconds"] = round(load_s, 1)
    res["seed"] = seed
    return res, outcomes


def main_train(argv: list[str]) -> int:
    print("switchboard train conversations: nothing to train — this is an evaluation of the whole loop; "
          "run `switchboard eval conversations`", file=sys.stderr)
    return 2


def main_eval(argv: list[str], *, assistant: Any = None) -> int:
    """``switchboard eval conversations [--json] [--n N] [--seed S] [--errors FILE]``."""
    p = argparse.ArgumentParser(prog="switchboard eval conversations",
                                description="Scripted multi-turn conversations over held-out shapes-world scenes, "
                                "run through the real loop (as `switchboard chat`), each turn and each answer's "
                                "claims checked against the scene's ground truth and the call results.")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--n", type=int, default=200, help="conversations (default 200, the issue's size; ~30-60 min "
                   "on 2 cores: develop with --n 20)")
    p.add_argument("--seed", type=int, default=0, help="which held-out draw of scenes and phrasings (default 0)")
    p.add_argument("--kind", choices=SCRIPTS, action="append", help="only these scripts (repeatable)")
    p.add_argument("--errors", type=Path, default=None, help="write the failing turns to this JSON file")
    p.add_argument("--turns", type=Path, default=None, help="write every turn's outcome to this JSONL file")
    p.add_argument("--artifacts", type=Path, default=None,
                   help="keep the artifacts and conversations in this folder (default: a temporary one, removed)")
    p.add_argument("--rescore", type=Path, default=None, metavar="TURNS",
                   help="check again the turns an earlier run wrote with --turns (same --seed; its --artifacts "
                   "folder for the edited images) instead of running the loop")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--verbose", "-v", action="store_true", help="print each turn as it is checked (stderr)")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if a.verbose else None
    if a.rescore:
        rows = [json.loads(x) for x in a.rescore.read_text().splitlines() if x.strip()]
        open_image = None
        if a.artifacts:
            from switchboard.artifacts import ArtifactStore

            open_image = ArtifactStore(a.artifacts / "artifacts").open_image
        res, outcomes = rescore(rows, seed=a.seed, open_image=open_image, kinds=tuple(a.kind or SCRIPTS))
    else:
        res, outcomes = evaluate(assistant, n=a.n, seed=a.seed, kinds=tuple(a.kind or SCRIPTS), log=log,
                                 artifacts=a.artifacts)
    failing = [asdict(o) for o in outcomes if not o.success or not o.faithful]
    if a.errors:
        a.errors.write_text(json.dumps([_brief(f) for f in failing], indent=1))
    if a.turns:
        a.turns.write_text("".join(json.dumps(asdict(o)) + "\n" for o in outcomes))
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:24s} {v}")
        print(f"({len(failing)} failing turns{'; see ' + str(a.errors) if a.errors else ''})")
    return 0
