"""Answers that match the calls: check the core's final answer against what the calls returned.

The core writes the final answer after reading a summary of the results, and a small core can still
say "I found 1 red circle" when detect found three, or describe shapes in a photograph the experts
said they cannot see. Every expert's ``summary`` is faithful by construction (it is written from the
result), so the answer is checked against the calls, and where it says something they do not
support, the answer becomes the calls' own summaries (``compose``). What is checked:

- a failed, skipped or invalid call must be said plainly: the answer admits it (``could not`` …);
- a call whose expert reports ``out_of_domain`` (an embedded model shown a real photograph) is
  reported in its own words: the core has not been taught to say that;
- every number in the answer appears in what the calls returned (counts, percentages, sizes), and a
  counted object ("2 red circles") is counted the same way there;
- every colour-and-shape phrase ("red circle") names something a call returned;
- what an edit did is said: an answer to a turn that removed, recoloured or replaced something names
  that action ("Here is the mask of the red circle" after a recolour does not).

A check can only replace an answer with the calls' own words, never add a claim, so a false alarm
costs style, not truth.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from orchestrator.events import CallRecord

ADMITS_FAILURE = re.compile(
    r"\b(fail\w*|could not|couldn't|cannot|can't|unable|error|not run|did not|didn't|sorry|timed out|invalid)\b",
    re.I)
# An answer that turns the request down ("That is not an image task", "I have no expert for it") after
# calls that all ran contradicts them: the core wrote a plain-answer template in the wrong place.
DENIES = re.compile(r"(\bnot an image task\b|\b(?:can't|cannot|can not) help\b|\bno expert for\b|"
                    r"\bonly work with images\b|\bneed an image\b|\battach an image\b)", re.I)
NUMBER = re.compile(r"(?<![\w.-])\d+(?:\.\d+)?(?![\w-])")
ARTIFACT_ID = re.compile(r"\b(?:image|overlay|mask|boxes|text|json)-[0-9a-f]{24}\b")
# The colour and shape words the embedded experts use (their results are the only place such a phrase
# may come from; a real detector's labels are matched the same way, by what its results contain).
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "gray", "pink",
           "brown", "cyan", "magenta")
SHAPES = ("circle", "square", "triangle", "hexagon", "star")
COLOUR_SHAPE = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})s?\b", re.I)
SHAPE = re.compile(rf"\b({'|'.join(SHAPES)})s?\b", re.I)  # "the hexagon": a shape named without a colour
NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
                "eight": "8", "nine": "9", "ten": "10"}
# "3 red circles", "two stars": a count of a kind of object, which must match a count the calls gave
COUNTED = re.compile(rf"\b(\d+|{'|'.join(NUMBER_WORDS)})\s+(?:({'|'.join(COLOURS)})\s+)?({'|'.join(SHAPES)})s?\b",
                     re.I)


def _evidence(calls: Sequence[CallRecord]) -> str:
    """Everything the calls returned or were given, as one lower-case text to look claims up in."""
    parts = []
    for c in calls:
        parts.append(json.dumps(c.args, default=str))
        parts.append(json.dumps(c.result or {}, default=str))
        parts.append(c.error or "")
    return ARTIFACT_ID.sub(" ", " ".join(parts)).lower()


def _counts(calls: Sequence[CallRecord]) -> set[tuple[str, int]]:
    """(kind, how many) for what the calls' ``labels`` list ("red circle" …): per label, per shape and
    in all (kind "")."""
    labels = [str(lab).lower() for c in calls if c.status == "done" for lab in (c.result or {}).get("labels", [])]
    out: dict[str, int] = {"": len(labels)} if labels else {}
    for lab in labels:
        words = lab.split()
        for kind in {lab, words[-1]} if words else set():
            out[kind] = out.get(kind, 0) + 1
    return set(out.items())


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "es" if word.endswith(("s", "x", "sh", "ch")) else word + "s"


# what an edit did (its summary starts with the action) and words that say it
EDIT_ACTION = re.compile(r"^\s*(remove|recolour|replace)\b")
SAYS_ACTION = {
    "remove": re.compile(r"\b(remov\w*|eras\w*|delet\w*|gone|got rid|took \w+ out|taken out)\b", re.I),
    "recolour": re.compile(r"\b(recolou?r\w*|colou?red|painted|repainted|made|turned|changed)\b", re.I),
    "replace": re.compile(r"\b(replac\w*|turned|changed|swapp\w*|repainted|put|drew|drawn)\b", re.I),
}


def _edit_action(c: CallRecord) -> str | None:
    m = EDIT_ACTION.match(str((c.result or {}).get("summary", ""))) if c.expert == "edit" else None
    return m.group(1) if m else None


def _friendly_edit(c: CallRecord) -> str | None:
    """An edit's result in words that say what it did: "removed it (1031 masked pixels repainted as the
    background; nothing outside the mask changed)"."""
    action, r = _edit_action(c), c.result or {}
    if action is None:
        return None
    n, prompt = r.get("changed_pixels"), str(r.get("prompt", "")).strip()
    size = f"{n} masked pixels" if n is not None else "the masked pixels"
    if action == "remove":
        return f"removed it: {size} repainted as the background; nothing outside the mask changed"
    if action == "recolour":
        return f"recoloured it: {size} repainted as {prompt}; nothing outside the mask changed"
    return f"replaced it with {prompt}: {size} repainted; nothing outside the mask changed"


def _friendly(c: CallRecord) -> str | None:
    """A detect-style result with ``labels`` in words: "found 2 red circles and 1 blue circle"; an
    edit's in words that say what it did."""
    if c.expert == "edit":
        return _friendly_edit(c)
    objects = (c.result or {}).get("objects")
    if c.expert == "segment" and isinstance(objects, list) and objects and all(
            isinstance(o, dict) and o.get("label") and o.get("area") is not None for o in objects):
        return "masked " + ", ".join(f"the {o['label']} ({o['area']} px)" for o in objects)
    labels = (c.result or {}).get("labels")
    if not isinstance(labels, list) or (c.result or {}).get("out_of_domain"):
        return None
    if not labels:
        return None
    counts: dict[str, int] = {}
    for lab in labels:
        counts[str(lab)] = counts.get(str(lab), 0) + 1
    parts = [f"{n} {' '.join(lab.split()[:-1] + [_plural(lab.split()[-1], n)])}" for lab, n in counts.items()]
    return "found " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])


def unsupported(answer: str, calls: Sequence[CallRecord]) -> list[str]:
    """What in ``answer`` the calls do not support (empty: the answer may stand)."""
    problems: list[str] = []
    if any(c.status != "done" for c in calls) and not ADMITS_FAILURE.search(answer):
        bad = next(c for c in calls if c.status != "done")
        problems.append(f"does not say that {bad.call_id} ({bad.expert}) {bad.status}")
    if all(c.status == "done" for c in calls) and DENIES.search(answer):
        problems.append("turns the request down, but every call ran")
    for c in calls:
        if c.status == "done" and (c.result or {}).get("out_of_domain"):
            problems.append(f"{c.call_id} ({c.expert}) is out of its model's domain")
    evidence = _evidence(calls)
    counts = _counts(calls)
    # a number is supported when the results hold it, or it is how many objects they returned
    numbers = set(NUMBER.findall(evidence)) | {str(n) for _, n in counts}
    for n in NUMBER.findall(ARTIFACT_ID.sub(" ", answer)):
        if n not in numbers and n.rstrip("0").rstrip(".") not in numbers:
            problems.append(f"the number {n} is not in the results")
    for count, colour, shape in COUNTED.findall(answer):
        n = NUMBER_WORDS.get(count.lower(), count)
        kind = f"{colour.lower()} {shape.lower()}".strip()
        if (kind, int(n)) not in counts and not re.search(rf"\b{n}\s+{kind}", evidence):
            problems.append(f"'{count} {kind}' is not a count the results gave")
    for colour, shape in COLOUR_SHAPE.findall(answer):
        if f"{colour.lower()} {shape.lower()}" not in evidence:
            problems.append(f"'{colour} {shape}' is not in the results")
    for shape in {s.lower() for s in SHAPE.findall(answer)}:
        if not re.search(rf"\b{shape}", evidence):
            problems.append(f"'{shape}' is not in the results")
    for c in calls:
        action = _edit_action(c) if c.status == "done" else None
        if action is not None and not SAYS_ACTION[action].search(answer):
            problems.append(f"does not say that {c.call_id} ({c.expert}) did: {action}")
    return problems


def compose(calls: Sequence[CallRecord]) -> str:
    """An answer in the calls' own words: each call's summary, or what went wrong."""
    lines = []
    for c in calls:
        if c.status == "done":
            text = _friendly(c) or (c.summary or "").strip() or f"{c.expert} finished"
        elif c.status == "skipped":
            text = f"{c.expert} was not run: {c.error}"
        else:
            text = f"{c.expert} failed: {c.error}"
        lines.append(text[0].upper() + text[1:] if text else text)
    return " ".join(line if line.endswith((".", "!", "?")) else line + "." for line in lines)


def faithful_answer(answer: str, calls: Sequence[CallRecord]) -> tuple[str, list[str]]:
    """The answer to give: the core's when the calls support it, else ``compose(calls)``; and why not."""
    if not calls:
        return answer, []
    problems = unsupported(answer, calls)
    return (compose(calls) if problems or not answer.strip() else answer), problems


#: What the core says instead of describing a picture its own vision cannot read.
CANNOT_SEE = ("I can't tell what is in this picture myself: my own vision does not read it (the embedded core "
              "knows only a synthetic world of coloured shapes, and its image input is not trained yet), so I "
              "won't guess. I can run an expert on it: ask me to find, segment, crop or edit something in it, "
              "or point SWITCHBOARD_CORE_MODEL at a real vision-language model.")


def unseen_answer(answer: str, unseen_images: int) -> tuple[str, list[str]]:
    """A plain answer (no calls) about images the core cannot see (``unseen_images`` of them in its
    prompt): one that names shapes it cannot have seen gives way to ``CANNOT_SEE``."""
    if unseen_images and COLOUR_SHAPE.search(answer):
        return CANNOT_SEE, [f"names shapes in {unseen_images} image(s) outside what the core can see"]
    return answer, []

