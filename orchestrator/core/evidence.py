"""Answers from evidence: image questions a core that cannot see are answered from the detector's results.

The shipped core cannot read pixels (its projector's output layer is zero, ``runtime.sees_pixels``), so
"what is in this picture?" or "how many circles are there?" cannot be answered by it honestly. Rather
than guess, the loop answers such a question the way LLaVA-Plus / VisProg do: it calls an expert — the
detector, as a visible call in the turn (the user sees what was done, and its overlay) — and writes the
answer from what the call returned. Nothing in the answer comes from anywhere else, so it is true of the
call by construction; where the call fails, finds nothing, or says the image is outside its world
(a photograph shown to the shapes-world detector), the answer says so plainly.

What counts as an image question (``image_question``) is a small rule set over the message, on purpose:
a rule says exactly which requests it takes, so a command ("find the red circle", "remove it", "read the
sign") is never taken for a question. Four kinds, each answered differently:

* ``describe`` — "what is in this picture?", "describe this image": every object found, by colour and
  shape (and where, when there are few);
* ``count``    — "how many circles are there?": the number, with its breakdown by colour;
* ``exists``   — "is there a blue square?": yes or no, with the evidence;
* ``colour``   — "what colour is the star?": the colour(s) of what was asked about.

The question's object ("circles", "red shapes", "balls") becomes the detector's query, so its own query
matcher (synonyms, colours, generic nouns) decides what it denotes.

Measured on the router's dev set (``training/evalsets/dev.jsonl``, requests written by people): of its
220 requests with an image, the rules take 7 — all among the 40 expected to get no expert (4 describe,
2 count, 1 colour) — and none of the 180 that ask for an expert; none of the 140 without an image.
(Without an image the loop never takes this path anyway.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from experts.referring import CLASS_SYNONYMS, COLOUR_WORDS, box_iou
from orchestrator.commands import Call, format_call
from orchestrator.events import CallRecord
from switchboard.expert import artifact_fields

Kind = Literal["describe", "count", "exists", "colour"]
EXPERT = "detect"  # the expert whose results answer image questions
EVERYTHING = "everything"
# The evidence call's minimum detection score, calibrated on shapes-world scenes that are not the
# held-out ones. With the detector's per-class NMS (session 15, 200 scenes): per-shape count exact 0.883
# at 0.25, 0.907 at 0.4, 0.916 at 0.5; describe F1 0.922 at 0.25 as reported and 0.959 with one object
# read as two shapes said once (``SAME_OBJECT_IOU``). The detector now suppresses overlapping boxes
# across classes in the shapes world (``experts.detect``), which removes most second readings, so the
# threshold was measured again (300 scenes, dataset seed 987654): counts in the eval's mix (a shape
# present 3/4 of the time) 0.904 at 0.25, 0.913 at 0.3, 0.907 at 0.4, 0.905 at 0.5 (per-class NMS at
# 0.5: 0.896); describe F1 0.958 at 0.25, 0.958 at 0.3, 0.953 at 0.4, 0.948 at 0.5. One threshold, 0.3,
# serves both.
CONFIDENCE = 0.3
DESCRIBE_CONFIDENCE = CONFIDENCE
SAME_OBJECT_IOU = 0.6  # two boxes of one colour overlapping this much are one object (0.5-0.7: same F1)

# Requests that are not questions about which objects are in the image: reading text (OCR's), asking
# where something is (detect's boxes answer that), or asking for something to be made or changed.
_NOT_OBJECTS = re.compile(
    r"\b(texts?|read|reads|written|writing|say|says|said|words?|letters?|spell\w*|transcribe|ocr|caption\w*|"
    r"signs?|labels?|depth|where|segment\w*|masks?|crop\w*|remove|erase|delete|draw|drawing|generate|paint|"
    r"make|replace|edit|turn|change|recolou?r\w*|box(?:es)?|outline|highlight|find|locate|detect|zoom|"
    r"cut|enlarge)\b")
# how long the answer should be ("in a few words", "in one sentence", "briefly"): not what is asked
_LENGTH = re.compile(
    r"\b(?:in|with|using)\s+(?:just\s+|only\s+)?(?:a few|a couple of|few|one|two|three|four|five|ten|\d+|"
    r"a single|a short|a brief|a)\s+(?:words?|sentences?|lines?)\b|\bbriefly\b")
_COUNT = re.compile(r"\b(?:how many|number of|count(?: up)?(?: all)?(?: the)?)\s+(?P<what>[^?.!,;]*)")
_COLOUR = re.compile(r"\b(?:what|which) colou?rs? (?:is|are|does|do)?\s*(?P<what>[^?.!,;]*)")
_EXISTS = re.compile(
    r"(?:^|\b(?:so|and|but|tell me|please)\s+)(?:is|are) there (?P<what>[^?.!,;]*)"
    r"|\b(?:do|does|can) (?:you|it|this \w+|the \w+) (?:see|have|contain|show|spot) (?P<what2>(?:an?|any|some) [^?.!,;]*)")
_DESCRIBE = re.compile(
    r"\b(?:describe|what(?:'s| is| are)? (?:there )?(?:in|on|inside) (?:this|the|my|that)\b|"
    r"what do (?:you|we) see|what can (?:you|i|we) see|what(?:'s| is) (?:shown|depicted|visible|pictured)|"
    r"what does (?:this|the|my|it|that)\b.*\b(?:show|contain|depict)|what (?:objects|shapes|things|items)\b|"
    r"what(?:'s| is) there|what(?:'s| is) happening (?:in|on)|tell me about (?:this|the|my) (?:picture|image|photo|scene)|what am i looking at)")
# the question's object, without the words around it
_LEAD = re.compile(r"^(?:(?:an?|any|some|the|all|of|only)\s+)+")
_TAIL = re.compile(r"\s+(?:are|is|can|could|do|does|did|in|on|inside|here|there|you|that|which|at|of|"
                   r"this|the|visible|present|shown|altogether|in total|total)\b.*$")
_GENERIC = re.compile(r"^(?:objects?|shapes?|things?|items?|figures?|elements?|stuff)$")

# words for where a box's centre lies (thirds of the image)
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")


@dataclass(frozen=True)
class ImageQuestion:
    """An image question: its ``kind`` and the detector ``query`` that gathers its evidence."""

    kind: Kind
    query: str = EVERYTHING
    what: str = ""  # the question's object as the user wrote it ("circles"; "" for describe)

    def call(self, image_id: str, call_id: str = "c1") -> str:
        """The command that gathers the evidence (what the turn shows as its plan)."""
        return format_call(Call(call_id, EXPERT, {"image": image_id, "query": self.query,
                                                  "confidence": str(DESCRIBE_CONFIDENCE if self.kind == "describe"
                                                                    else CONFIDENCE)}))


def _plain(message: str) -> str:
    """A message as the rules read it: lower case, straight apostrophes, single spaces."""
    return " ".join(message.lower().replace("’", "'").split())


def _object(text: str) -> str:
    what = _TAIL.sub("", _LEAD.sub("", " ".join(text.split()))).strip()
    return what


def image_question(message: str) -> ImageQuestion | None:
    """The image question ``message`` asks, or None when it asks something else (a command, text
    reading, where something is …)."""
    text = " ".join(_LENGTH.sub(" ", _plain(message)).split())
    if not text or _NOT_OBJECTS.search(text):
        return None
    for kind, pattern in (("count", _COUNT), ("colour", _COLOUR), ("exists", _EXISTS)):
        m = pattern.search(text)
        if m:
            what = _object(next(g for g in m.groups() if g is not None) if any(m.groups()) else "")
            if kind != "exists" and not what:
                what = "objects"
            query = EVERYTHING if not what or _GENERIC.match(what) else what
            if kind == "count" and " " in what and _GENERIC.match(what.split()[-1]):
                query = " ".join(what.split()[:-1] + ["shape"])  # "red shapes" -> "red shape"
            return ImageQuestion(kind, query, what)  # type: ignore[arg-type]
    if _DESCRIBE.search(text):
        return ImageQuestion("describe")
    return None


def claims_kind(examples: Sequence[str], kind: Kind) -> bool:
    """Whether an expert's example requests include questions of ``kind`` (a captioning plugin that
    answers "what does this photo show?" keeps the describe questions routed to it)."""
    return any((q := image_question(e)) is not None and q.kind == kind for e in examples)


def evidence_question(message: str, route: Sequence[str] | None, registry: Any,
                      trained: set[str] | None = None) -> ImageQuestion | None:
    """The image question to answer from evidence, or None (the turn goes on as routed).

    ``route`` is the router's expert sequence (None: not asked, as for a follow-up; ``()``: no expert).
    A route to experts that make or change something (segment, edit …) is the request's, not a
    question's, and is kept. A route to a plugin the router picked zero-shot (not in ``trained``, the
    experts its head was trained on) is kept only if the plugin claims such questions in its examples
    (a captioning plugin); an OCR plugin guessed for "what is in this picture?" gives way.
    """
    if registry is None or EXPERT not in registry:
        return None
    question = image_question(message)
    if question is None:
        return None
    for expert in route or ():
        if expert == EXPERT:
            continue
        if trained is None or expert in trained or expert not in registry:
            return None
        cls = registry.get_class(expert)
        examples = [getattr(e, "request", "") for e in getattr(cls, "examples", [])]
        if claims_kind(examples + list(getattr(cls, "phrasings", [])), question.kind):
            return None
    return question


# -- what a core that cannot see may not guess ------------------------------------------------------
# A point prompt is a place in 0-1000 coordinates. A core that cannot see the image can only translate
# place words into one ("whatever is in the middle" -> [[500,500]]); for "the star at the bottom" or
# "the rightmost shape" it guesses a place ([[500,750]], [[500,500]]) where the object may not be (mask
# IoU 0 in 3 of 40 referring turns of the conversation eval). Which object the words mean only grounding
# them on the image can tell, which a text target does (segment's target is grounded with detect). So a
# request that names an object — a colour, a class of the shapes world or one of its synonyms
# (``experts.referring``), or a pick among objects ("leftmost", "largest") — gets no point prompt from
# a blind core; one that names only a place ("the thing at the top left") keeps it. Limitation: class
# names of real detector weights (COCO's "dog") are not in this vocabulary, so such requests keep it.
_RELATIVE_PICKS = ("leftmost", "rightmost", "topmost", "uppermost", "highest", "bottommost", "lowest", "largest",
                   "biggest", "big", "large", "smallest", "tiniest", "small", "little")
_THING = re.compile(r"\b(?:" + "|".join(sorted(
    {re.escape(w) for w in COLOUR_WORDS} | {re.escape(p) for ps in CLASS_SYNONYMS.values() for p in ps}
    | set(_RELATIVE_PICKS), key=len, reverse=True)) + r")(?:s|es)?\b")


def names_an_object(message: str) -> bool:
    """Whether a request names an object by colour, class (or synonym) or a pick among objects, rather
    than only a place ("the red one", "the square at the top", "the largest shape": yes; "whatever is in
    the middle", "the thing at the top left": no)."""
    return bool(_THING.search(_plain(message)))


_REFERS_BACK = re.compile(r"\b(?:it|its|them|they|those|these|that one|this one|the same\b.*)\b")


def self_contained(message: str) -> bool:
    """Whether a follow-up names its own object and does not point back at an earlier one ("now remove
    the red star", "make the purple square green": yes; "now remove it", "crop them": no). Such a
    request reads as a first request does, so the loop routes it (a request that points back is the
    core's to read against the conversation)."""
    text = _plain(message)
    return names_an_object(text) and not _REFERS_BACK.search(text)


def guessed_arguments(message: str, registry: Any) -> frozenset[tuple[str, str]]:
    """The (expert, argument) pairs a core that cannot see the image may not write for ``message``: the
    point prompt (``points``, and the ``labels`` that go with it) of every expert that also takes a text
    ``target``, when the request names an object (see above). Empty otherwise."""
    if registry is None or not names_an_object(message):
        return frozenset()
    out: set[tuple[str, str]] = set()
    for name in registry.names():
        fields = getattr(registry.get_class(name).Args, "model_fields", {})
        if "points" in fields and "target" in fields:
            out |= {(name, arg) for arg in ("points", "labels") if arg in fields}
    return frozenset(out)


# A boxes argument means every box in it: segment(boxes=…) masks each one. After "what is in this
# picture?" the conversation's boxes artifact holds every object found, so "now remove the red star"
# written as boxes="<that artifact>" masks (and removes) all five. When a request names one object, the
# words say which: such an expert (one that also takes a text ``target``) may take boxes only from a call
# of the same reply (``$c1``, the detect call that found just that object), not an earlier turn's.
_MANY = re.compile(r"\b(?:them|those|these|they|all|every|each|both|everything|ones)\b|" + r"\b(?:" + "|".join(
    sorted({re.escape(p) for ps in CLASS_SYNONYMS.values() for p in ps}, key=len, reverse=True)) + r")(?:s|es)\b")


def earlier_boxes_withheld(message: str, registry: Any) -> frozenset[tuple[str, str]]:
    """The (expert, argument) pairs whose boxes may only come from this reply's own calls for
    ``message`` (see above): the boxes argument of every expert that also takes a text ``target``, when
    the request names one object (not "them", "the stars", "all of them"). Empty otherwise."""
    text = _plain(message)
    if registry is None or not names_an_object(text) or _MANY.search(text):
        return frozenset()
    out: set[tuple[str, str]] = set()
    for name in registry.names():
        args = registry.get_class(name).Args
        if "target" in getattr(args, "model_fields", {}):
            out |= {(name, arg) for arg, kind in artifact_fields(args).items() if kind == "boxes"}
    return frozenset(out)


# -- answers ----------------------------------------------------------------------------------------
def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    if word.endswith(("s", "x", "sh", "ch")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _phrase(label: str, n: int) -> str:
    words = label.split()
    return f"{n} {' '.join(words[:-1] + [_plural(words[-1], n)])}" if words else str(n)


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _where(box: Sequence[float], size: tuple[int, int]) -> str:
    w, h = size
    cx, cy = (box[0] + box[2]) / 2 / max(w, 1), (box[1] + box[3]) / 2 / max(h, 1)
    row, col = _ROWS[min(2, int(cy * 3))], _COLS[min(2, int(cx * 3))]
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"at the {row} {col}"


def _groups(labels: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        out.setdefault(" ".join(str(lab).split()), []).append(i)
    return out


def same_objects(result: dict[str, Any]) -> dict[int, list[int]]:
    """Detections that are one object read as two shapes: each kept detection's index -> the indices of
    lower-scored ones of the same colour over the same place (``SAME_OBJECT_IOU``). Detections come
    best first (detect sorts them by score)."""
    labels = [str(x).split() for x in result.get("labels", [])]
    boxes = result.get("boxes") or []
    kept: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        same = next((k for k in kept if i < len(boxes) and k < len(boxes) and labels[k][:-1] == lab[:-1]
                     and box_iou(boxes[k], boxes[i]) >= SAME_OBJECT_IOU), None)
        if same is None:
            kept[i] = []
        else:
            kept[same].append(i)
    # a reading that is also an object of its own elsewhere stays one: merging it would say a count
    # ("1 blue square") that neither the call (2) nor, perhaps, the picture holds
    said = {" ".join(labels[k]) for k in kept}
    for k in list(kept):
        for j in [j for j in kept[k] if " ".join(labels[j]) in said]:
            kept[k].remove(j)
            kept[j] = []
    return dict(sorted(kept.items()))


def _inventory(result: dict[str, Any], size: tuple[int, int] | None, *, where: bool = False,
               merge: bool = False) -> str:
    """'2 red circles, 1 blue square (at the top left) and 1 green star' from a detect result; with
    ``merge``, one object read as two shapes is said once, with the other reading ("1 orange circle
    (the detector also read it as a hexagon)")."""
    labels = [str(x) for x in result.get("labels", [])]
    boxes = result.get("boxes") or []
    kept = same_objects(result) if merge else {i: [] for i in range(len(labels))}
    groups: dict[str, list[int]] = {}
    for i in kept:
        groups.setdefault(" ".join(labels[i].split()), []).append(i)
    parts = []
    for lab, idx in groups.items():
        notes = []
        if where and size and len(idx) == 1 and idx[0] < len(boxes):
            notes.append(_where(boxes[idx[0]], size))
        also = sorted({labels[j].split()[-1] for i in idx for j in kept[i]} - {lab.split()[-1]})
        if also:
            notes.append(f"the detector also read {'it' if len(idx) == 1 else 'one'} as a {' or a '.join(also)}")
        parts.append(_phrase(lab, len(idx)) + (f" ({'; '.join(notes)})" if notes else ""))
    return _join(parts)


def _what_else(result: dict[str, Any]) -> str:
    """What the detector says is there instead, from its summary ("... ; the image has 1 purple hexagon")."""
    m = re.search(r"the image has (.+)$", str(result.get("summary", "")))
    if not m:
        return ""
    there = m.group(1).strip().rstrip(".")
    return "It sees no objects at all." if there == "no objects at all" else f"It sees {there} there."


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def evidence_answer(question: ImageQuestion, calls: Sequence[CallRecord], size: tuple[int, int] | None = None) -> str:
    """The answer to ``question`` from the evidence call's result (``size``: the image's width and height,
    for saying where objects are). Every object, colour and count in it is one the call returned."""
    call = next((c for c in calls if c.expert == EXPERT), None)
    if call is None:
        return "I could not look at the picture: no detector call was made."
    if call.status != "done":
        return f"I tried to look with the detector, but the call {call.status}: {call.error or 'no reason given'}."
    result = call.result or {}
    summary = str(result.get("summary", "")).strip().rstrip(".")
    if result.get("out_of_domain"):
        return f"I can't tell you that about this picture: I ran the detector on it, and {summary}."
    if summary.startswith("nothing matches"):
        return f"I can't answer that from the detector: {summary}."
    labels = [str(x) for x in result.get("labels", [])]
    n = len(labels)
    what = question.what
    if question.kind == "describe":
        if not n:
            return "I ran the detector on the picture and it sees no objects in it."
        objects = len(same_objects(result))
        many = "objects" if objects > 1 else "object"
        boxes = "boxed on the overlay" if objects == n else f"{n} boxes on the overlay"
        return (f"I ran the detector on the picture; it found {_inventory(result, size, where=objects <= 6, merge=True)}"
                f" ({objects} {many} in all, {boxes}).")
    if not n:
        answer = {"count": f"There are no {what} in the picture: the detector sees none.",
                  "exists": f"No, there is no {what} in the picture: the detector sees none.",
                  "colour": f"I can't tell its colour: the detector sees no {what} in the picture."}[question.kind]
        rest = _what_else(result)
        return f"{answer} {rest}".strip()
    groups = _groups(labels)
    shapes = {lab.split()[-1] for lab in groups}
    noun = _plural(next(iter(shapes)), n) if len(shapes) == 1 else ("object" if n == 1 else "objects")
    if question.kind == "count":
        if len(groups) == 1:
            found = "it" if n == 1 else "them"
            return f"There {'is' if n == 1 else 'are'} {_phrase(next(iter(groups)), n)} in the picture (the detector found {found})."
        head = f"{n} {noun}" if len(shapes) == 1 else f"{n} {what}" if what and what != "objects" else f"{n} objects"
        return f"There are {head} in the picture: the detector found {_inventory(result, size)}."
    if question.kind == "exists":
        return f"Yes: the detector found {_inventory(result, size, where=n <= 3)} in the picture."
    # colour
    colours = sorted({lab.split()[0] for lab in groups if len(lab.split()) > 1})
    if n == 1 and colours:
        return f"It is {colours[0]}: the detector found {_inventory(result, size, where=True)}."
    if not colours:
        return f"The detector found {_inventory(result, size, where=n <= 3)}, but read no colour for {what or 'it'}."
    return f"There are {n} {noun}, {_join(colours)}: the detector found {_inventory(result, size, where=n <= 3)}."
