"""Invocation-tuning data for the core, generated from the registry over shapes-world scenes.

Nothing here is a list of final strings. A sample is *composed*: an intent (an expert's ``examples``
entry, a multi-call chain, or a no-expert request) is phrased through interchangeable parts —
verb synonyms, politeness frames, rambling prefixes and suffixes, file names, typos, casing — and its
slots are filled from a real scene (its objects, referring expressions, caption). A plugin's
``examples`` enter the data with no other change: every registered expert is a source of requests
(and its optional train-only ``phrasings`` of ``examples[0]``, composed by the plugin, add breadth).

Built-in experts get their breadth exactly as a plugin does, from attributes of their own class
(``switchboard.expert``); nothing here names an expert to phrase, broaden or simulate its calls:

- ``examples``: the intents (split 3:1 when there are four or more).
- ``phrasings``: train-only ways to ask for ``examples[0]``.
- ``verbs`` / ``train_verbs``: interchangeable leading verbs of its requests (split 3:1 / train-only);
  ``swap_verb`` swaps a request's leading verb for another of the split.
- ``named_values``: train-only requests that name an argument's value in words (crop's regions,
  segment's point positions); any argument called ``seed``, ``steps`` or ``size`` also gets
  numeric ``MODIFIERS``.
- ``simulate()``: the made-up result of a call for fusion turns (what the tool turn shows and what a
  faithful answer says); ``Expert.simulate`` reports the arguments for an expert without its own.

What stays here is the generator's own catalogue of multi-expert intents (``CHAINS``, ``FOLLOWUPS``,
``PRODUCES``), which apply when the experts they name are registered.

Kinds of samples (``Sample.kind``):

- ``call``: one request -> one call (from an expert's ``examples``).
- ``chain``: one request -> several calls with ``$c1`` references (detect -> segment, segment ->
  edit, generate -> detect, detect -> crop), for the experts that are registered.
- ``none``: no expert is needed — chat, arithmetic, describe the attached image (from the scene's
  caption), capabilities, things we have no expert for (said plainly), text tasks that share a verb
  with an expert ("generate a poem"), and image requests without an image.
- ``followup``: a second user turn about artifacts of the first ("now remove it" -> edit with the
  mask the previous turn made).
- ``fusion``: tool results in -> a faithful final answer out (counts, names, sizes, failures).

The held-out split (``split="heldout"``) is explicit: every list of interchangeable parts below
(frames, prefixes, suffixes, each expert's ``verbs`` and the chains' verbs, chain phrasings,
no-expert phrasings, and each expert's examples when it has four or more) is divided by position —
item ``i`` is held out when ``i % 4 == 3`` — and held-out scenes come from another dataset seed. Training never sees a
held-out part; a held-out sample is built from at least one held-out part (its template, verb or
frame). Requests written by people who never saw these parts live in
``training/core_heldout_human.jsonl``.

The built-in experts (detect, segment, generate, edit) are filled in by ``planned_experts()`` when a
registry lacks them; a registered expert of the same name always wins (``data_registry``), with its
own attributes only.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from orchestrator.commands import Call, format_call, format_value
from orchestrator.core.format import tool_turn
from switchboard.expert import (
    EXAMPLE_SLOTS,
    Example,
    Expert,
    NamedValues,
    artifact_fields,
    compose,
)

SPLITS = ("train", "heldout")
TRAIN_SCENE_SEED = 41_000
HELDOUT_SCENE_SEED = 41_001
SCENE_SIZE = 128
# Mix of sample kinds (training and held-out alike).
MIX = {"call": 0.36, "chain": 0.16, "none": 0.29, "followup": 0.07, "fusion": 0.12}


def in_split(items: Sequence[Any], split: str) -> list[Any]:
    """The items of a list of interchangeable parts that belong to ``split`` (i % 4 == 3 is held out;
    lists shorter than 4 are shared)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if len(items) < 4:
        return list(items)
    return [x for i, x in enumerate(items) if (i % 4 == 3) == (split == "heldout")]


# -- the built-in experts, for registries that lack them ------------------------------------------


@lru_cache(maxsize=1)
def planned_experts() -> dict[str, type[Expert]]:
    """The built-in detect, segment, generate and edit classes (never run here: only their declared
    attributes are read), to fill in for registries that lack them, e.g. a test's crop-only registry."""
    from experts.detect import DetectExpert
    from experts.edit import EditExpert
    from experts.generate import GenerateExpert
    from experts.segment import SegmentExpert

    return {c.name: c for c in (DetectExpert, SegmentExpert, GenerateExpert, EditExpert)}


def data_registry(registry: Any = None, *, planned: bool = True) -> Any:
    """The registry the data (and the eval) is generated from: the given/process registry plus the
    built-in experts it lacks (``planned=False`` leaves them out)."""
    from switchboard.registry import Registry, get_registry

    base = registry if registry is not None else get_registry()
    reg = Registry()
    for name in base.names():
        reg.register(base.get_class(name), base.package_of(name))
    if planned:
        for name, cls in planned_experts().items():
            if name not in reg:
                reg.register(cls, "switchboard (built-in, filled in)")
    return reg


def expert_examples(registry: Any, name: str) -> list[Example]:
    """An expert's examples (its own only, as for any plugin)."""
    return list(registry.get_class(name).examples)


def expert_phrasings(registry: Any, name: str, split: str) -> list[Example]:
    """The train-only ``phrasings`` an expert declares, as examples with the arguments of its
    ``examples[0]``; none in the held-out split, and none that contain a held-out example's request."""
    cls = registry.get_class(name)
    if split != "train" or not cls.phrasings or not cls.examples or _extra_artifacts(cls, cls.examples[0].args):
        return []
    requests = [e.request for e in expert_examples(registry, name)]
    return [Example(request=p, args=cls.examples[0].args) for p in not_near(cls.phrasings, requests)]


def _near(words: set[str], held: list[set[str]], limit: float = 0.5) -> bool:
    """Whether a phrasing shares half its words or more (Jaccard) with a held-out request: a
    phrasing that close would be a paraphrase of the held-out template, not breadth."""
    return any(len(words & h) / max(1, len(words | h)) >= limit for h in held)


def not_near(extra: Sequence[str], split_list: Sequence[str]) -> list[str]:
    """``train_only(extra, split_list)`` less the parts that share half their words with a held-out
    item of ``split_list``: train-only breadth that is neither a held-out item nor a paraphrase of one."""
    held = [set(_core_words(h).split()) for h in in_split(split_list, "heldout")] if len(split_list) >= 4 else []
    return [x for x in train_only(extra, split_list) if not _near(set(_core_words(x).split()), held)]


# -- interchangeable parts of phrasing --------------------------------------------------------------
# "{r}" is the request; frames marked "any" also suit questions.
FRAMES_IMPERATIVE = [
    "please {r}", "can you {r}?", "could you {r}?", "I'd like you to {r}", "{r} please", "would you {r}?",
    "I need you to {r}", "{r}, thanks", "hey, {r}", "pls {r}", "could you please {r}?", "go ahead and {r}",
    "{r} for me", "help me {r}", "can u {r}", "kindly {r}", "I want you to {r}", "ok now {r}",
    "just {r}", "quick one: {r}", "let's {r}", "{r}, would you?", "try to {r}", "I'd appreciate it if you could {r}",
    "{r}!", "would you mind if you {r}?", "your task: {r}", "be a dear and {r}", "{r} asap",
    "is it possible to {r}?", "hi! {r}", "do me a favour and {r}",
]
FRAMES_ANY = [
    "{r}", "hey, {r}", "{r} thanks", "ok, {r}", "so, {r}", "hello! {r}", "quick question: {r}", "um, {r}",
    "{r} thx", "right, {r}", "hi there. {r}", "alright: {r}",
]
PREFIXES = [
    "I'm putting together slides about shapes. ", "this is {file}. ", "so I have this image and ",
    "my kid made this drawing for school. ", "attached is {file}. ", "for the report I'm writing, ",
    "ok so basically ", "here's {file}. ", "long story short, ", "working on {file} now. ",
    "I took this screenshot earlier. ", "about the picture I just sent: ", "context: this is for a poster. ",
    "first time using this tool! ", "I've been staring at {file} for an hour. ", "new image for you. ",
]
SUFFIXES = [
    " in {file}", " in this picture", ", it's for a presentation", " in the image", " — no rush",
    " on the attached photo", ". I'll use the result in my slides", " in the photo I sent",
    ", thanks in advance", " in {file} please", ". cheers", " in this one",
]
FILE_STEMS = ["photo", "IMG_2041", "shapes", "scan_0042", "diagram", "drawing", "picture", "test_image",
              "holiday", "slide3", "untitled", "export", "frame_0007", "sample", "board", "capture"]
FILE_EXTS = ["png", "jpg", "jpeg", "webp"]


@dataclass(frozen=True)
class Verbs:
    """Interchangeable leading verbs of requests: ``listed`` are split 3:1 like every list of parts,
    ``train`` are train-only (see ``train_only``). An expert's come from its ``verbs`` and
    ``train_verbs``; a chain may have its own."""

    listed: tuple[str, ...] = ()
    train: tuple[str, ...] = ()


def expert_verbs(cls: type[Expert]) -> Verbs | None:
    """The verbs an expert declares (None when it declares none)."""
    return Verbs(tuple(cls.verbs), tuple(cls.train_verbs)) if cls.verbs else None


# -- train-only breadth -----------------------------------------------------------------------------
# The lists above are split 3:1; the parts below are *composed* from small vocabularies and used by
# the training split only, to give every intent many more phrasings than anyone would list by hand
# (what a 135M model needs to learn the intent instead of the surface). They never enter the held-out
# split, and ``train_only`` drops any composed part that contains a held-out part of its list (a
# held-out verb, frame or phrasing), so the held-out set stays unseen and is exactly what it was.
def _core_words(part: str) -> str:
    """A part as bare lower-case words (slots and punctuation dropped), for containment checks."""
    return " ".join(re.findall(r"[a-z0-9']+", re.sub(r"\{[a-z0-9_@]+\}", " ", part.lower())))


def train_only(extra: Sequence[str], split_list: Sequence[str]) -> list[str]:
    """``extra`` without the items that contain (as whole words) a held-out item of ``split_list``
    or equal any item of it. Cached: the lists are constants, and this runs for every sample."""
    return list(_train_only(tuple(extra), tuple(split_list)))


@lru_cache(maxsize=256)
def _train_only(extra: tuple[str, ...], split_list: tuple[str, ...]) -> tuple[str, ...]:
    held = [w for w in (_core_words(h) for h in in_split(split_list, "heldout")) if w] \
        if len(split_list) >= 4 else []
    listed = {_core_words(x) for x in split_list}
    out = []
    for x in extra:
        words = _core_words(x)
        if words in listed or any(f" {h} " in f" {words} " for h in held):
            continue
        out.append(x)
    return tuple(out)


def named_requests(cls: type[Expert], nv: NamedValues) -> list[str]:
    """The requests of an expert's ``named_values`` (train-only) less those with a held-out verb of it."""
    return train_only(nv.requests, cls.verbs)


def parts(items: Sequence[str], split: str, extra: Sequence[str] = ()) -> list[str]:
    """The split's share of a list of parts; training adds the train-only ``extra`` parts."""
    own = in_split(items, split)
    return own + train_only(extra, items) if split == "train" else own


FRAMES_EXTRA_IMPERATIVE = [
    f"{g}{m.replace('{c}', c)}"
    for g in ["", "hi, ", "hey ", "hello, ", "so ", "right, ", "yo ", "morning! ", "excuse me, ", "hiya, ",
              "next: ", "one more: ", "okay "]
    for m in ["{r}{c}", "please {r}{c}", "can you please {r}{c}?", "will you {r}{c}?", "I'm hoping you can {r}{c}",
              "any chance you could {r}{c}?", "I was wondering if you could {r}{c}", "you think you could {r}{c}?",
              "need you to {r}{c}", "time to {r}{c}", "task: {r}{c}", "request: {r}{c}",
              "would it be possible to {r}{c}?", "I'd love it if you could {r}{c}", "please could you {r}{c}?",
              "can we {r}{c}?", "mind helping me {r}{c}?", "now {r}{c}", "I'd like to {r}{c}",
              "would you be able to {r}{c}?", "we need to {r}{c}", "could u {r}{c}"]
    for c in ["", " please", " if you can", " when you get a chance", " real quick", " for me", " quickly", " now"]
]
FRAMES_EXTRA_ANY = [
    *(f"{g}{{r}}{c}" for g in ["", "hi, ", "hey ", "hello, ", "so ", "right, ", "well, ", "question: ",
                                "yo ", "hmm, ", "one thing: ", "wait, ", "okay "]
      for c in ["", " thank you", " :)", " (just curious)", " please", " cheers"]),
]
PREFIXES_EXTRA = [
    *(f"{a}{b}. " for a in ["I'm making a worksheet for my class", "we are testing a new camera",
                            "my boss asked for this", "this is for a school project",
                            "I'm labelling data for a model", "it's late and I'm tired",
                            "I'm new to image editing", "we need this for the website",
                            "I have a deadline tomorrow", "my colleague sent me this",
                            "I downloaded {file} from our server", "this is the image from the meeting"]
      for b in ["", " and I'm in a hurry", ", so bear with me", " and I can't do it myself"]),
    "here is {file}: ", "attached: {file}. ", "image attached. ", "see attached. ", "sending you {file}. ",
    "I've uploaded a picture. ", "quick task. ", "two things first: it's urgent, and it's for print. ",
]
SUFFIXES_EXTRA = [" in the attached image", " in my picture", " in the screenshot", " in the file {file}",
                  " in the upload", ", if possible", " when you can", ", I need it for a report",
                  " in that image", " from the image I attached", " for my project", " in {file}, if you can",
                  ", it's urgent", " using the picture above"]
BACKGROUND_EXTRA = [*(f"{a} {b}?" for a in ["what colour is", "what's the colour of", "describe",
                                             "how would you describe", "is there anything special about",
                                             "what does it look like in", "tell me the colour of"]
                      for b in ["the background", "the backdrop", "the area behind the shapes",
                                "the empty space around the shapes", "the canvas"])]
DESCRIBE_EXTRA = [*(f"{a} {b}" for a in ["describe", "summarise", "tell me what is in", "what is shown in",
                                          "give me a caption for", "what can you see in", "explain",
                                          "briefly describe", "what's depicted in", "list what is in"]
                    for b in ["the picture", "this photo", "the image", "it", "this", "the attachment",
                              "the shapes"])]

# Train-only argument breadth for the arguments an expert calls seed / steps / size, so that values are
# read from the request instead of memorised with one example's wording (an expert's ``named_values``
# do the same for arguments it names itself).
MODIFIERS: dict[str, tuple[list[str], Callable[[random.Random], int]]] = {
    "seed": ([", seed {n}", " with seed {n}", " (seed {n})", ", use seed {n}", " using random seed {n}",
              ", seed={n}", " and set the seed to {n}"], lambda r: r.choice([r.randrange(10), r.randrange(10_000)])),
    "steps": ([", {n} steps", " with {n} denoising steps", " in {n} steps", ", steps={n}"],
              lambda r: r.choice([5, 8, 10, 12, 15, 25, 30, 40, 50])),
    "size": ([" at {n} pixels", " at {n}px", ", {n} by {n}", ", size {n}"], lambda r: r.choice([64, 96, 128, 256, 512])),
}
MODIFIER_RATE = 0.3  # of single calls to an expert with such an argument that the example leaves unset
TYPO_RATE = 0.12
PHRASING_RATE = 0.5  # of an expert's single calls, when it declares ``phrasings``
PREFIX_RATE = 0.18
SUFFIX_RATE = 0.15
FRAME_RATE = 0.6


def _file(rng: random.Random) -> str:
    return f"{rng.choice(FILE_STEMS)}.{rng.choice(FILE_EXTS)}"


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(4)
    if op == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:
        return word[:i] + word[i + 1:]
    if op == 2:
        return word[:i] + word[i] + word[i:]
    return word[:i] + rng.choice("aeiourstln") + word[i + 1:]


def _typos(template: str, rng: random.Random) -> str:
    """One typo in one word that is not a ``{slot}`` (slot values stay exact)."""
    parts = re.split(r"(\{[a-z0-9_]+\}|\s+)", template)
    idx = [i for i, p in enumerate(parts) if p and not p.startswith("{") and len(p) >= 4 and p.isalpha()]
    if idx:
        i = rng.choice(idx)
        parts[i] = _typo(parts[i], rng)
    return "".join(parts)


def _is_question(r: str) -> bool:
    return r.rstrip().endswith("?") or r.split(" ", 1)[0].lower() in {
        "where", "what", "how", "is", "are", "which", "who", "does", "do", "can", "could", "why"}


_NOUN_HEADS = (" of", " for", " around", " but", " only", " on")
_NOUN_OK = (" {", " the ", " every ", " all ", " each ", " whatever", " any ")


def swap_verb(template: str, verbs: Verbs | None, rng: random.Random, split: str, *, p: float = 0.7) -> str:
    """Replace a leading verb of ``verbs`` by another of the split (as a template), with probability
    ``p`` — always when the verb there belongs to the other split."""
    syn = list(verbs.listed) if verbs is not None else []
    if not syn:
        return template
    low = template.lower()
    choices = in_split(syn, split)
    extra = train_only(verbs.train, syn) if verbs is not None and split == "train" else []
    for phrase_ in sorted(syn, key=len, reverse=True):
        if low.startswith(phrase_ + " "):
            if phrase_ in choices and rng.random() >= p:
                return template
            rest = template[len(phrase_):]
            if not rest.lower().startswith(_NOUN_OK):  # "a mask of" needs an object phrase after it
                extra = [c for c in extra if not c.endswith(_NOUN_HEADS)]
            return rng.choice(choices + extra) + rest
    return template


def phrase(template: str, rng: random.Random, split: str, *, verbs: Verbs | None = None,
           image: bool = True, plain: float = 0.25, frames: bool = True) -> str:
    """Dress a request template (with ``{slots}``) in the split's phrasing parts; slots stay intact.

    In the held-out split at least one part (verb or frame) comes from the held-out lists.
    """
    t = swap_verb(template, verbs, rng, split)
    question = _is_question(t)
    pool = (parts(FRAMES_ANY, split, FRAMES_EXTRA_ANY) if question else
            parts(FRAMES_IMPERATIVE + FRAMES_ANY, split, FRAMES_EXTRA_IMPERATIVE + FRAMES_EXTRA_ANY))
    if frames and (split == "heldout" or rng.random() < FRAME_RATE and rng.random() > plain):
        frame = rng.choice(pool)
        if question and frame.endswith("?"):
            frame = frame[:-1]
        t = frame.replace("{r}", t)
    if image and rng.random() < PREFIX_RATE:
        t = rng.choice(parts(PREFIXES, split, PREFIXES_EXTRA)).replace("{file}", _file(rng)) + t
    if image and rng.random() < SUFFIX_RATE:
        suf = rng.choice(parts(SUFFIXES, split, SUFFIXES_EXTRA)).replace("{file}", _file(rng))
        m = re.search(r"[?!.]+$", t)
        t = t[: m.start()] + suf + t[m.start():] if m else t + suf
    if rng.random() < TYPO_RATE:
        t = _typos(t, rng)
    r = rng.random()
    if r < 0.15:
        t = t.lower()
    elif r < 0.55:
        t = t[:1].upper() + t[1:]
    if rng.random() < 0.2 and not t.endswith(("?", "!", ".")):
        t += rng.choice([".", "!", "?" if question else "."])
    return " ".join(t.split())


# -- scenes and slots -------------------------------------------------------------------------------
@dataclass
class SceneInfo:
    """What the generator knows about a scene (pixels are rendered only when training needs them)."""

    seed: int
    caption: str
    background: str
    objects: list[tuple[str, str, tuple[float, float, float, float], int]]  # shape, colour, box, area
    referring: list[tuple[str, int]]


@lru_cache(maxsize=4096)
def scene_info(seed: int) -> SceneInfo:
    from training.shapes import make_scene

    sc = make_scene(seed, size=SCENE_SIZE)
    objs = [(o.shape, o.colour, tuple(o.box), o.area) for o in sc.objects]
    return SceneInfo(seed, sc.caption, sc.background, objs, list(sc.referring))


def scene_image(seed: int):
    """The PIL image of a scene (what the vision tower sees)."""
    from training.shapes import make_scene

    return make_scene(seed, size=SCENE_SIZE).image


def scene_seeds(split: str, n: int) -> list[int]:
    from training.shapes import scene_seed

    base = TRAIN_SCENE_SEED if split == "train" else HELDOUT_SCENE_SEED
    return [scene_seed(base, i) for i in range(n)]


def new_id(kind: str, rng: random.Random) -> str:
    return f"{kind}-{rng.getrandbits(96):024x}"


COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "hexagon", "star")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "hexagon": "hexagons",
          "star": "stars", "shape": "shapes"}
BG_WORDS = ("white", "grey", "black", "beige", "dark grey", "light grey")
NUMBERS = ("a", "two", "three", "four")


def _strip_article(p: str) -> str:
    return re.sub(r"^(the|a|an)\s+", "", p.strip())


def pick_object(scene: SceneInfo, rng: random.Random) -> tuple[str, str, str, list[int]]:
    """(object phrase without article, colour, shape, indices of matching scene objects)."""
    r = rng.random()
    if r < 0.5 and scene.referring:
        text, i = rng.choice(scene.referring)
        shape, colour = scene.objects[i][0], scene.objects[i][1]
        return _strip_article(text), colour, shape, [i]
    if r < 0.85 and scene.objects:
        shape, colour = rng.choice(scene.objects)[:2]
        idx = [j for j, o in enumerate(scene.objects) if o[0] == shape and o[1] == colour]
        return f"{colour} {shape}", colour, shape, idx
    if r < 0.93 and scene.objects:
        shape = rng.choice(scene.objects)[0]
        idx = [j for j, o in enumerate(scene.objects) if o[0] == shape]
        return shape, rng.choice(COLOURS), shape, idx
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    idx = [j for j, o in enumerate(scene.objects) if o[0] == shape and o[1] == colour]
    return f"{colour} {shape}", colour, shape, idx


def make_prompt(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """A generate prompt in shapes-world words, and the (colour, shape) things it asks for."""
    things = []
    parts = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        c, s = rng.choice(COLOURS), rng.choice(SHAPES)
        k = rng.choice([1, 1, 1, 2, 3])
        things.append((c, s))
        parts.append(f"{NUMBERS[k - 1]} {c} {s if k == 1 else PLURAL[s]}")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if rng.random() < 0.5:
        text += f" on a {rng.choice(BG_WORDS)} background"
    return text, things


@dataclass
class Slots:
    values: dict[str, str]
    matches: list[int]  # scene objects the {object} slot denotes
    prompt_things: list[tuple[str, str]] = field(default_factory=list)


def fill_slots(scene: SceneInfo | None, image_id: str, rng: random.Random) -> Slots:
    if scene is not None and scene.objects:
        obj, colour, shape, idx = pick_object(scene, rng)
    else:
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        obj, idx = f"{colour} {shape}", []
    prompt, things = make_prompt(rng)
    c2 = rng.choice([c for c in COLOURS if c != colour])
    s2 = rng.choice([s for s in SHAPES if s != shape])
    values = {**EXAMPLE_SLOTS, "image": image_id, "object": obj, "colour": colour, "shape": shape,
              "prompt": prompt, "text": rng.choice(["hello", "open", "sale", "exit", "stop", "42"]),
              "instruction": rng.choice([f"make it {c2}", "remove it", f"turn it into a {s2}"]),
              "colour2": c2, "shape2": s2}
    return Slots(values, idx, things)


def _fmt(template: str, values: dict[str, str]) -> str:
    return string.Formatter().vformat(template, (), _SafeDict(values))


class _SafeDict(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


# -- samples ----------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One training/eval conversation: ``messages`` (the prompt), the target ``answer``, the images
    (artifact id -> scene seed), and the gold ``calls`` ([{"id", "expert", "args"}]; empty = none)."""

    kind: str
    messages: list[dict]
    answer: str
    images: dict[str, int]
    calls: list[dict] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)  # fusion: what a faithful answer must state
    source: str = ""
    split: str = "train"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def canonical_args(cls: type[Expert], args: dict[str, Any]) -> dict[str, str]:
    """Arguments as written in a command: the ``Args`` field order, values as text."""
    order = list(_field_order(cls))
    keys = sorted(args, key=lambda k: order.index(k) if k in order else len(order))
    return {k: format_value(args[k]) for k in keys}


def calls_text(calls: list[dict]) -> str:
    """The assistant's plan: one canonical ``<call …/>`` per line."""
    return "\n".join(format_call(Call(c["id"], c["expert"], dict(c["args"]))) for c in calls)


def _user(content: str, image_id: str | None) -> dict:
    msg: dict[str, Any] = {"role": "user", "content": content}
    if image_id:
        msg["images"] = [image_id]
    return msg


@lru_cache(maxsize=256)
def _kinds(cls: type[Expert]) -> dict[str, str]:
    return artifact_fields(cls.Args)


@lru_cache(maxsize=256)
def _field_order(cls: type[Expert]) -> tuple[str, ...]:
    return tuple(cls.Args.model_fields)


def _needs_image(cls: type[Expert]) -> bool:
    return "image" in _kinds(cls).values()


def _extra_artifacts(cls: type[Expert], args: dict[str, Any]) -> dict[str, str]:
    """Artifact arguments of an example that are not the attached image (e.g. an edit's mask)."""
    kinds = _kinds(cls)
    return {k: kinds[k] for k, v in args.items() if k in kinds and v != "{image}"}


class Generator:
    """Composes samples from a registry. ``generate(n)`` gives a deterministic list for a seed/split."""

    def __init__(self, registry: Any = None, *, split: str = "train", seed: int = 0, n_scenes: int = 400,
                 planned: bool = True, handles: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.registry = data_registry(registry, planned=planned)
        self.split = split
        self.rng = random.Random(f"{split}:{seed}")
        self.scenes = scene_seeds(split, n_scenes)
        self.examples = {n: in_split(expert_examples(self.registry, n), self.split) for n in self.registry.names()}
        self._intents = [(n, ex) for n, exs in self.examples.items() for ex in exs
                         if not _extra_artifacts(self.registry.get_class(n), ex.args)]
        self.phrasings = {n: p for n in self.registry.names() if (p := expert_phrasings(self.registry, n, split))}
        #: write short handles (img1, mask1 …) instead of artifact ids, as the loop shows a core that reads them
        self.handles = handles

    # -- helpers --------------------------------------------------------------------------------
    def has(self, *names: str) -> bool:
        return all(n in self.registry for n in names)

    def _scene(self) -> tuple[int, SceneInfo]:
        seed = self.rng.choice(self.scenes)
        return seed, scene_info(seed)

    def _call(self, cid: str, expert: str, args: dict[str, Any]) -> dict:
        cls = self.registry.get_class(expert)
        return {"id": cid, "expert": expert, "args": canonical_args(cls, args)}

    def _single_intents(self) -> list[tuple[str, Example]]:
        """(expert, example) pairs that need nothing but the attached image (or nothing at all)."""
        return self._intents

    # -- kinds ----------------------------------------------------------------------------------
    def sample_call(self) -> Sample | None:
        intents = self._single_intents()
        if not intents:
            return None
        # every expert equally often, whatever its number of examples
        name = self.rng.choice(sorted({n for n, _ in intents}))
        ex = self.rng.choice([e for n, e in intents if n == name])
        if name in self.phrasings and self.rng.random() < PHRASING_RATE:  # never in the held-out split
            ex = self.rng.choice(self.phrasings[name])
        cls = self.registry.get_class(name)
        if self.split == "train":
            ex = self._broaden(cls, ex)
        image = _needs_image(cls) or "{image}" in ex.request
        seed, scene = self._scene()
        img = new_id("image", self.rng)
        slots = fill_slots(scene, img, self.rng)
        attach = image or self.rng.random() < 0.3  # generate requests sometimes come with an image
        req = _fmt(phrase(ex.request, self.rng, self.split, verbs=expert_verbs(cls), image=image), slots.values)
        _, args = Example(request=ex.request, args=ex.args).fill(**slots.values)
        call = self._call("c1", name, args)
        return Sample("call", [_user(req, img if attach else None)], calls_text([call]),
                      {img: seed} if attach else {}, [call], source=f"{name}:{ex.request}", split=self.split)

    def _broaden(self, cls: type[Expert], ex: Example) -> Example:
        """Train-only argument breadth: one of the expert's ``named_values`` (a crop's named region, a
        segment's named position), or a numeric modifier appended."""
        rng = self.rng
        fields = cls.Args.model_fields
        for nv in cls.named_values:
            if nv.arg in fields and rng.random() < nv.rate:
                words = rng.choice(list(nv.values))
                return nv.example(words, rng.choice(named_requests(cls, nv)))
        free = [f for f in MODIFIERS if f in fields and f not in ex.args]
        if free and rng.random() < MODIFIER_RATE and not _is_question(ex.request):
            f = rng.choice(free)
            forms, value = MODIFIERS[f]
            n = value(rng)
            try:
                cls.Args.model_validate({**ex.fill()[1], f: n})
            except (ValidationError, KeyError, ValueError):
                return ex
            return Example(request=ex.request + rng.choice(forms).replace("{n}", str(n)), args={**ex.args, f: n})
        return ex

    def sample_chain(self) -> Sample | None:
        chains = [c for c in CHAINS if self.has(*c.experts)]
        if not chains:
            return None
        ch = self.rng.choice(chains)
        seed, scene = self._scene()
        img = new_id("image", self.rng)
        slots = fill_slots(scene, img, self.rng)
        if ch.uses_prompt_object and slots.prompt_things:
            c, s = self.rng.choice(slots.prompt_things)
            slots.values.update(object=f"{c} {s}", colour=c, shape=s)
        template = self.rng.choice(parts(ch.requests, self.split, ch.extra))
        verbs = expert_verbs(self.registry.get_class(ch.verbs)) if isinstance(ch.verbs, str) else ch.verbs
        req = _fmt(phrase(template, self.rng, self.split, verbs=verbs, image=ch.image), slots.values)
        calls = [self._call(f"c{i + 1}", e, {k: _fmt(v, slots.values) if isinstance(v, str) else v
                                             for k, v in a.items()})
                 for i, (e, a) in enumerate(ch.calls)]
        return Sample("chain", [_user(req, img if ch.image else None)], calls_text(calls),
                      {img: seed} if ch.image else {}, calls, source="chain:" + template, split=self.split)

    def sample_describe(self) -> Sample:
        """A question about the attached image itself (describe it, its background), answered from
        the pixels with no expert: the ``none`` kind's grounded part, and the data of
        ``switchboard train core --align`` (LLaVA's stage 1: the projector learns to show the image)."""
        return _make_describe(self)

    def sample_none(self) -> Sample:
        rng = self.rng
        kinds = [k for k in NONE_KINDS if k.available(self)]
        kind = rng.choices(kinds, weights=[k.weight for k in kinds])[0]
        return kind.make(self)

    def sample_followup(self) -> Sample | None:
        flows = [f for f in FOLLOWUPS if self.has(*f.experts)]
        edit_like = [(n, ex) for n, exs in self.examples.items() for ex in exs
                     if _extra_artifacts(self.registry.get_class(n), ex.args)]
        if not flows and not edit_like:
            return None
        rng = self.rng
        seed, scene = self._scene()
        img = new_id("image", rng)
        slots = fill_slots(scene, img, rng)
        if edit_like and (not flows or rng.random() < 0.35):
            name, ex = rng.choice(edit_like)
            extra = _extra_artifacts(self.registry.get_class(name), ex.args)
            first = _producer_for(self, set(extra.values()))
            if first is None:
                return None
            f = FollowUp((first[0], name), first[1], first[2], [ex.request], [(name, dict(ex.args))])
        else:
            f = rng.choice(flows)
        if f.makes_image and slots.prompt_things:
            c, s = rng.choice(slots.prompt_things)
            slots.values.update(colour=c, shape=s, object=f"{c} {s}")
        # turn 1: a request that made an artifact, its result, and the answer
        req1 = _fmt(phrase(rng.choice(in_split(f.first_requests, self.split)), rng, self.split,
                           image=f.image), slots.values)
        first_call = self._call("c1", f.experts[0], {k: _fmt(v, slots.values) if isinstance(v, str) else v
                                                     for k, v in f.first_args.items()})
        outcome = simulate(self, first_call, scene)
        answer1 = fusion_answer([first_call], [outcome])[0]
        produced = {a["kind"]: a["id"] for a in outcome["artifacts"]}
        values = dict(slots.values)
        for kind, aid in produced.items():
            values[f"@{kind}"] = aid
        template = rng.choice(in_split(f.next_requests, self.split))
        req2 = _fmt(phrase(template, rng, self.split, image=False, plain=0.5), values)
        calls = []
        for i, (e, a) in enumerate(f.next_calls):
            kinds = _kinds(self.registry.get_class(e))
            args = {}
            for k, v in a.items():
                if k in kinds and isinstance(v, str) and not v.startswith("$") and v != "{image}":
                    v = produced.get(kinds[k]) or produced.get("image") or img  # the artifact of turn 1
                elif k in kinds and v == "{image}" and f.makes_image:
                    v = produced.get("image", img)
                args[k] = _fmt(v, values) if isinstance(v, str) else v
            calls.append(self._call(f"c{i + 1}", e, args))
        messages = [_user(req1, img if f.image else None), {"role": "assistant", "content": calls_text([first_call])},
                    {"role": "tool", "content": tool_turn([outcome])}, {"role": "assistant", "content": answer1},
                    _user(req2, None)]
        return Sample("followup", messages, calls_text(calls), {img: seed} if f.image else {}, calls,
                      source="followup:" + template, split=self.split)

    def sample_fusion(self) -> Sample | None:
        rng = self.rng
        base = self.sample_chain() if rng.random() < 0.35 else self.sample_call()
        if base is None or not base.calls:
            return None
        img = next(iter(base.images), None)
        seed = base.images.get(img) if img else self.rng.choice(self.scenes)
        scene = scene_info(seed)
        outcomes = []
        failed = rng.random() < 0.15
        for i, call in enumerate(base.calls):
            if failed and i == 0:
                outcomes.append({"call_id": call["id"], "expert": call["expert"], "status": "failed",
                                 "error": rng.choice(FAILURES), "artifacts": []})
                continue
            if outcomes and outcomes[0]["status"] != "done":
                outcomes.append({"call_id": call["id"], "expert": call["expert"], "status": "skipped",
                                 "error": f"depends on {base.calls[0]['id']}, which failed", "artifacts": []})
                continue
            outcomes.append(simulate(self, call, scene))
        answer, facts = fusion_answer(base.calls, outcomes)
        messages = base.messages + [{"role": "assistant", "content": base.answer},
                                    {"role": "tool", "content": tool_turn(outcomes)}]
        return Sample("fusion", messages, answer, base.images, [], facts, source="fusion:" + base.source,
                      split=self.split)

    def sample(self, kind: str | None = None) -> Sample:
        """One sample of ``kind`` (drawn from MIX when None); kinds the registry cannot make fall back."""
        kinds = list(MIX)
        for _ in range(20):
            k = kind or self.rng.choices(kinds, weights=[MIX[x] for x in kinds])[0]
            s = getattr(self, f"sample_{k}")()
            if s is not None:
                return s
            kind = None
        return self.sample_none()

    def generate(self, n: int, kind: str | None = None) -> list[Sample]:
        samples = [self.sample(kind) for _ in range(n)]
        return [with_handles(s) for s in samples] if self.handles else samples


def generate(n: int, *, split: str = "train", seed: int = 0, registry: Any = None,
             kind: str | None = None, handles: bool = False) -> list[Sample]:
    """``n`` samples of a split (deterministic for a seed); see ``Generator``."""
    return Generator(registry, split=split, seed=seed, handles=handles).generate(n, kind)


def with_handles(sample: Sample) -> Sample:
    """The sample as a core that reads and writes short handles sees it (``orchestrator.core.handles``,
    given as the loop gives them): the artifact ids of its prompt, answer, images and gold calls replaced
    by ``img1``, ``mask1`` …; the same samples otherwise (for retraining the core on handles)."""
    from orchestrator.core.handles import Handles

    h = Handles.for_conversation(sample.messages)
    calls = [{**c, "args": {k: h.text(v) if isinstance(v, str) else v for k, v in c["args"].items()}}
             for c in sample.calls]
    return replace(sample, messages=h.messages(sample.messages), answer=h.text(sample.answer),
                   images=h.images(sample.images), calls=calls)


# -- chains and follow-ups --------------------------------------------------------------------------
@dataclass
class Chain:
    """A multi-call intent: the experts it needs, its phrasings, and its calls (``$cN`` references)."""

    experts: tuple[str, ...]
    requests: list[str]
    calls: list[tuple[str, dict[str, Any]]]
    verbs: Verbs | str | None = None  # its own, or (a name) those of one of its experts
    image: bool = True
    uses_prompt_object: bool = False
    extra: list[str] = field(default_factory=list)  # train-only phrasings (see ``parts``)


_IMG = "{image}"
# the verbs of two chains, which no single expert has
REMOVE_VERBS = Verbs(
    ("remove", "erase", "delete", "get rid of", "take out", "wipe out", "clear away", "eliminate",
     "strip out", "scrub out", "discard"),
    ("rub out", "blot out", "wipe away", "cut", "clean up", "take away", "zap", "drop", "hide",
     "cover up", "purge", "do away with", "edit out", "pull out", "knock out", "clean out",
     "remove all traces of", "throw out", "obliterate"))
RECOLOUR_VERBS = Verbs(
    ("make", "turn", "colour", "paint", "change", "recolour", "dye", "tint", "repaint", "shade",
     "re-colour"),
    ("color", "recolor", "colorize", "colourise", "fill", "set", "convert", "transform",
     "alter", "modify", "switch", "restyle", "redo"))
CHAINS = [
    Chain(("detect", "segment"),
          ["find the {object} and outline it", "locate the {object}, then segment it",
           "detect the {object} and give me its mask", "find every {object} and mask them",
           "find the {object} and cut it out as a mask", "detect the {object} and then segment what you found",
           "look for the {object} and make a mask of it", "first find the {object}, then outline it precisely"],
          [("detect", {"image": _IMG, "query": "{object}"}), ("segment", {"image": _IMG, "boxes": "$c1"})],
          extra=["find the {object} and then give me a mask of it", "locate the {object} and make a pixel mask",
                 "detect the {object} first, then segment it", "box the {object}, then mask it",
                 "find each {object} and segment them one by one", "spot the {object} and cut out its shape",
                 "search for the {object} and produce its mask", "detect the {object}; after that, mask it",
                 "find where the {object} is and give me its exact outline"]),
    Chain(("segment", "edit"),
          ["remove the {object}", "erase the {object} from the picture", "get rid of the {object}",
           "delete the {object}", "take the {object} out of the image", "make the {object} disappear",
           "remove the {object} and fill in the background", "wipe out the {object}"],
          [("segment", {"image": _IMG, "target": "the {object}"}),
           ("edit", {"image": _IMG, "mask": "$c1", "instruction": "remove it"})], verbs=REMOVE_VERBS,
          extra=["rub out the {object}", "the {object} has to go", "I don't want the {object} in the picture",
                 "clean the {object} out of the image", "hide the {object}", "remove the {object} completely",
                 "the picture would be better without the {object}", "lose the {object}",
                 "cut the {object} out of the picture and fill the gap", "can the {object} be removed?",
                 "no more {object} please, remove it"]),
    Chain(("segment", "edit"),
          ["make the {object} {colour2}", "turn the {object} {colour2}", "colour the {object} {colour2}",
           "change the {object} to {colour2}", "paint the {object} {colour2}",
           "recolour the {object} in {colour2}", "I want the {object} to be {colour2}",
           "switch the colour of the {object} to {colour2}"],
          [("segment", {"image": _IMG, "target": "the {object}"}),
           ("edit", {"image": _IMG, "mask": "$c1", "instruction": "make it {colour2}"})], verbs=RECOLOUR_VERBS,
          extra=["color the {object} {colour2}", "give the {object} a {colour2} colour",
                 "the {object} should be {colour2}", "can the {object} be {colour2}?",
                 "fill the {object} with {colour2}", "change the colour of the {object} to {colour2}",
                 "set the colour of the {object} to {colour2}", "I'd prefer the {object} in {colour2}",
                 "recolor the {object} to {colour2}", "make the {object} {colour2} instead",
                 "the {object} needs to be {colour2}, change it"]),
    Chain(("segment", "edit"),
          ["replace the {object} with a {colour2} {shape2}", "swap the {object} for a {colour2} {shape2}",
           "turn the {object} into a {colour2} {shape2}", "put a {colour2} {shape2} where the {object} is",
           "exchange the {object} with a {colour2} {shape2}"],
          [("segment", {"image": _IMG, "target": "the {object}"}),
           ("edit", {"image": _IMG, "mask": "$c1", "instruction": "replace it with a {colour2} {shape2}"})],
          extra=["swap out the {object} for a {colour2} {shape2}", "substitute a {colour2} {shape2} for the {object}",
                 "replace the {object} by a {colour2} {shape2}", "I'd rather have a {colour2} {shape2} than the {object}",
                 "change the {object} into a {colour2} {shape2}", "make the {object} a {colour2} {shape2} instead",
                 "the {object} should become a {colour2} {shape2}", "convert the {object} to a {colour2} {shape2}",
                 "draw a {colour2} {shape2} over the {object}", "transform the {object} into a {colour2} {shape2}",
                 "instead of the {object}, I want a {colour2} {shape2}", "have a {colour2} {shape2} in place of the {object}"]),
    Chain(("generate", "detect"),
          ["draw {prompt} and then find the {object} in it", "generate {prompt}, then locate the {object}",
           "make a picture of {prompt} and detect the {object}", "create {prompt} and show me where the {object} is",
           "paint {prompt}, then box the {object}"],
          [("generate", {"prompt": "{prompt}"}), ("detect", {"image": "$c1", "query": "{object}"})],
          verbs="generate", image=False, uses_prompt_object=True),
    Chain(("detect", "crop"),
          ["crop out the {object}", "crop the picture to the {object}", "find the {object} and crop it",
           "give me a close-up of the {object}", "cut the {object} out into its own image",
           "zoom in on the {object}", "crop around the {object}", "make a crop of each {object}",
           "frame the {object} tightly"],
          [("detect", {"image": _IMG, "query": "{object}"}), ("crop", {"image": _IMG, "boxes": "$c1"})],
          extra=["crop the image around the {object}", "zoom in on the {object} and crop it",
                 "crop so that only the {object} is left", "I want a cropped image of the {object}",
                 "cut a crop of the {object}", "give me a zoomed-in view of the {object}", "crop to the {object}",
                 "make a close-up of the {object}", "show me the {object} up close", "enlarge the {object}",
                 "get me a tight crop of each {object}"]),
    Chain(("generate", "segment"),
          ["draw {prompt} and give me a mask of the {object}", "generate {prompt}, then segment the {object}",
           "make {prompt} and outline the {object} in it", "create {prompt} and then mask the {object}"],
          [("generate", {"prompt": "{prompt}"}), ("segment", {"image": "$c1", "target": "the {object}"})],
          verbs="generate", image=False, uses_prompt_object=True),
]


@dataclass
class FollowUp:
    """Turn 1 makes an artifact; turn 2 refers to it ("now remove it"). ``{image}`` in turn 2's
    artifact arguments means the attached image (or, after generate, the generated one); other
    artifact arguments take the artifact of that kind that turn 1 made."""

    experts: tuple[str, ...]
    first_args: dict[str, Any]
    first_requests: list[str]
    next_requests: list[str]
    next_calls: list[tuple[str, dict[str, Any]]]
    image: bool = True

    @property
    def first_expert(self) -> str:
        return self.experts[0]

    @property
    def makes_image(self) -> bool:
        """Turn 1 drew a new image from the prompt: turn 2's ``{image}`` is that image, and the
        objects it names are the prompt's."""
        return "{prompt}" in self.first_args.values()


FOLLOWUPS = [
    FollowUp(("segment", "edit"), {"image": _IMG, "target": "the {object}"},
             ["segment the {object}", "mask the {object}", "outline the {object}", "select the {object}"],
             ["now remove it", "remove it", "erase that", "now get rid of it", "delete it from the image",
              "ok, take it out", "great, now remove it please", "can you erase it?"],
             [("edit", {"image": _IMG, "mask": "@", "instruction": "remove it"})]),
    FollowUp(("segment", "edit"), {"image": _IMG, "target": "the {object}"},
             ["segment the {object}", "give me a mask of the {object}", "isolate the {object}", "mask the {object}"],
             ["now make it {colour2}", "make it {colour2}", "turn it {colour2}", "paint it {colour2}",
              "change its colour to {colour2}", "ok, now colour it {colour2}", "can it be {colour2} instead?",
              "recolour it {colour2}"],
             [("edit", {"image": _IMG, "mask": "@", "instruction": "make it {colour2}"})]),
    FollowUp(("detect", "crop"), {"image": _IMG, "query": "{object}"},
             ["find the {object}", "detect the {object}", "where is the {object}?", "locate the {object}"],
             ["crop it", "now crop that", "zoom in on it", "crop them out", "cut it out into a new image",
              "can you crop to it?", "give me a close-up of that", "crop around what you found"],
             [("crop", {"image": _IMG, "boxes": "@"})]),
    FollowUp(("detect", "segment"), {"image": _IMG, "query": "{object}"},
             ["find the {object}", "detect the {object}", "locate the {object}", "look for the {object}"],
             ["now segment it", "outline them", "mask it", "now give me the mask", "segment what you found",
              "can you outline it too?", "and mask those", "make masks for them"],
             [("segment", {"image": _IMG, "boxes": "@"})]),
    FollowUp(("generate", "detect"), {"prompt": "{prompt}"},
             ["draw {prompt}", "generate {prompt}", "make a picture of {prompt}", "create {prompt}"],
             ["now find the {colour} {shape} in it", "where is the {colour} {shape}?",
              "detect the {colour} {shape} there", "locate the {colour} {shape} in that picture",
              "find the {colour} {shape} in the new image", "is there a {colour} {shape} in it?",
              "find the {colour} {shape}", "can you spot the {colour} {shape}?"],
             [("detect", {"image": _IMG, "query": "{colour} {shape}"})], image=False),
    FollowUp(("generate", "crop"), {"prompt": "{prompt}"},
             ["draw {prompt}", "generate {prompt}", "paint {prompt}", "create {prompt}"],
             ["crop the left half of it", "now crop its left half", "keep only the left half",
              "cut it down to the left half", "crop it to the left half please"],
             [("crop", {"image": _IMG, "region": [0, 0, 500, 1000]})], image=False),
]


def _producer_for(gen: Generator, kinds: set[str]) -> tuple[str, dict[str, Any], list[str]] | None:
    """A first turn that makes an artifact of one of ``kinds`` (for examples that need one)."""
    for f in FOLLOWUPS:
        if f.experts[0] in gen.registry and PRODUCES.get(f.experts[0], set()) & kinds:
            return f.experts[0], f.first_args, f.first_requests
    return None


PRODUCES = {"detect": {"boxes", "overlay"}, "segment": {"mask", "overlay"}, "generate": {"image"},
            "edit": {"image"}, "crop": {"image"}}


# -- simulated results and faithful answers ---------------------------------------------------------
FAILURES = ["timed out after 60 s", "the worker is not responding", "the image could not be decoded",
            "out of memory", "the model failed to load", "the queue is full, try again later"]


def _plural(phrase_: str, n: int) -> str:
    if n == 1:
        return phrase_
    words = phrase_.split()
    if words and words[-1] in PLURAL:
        words[-1] = PLURAL[words[-1]]
        return " ".join(words)
    if words and not words[-1].endswith("s"):
        return phrase_ + "s"
    return phrase_


def _matches(scene: SceneInfo, query: str) -> list[int]:
    """Scene objects a query denotes (referring expression, colour/shape words)."""
    q = _strip_article(query.lower())
    for text, i in scene.referring:
        if _strip_article(text) == q:
            return [i]
    words = set(re.findall(r"[a-z]+", q))
    words |= {s for s, p in PLURAL.items() if p in words}
    cols = words & set(COLOURS)
    shapes = words & set(SHAPES)
    if not cols and not shapes:
        return []
    return [j for j, o in enumerate(scene.objects)
            if (not cols or o[1] in cols) and (not shapes or o[0] in shapes)]


def _where(box: tuple[float, float, float, float]) -> str:
    cx, cy = (box[0] + box[2]) / 2 / SCENE_SIZE, (box[1] + box[3]) / 2 / SCENE_SIZE
    v = "top" if cy < 0.38 else "bottom" if cy > 0.62 else ""
    h = "left" if cx < 0.38 else "right" if cx > 0.62 else ""
    return f"{v} {h}".strip() or "centre"


class _SceneFacts:
    """A scene's ground truth as ``Expert.simulate`` sees it (``switchboard.expert.SimulatedScene``)."""

    def __init__(self, scene: SceneInfo) -> None:
        self.scene = scene

    def matches(self, query: str) -> list[int]:
        return _matches(self.scene, query)

    def where(self, index: int) -> str:
        return _where(self.scene.objects[index][2])

    def plural(self, phrase: str, n: int) -> str:
        return _plural(phrase, n)


def simulate(gen: Generator, call: dict, scene: SceneInfo) -> dict:
    """A plausible outcome of a call on a scene (what a tool turn would show), from the expert's
    ``simulate``; ``_answer`` and ``_facts`` (what a faithful answer says) are for ``fusion_answer``."""
    sim = gen.registry.get_class(call["expert"]).simulate(dict(call["args"]), _SceneFacts(scene), gen.rng)
    artifacts = [{"id": new_id(kind, gen.rng), "kind": kind, "role": role or kind} for kind, role in sim.artifacts]
    return {"call_id": call["id"], "expert": call["expert"], "status": "done", "artifacts": artifacts,
            "summary": sim.summary, "_answer": sim.answer, "_facts": list(sim.facts)}


def fusion_answer(calls: list[dict], outcomes: list[dict]) -> tuple[str, list[str]]:
    """A faithful final answer from tool outcomes, and the facts it states (numbers, names, failure)."""
    parts, facts = [], []
    for call, o in zip(calls, outcomes, strict=True):
        e = call["expert"]
        if o["status"] == "failed":
            parts.append(f"Sorry, the {e} step failed: {o['error']}.")
            facts += ["fail"]
            continue
        if o["status"] == "skipped":
            continue
        parts.append(o.get("_answer") or f"The {e} expert says: {o['summary']}.")
        facts += o.get("_facts", [])
    for o in outcomes:
        for k in [k for k in o if k.startswith("_")]:
            del o[k]
    text = " ".join(parts) or "Done."
    return text.replace("..", "."), [f for f in facts if f]


# -- requests that need no expert -------------------------------------------------------------------
@dataclass
class NoneKind:
    """A family of no-expert requests: when it applies, how often, and how a sample is made."""

    name: str
    weight: float
    make: Callable[[Generator], Sample]
    needs: tuple[str, ...] = ()

    def available(self, gen: Generator) -> bool:
        return all(n in gen.registry for n in self.needs)


def _experts_line(gen: Generator) -> str:
    return ", ".join(gen.registry.names())


CHAT = {
    "greet": (["hi", "hello", "hey there", "good morning", "hiya", "hello, anyone there?", "yo", "greetings",
               "good evening", "hi!", "howdy", "hey"],
              ["Hello! Attach an image and tell me what you need. I can use: {experts}."]),
    "thanks": (["thanks", "thank you so much", "cool, thanks", "great, thank you!", "thx", "perfect, thanks",
                "awesome", "that's great", "nice work", "ty", "much appreciated", "brilliant"],
               ["You're welcome!", "Glad I could help!"]),
    "bye": (["bye", "see you later", "that's all for now", "goodbye", "i'm done", "cya", "ok that's it",
             "talk later"], ["Goodbye!"]),
    "how": (["how are you?", "how's it going?", "are you there?", "how are you doing today?", "you ok?",
             "what's up?", "are you a robot?", "who are you?"],
            ["I'm Switchboard, an image assistant. How can I help?"]),
    "help": (["what can you do?", "help", "which tools do you have?", "what experts are available?",
              "list your abilities", "what are you able to do?", "show me the commands", "what do you support?",
              "how do I use you?", "what kind of things can you do with images?", "capabilities?",
              "tell me what you can do"],
             ["I can use these experts: {experts}. Attach an image and tell me what you need."]),
}
DESCRIBE = ["describe the image", "what's in this picture?", "what do you see?", "tell me about this image",
            "caption this", "what is this?", "what shapes are in it?", "give me a short description of the photo",
            "describe what you see", "what does the picture show?", "summarise this image in one sentence",
            "what's going on in this image?", "write a caption for it", "explain what is in the image",
            "what objects are there?", "can you describe it?"]
BACKGROUND = ["what colour is the background?", "what's the background like?", "describe the background",
              "is the background plain?", "what is behind the shapes?", "tell me about the background"]
# Things we have no expert for: (what it is, phrasings, names of experts that would cover it).
UNSUPPORTED = [
    ("depth estimation", ["estimate the depth of this image", "make a depth map", "create a depth image",
                          "how far away is each object?", "give me a depth estimate",
                          "generate a depth map of the scene", "compute the distance to the camera",
                          "produce a disparity map"], {"depth"}),
    ("reading text", ["extract the text", "read the text in this image", "what does the sign say?",
                      "transcribe the writing", "OCR this please", "copy out the words in the picture",
                      "what is written here?", "find the text and read it"], {"ocr", "read_text"}),
    ("upscaling", ["upscale this to 4k", "increase the resolution", "make it sharper and bigger",
                   "enhance the image quality", "super-resolve this", "make this picture high-res"], {"upscale"}),
    ("translation", ["translate this to French", "how do you say circle in German?",
                     "translate 'red square' into Spanish", "what is this in Japanese?"], {"translate"}),
    ("video", ["make a video of the shapes moving", "animate this image", "turn it into a gif",
               "create a short clip of a spinning star", "generate a video"], {"video", "animate"}),
    ("audio", ["read this aloud", "transcribe this audio", "play a sound", "make a song about circles",
               "convert this to speech"], {"speech", "tts", "audio"}),
    ("face recognition", ["who is this person?", "recognise the faces", "identify the people in the photo",
                          "whose face is this?"], {"face"}),
    ("3D", ["turn this into a 3D model", "make a 3D mesh of the star", "reconstruct the scene in 3D",
            "give me an STL file of the hexagon"], {"mesh", "reconstruct3d"}),
    ("web search", ["search the web for shape facts", "look up the weather", "google this image",
                    "find similar images online", "what's the news today?"], {"search", "web"}),
    ("email", ["email this to my boss", "send the picture to alice@example.com", "post this on twitter",
               "share it with my team"], {"email"}),
    ("classification of real photos", ["what breed is this dog?", "what species of bird is this?",
                                       "what car model is that?", "is this mushroom poisonous?"], {"classify"}),
]
TEXT_TASKS = ["find me a recipe for pancakes", "generate a poem about cats", "segment this sentence into words",
              "detect the language of 'bonjour'", "what is crop rotation?", "edit my essay for grammar",
              "draw conclusions from these numbers: 3, 5, 8", "make a list of fruits", "create a strong password",
              "write a story about a triangle", "remove duplicates from: a, b, a, c", "find the bug in my code",
              "generate a name for my startup", "crop yields in 2020?", "make a plan for my week",
              "segment my customers by age", "detect sarcasm in: 'great, just great'", "edit this sentence: i has a cat",
              "draw me a map in words", "create a shopping list", "find the square root of 81",
              "generate ideas for a birthday party", "mask my IP address", "remove the last word: hello big world",
              "outline an essay about climate", "locate the nearest pharmacy", "create an account for me",
              "render this markdown", "paint me a picture with words", "crop the text to 10 words: one two three"]
# Train-only text tasks about words and letters given inline: the contrast an OCR expert's phrasings
# need ("count the words in '…'" is not "read the words in the picture").
TEXT_TASKS_EXTRA = compose(
    ["count the words in", "reverse the words in", "capitalise", "spell-check", "proofread", "summarise",
     "translate into French:", "sort the words in", "rewrite more politely:", "fix the punctuation in",
     "how many letters are in", "write out in uppercase:", "extract the nouns from", "read this sentence and shorten it:"],
    ["'the quick brown fox jumps'", "'we was late again'", "this sentence: the cat sat on the mat",
     "'please send the report by friday'", "'green apples and red pears'", "my note: buy milk and eggs"])
# Train-only text tasks that open with an image expert's verb (the request is about text, so no
# expert fits): the contrast that keeps "detect", "segment" or "draw up" from meaning an image call alone.
TEXT_TASKS_EXTRA += [
    *compose(["detect", "find", "identify", "spot", "locate", "extract", "pick out", "highlight"],
             ["the sentiment of 'what a lovely day'", "the typos in 'recieve the pakage'", "the main idea of my essay",
              "the verbs in 'she runs and jumps'",
              "the rhyme scheme of my poem", "the vowels in 'banana'", "the tone of this email: 'per my last message'"]),
    *compose(["generate", "create", "draw up", "make", "produce", "come up with"],
             ["ten baby names", "a summary of chapter two", "a haiku about rain", "a to-do list for moving house",
              "a slogan for my bakery", "three interview questions"]),
    *compose(["edit", "remove", "erase", "cut", "crop", "trim", "segment", "mask"],
             ["the filler words from my speech", "my cover letter down to 100 words", "'very' from 'it is very very good'",
              "this paragraph into sentences: it rained. we stayed in.", "the swear words in my message"]),
]
# Train-only phrasings of things we have no expert for, by what they are (same keys as UNSUPPORTED):
# more ways to ask for each, and requests that name an object or a file format.
UNSUPPORTED_EXTRA: dict[str, list[str]] = {
    "depth estimation": compose(["estimate", "measure", "show me", "work out", "compute"],
                                ["how deep the scene is", "the depth of the {object}", "how far the {object} is",
                                 "a depth map of the {object}", "the distance of every shape from the camera"]),
    "upscaling": compose(["upscale", "enlarge the resolution of", "sharpen and enlarge", "make a 4k version of",
                          "double the resolution of", "super-resolve"], ["the photo", "the {object}", "this", "it"]),
    "translation": compose(["translate", "say", "write"], ["'hello' in Italian", "'blue star' in German",
                                                           "the caption in Chinese", "this word in Portuguese"]),
    "video": compose(["make a video of", "animate", "make a clip of", "film", "turn into a movie:",
                      "create a looping animation of"], ["the {object}", "the shapes", "this picture",
                                                         "the {object} bouncing"]),
    "audio": compose(["make a sound for", "narrate", "give me an audio clip of", "sing about", "record a voice-over for"],
                     ["the {object}", "this picture", "the scene"]),
    "face recognition": compose(["who is", "name the person in", "recognise the face in", "tell me who appears in"],
                                ["this photo", "the picture", "the selfie"]),
    "3D": compose(["make", "export", "build", "give me", "create", "print"],
                  ["a 3D model of the {object}", "an OBJ mesh of the {object}", "a point cloud of the scene",
                   "a 3D printable {object}", "a voxel version of the {object}"]),
    "web search": compose(["search online for", "look up on the internet", "browse the web for", "google"],
                          ["pictures like this", "the history of the {object}", "today's headlines", "cheap flights"]),
    "email": compose(["email", "send", "text", "forward", "upload", "post"],
                     ["this to my team", "the picture to bob@example.com", "the {object} to my phone",
                      "it to instagram"]),
    "classification of real photos": compose(["what breed of", "what kind of", "which species of"],
                                             ["cat is this?", "tree is in the photo?", "flower is that?",
                                              "fish is this?"]),
}
# filtered once, at import, exactly as an expert's phrasings are
TEXT_TASKS_EXTRA = not_near(TEXT_TASKS_EXTRA, TEXT_TASKS)
UNSUPPORTED_EXTRA = {what: not_near(UNSUPPORTED_EXTRA.get(what, []), reqs) for what, reqs, _ in UNSUPPORTED}
NO_IMAGE = ["Please attach an image first, then I can do that.", "I need an image for that: please attach one."]


def _none_sample(gen: Generator, content: str, answer: str, source: str, *, image: bool) -> Sample:
    img = new_id("image", gen.rng) if image else None
    seed = gen.rng.choice(gen.scenes)
    return Sample("none", [_user(content, img)], answer, {img: seed} if img else {}, [], source=source,
                  split=gen.split)


def _make_chat(gen: Generator) -> Sample:
    rng = gen.rng
    key = rng.choice(sorted(CHAT))
    reqs, answers = CHAT[key]
    req = phrase(rng.choice(in_split(reqs, gen.split)), rng, gen.split, image=False, frames=False)
    ans = rng.choice(answers).replace("{experts}", _experts_line(gen))
    return _none_sample(gen, req, ans, f"chat:{key}", image=rng.random() < 0.25)


def _make_describe(gen: Generator) -> Sample:
    rng = gen.rng
    seed, scene = gen._scene()
    img = new_id("image", rng)
    if rng.random() < 0.75:
        req = phrase(rng.choice(parts(DESCRIBE, gen.split, DESCRIBE_EXTRA)), rng, gen.split)
        ans = f"The image shows {scene.caption}."
    else:
        req = phrase(rng.choice(parts(BACKGROUND, gen.split, BACKGROUND_EXTRA)), rng, gen.split)
        ans = f"It is a {scene.background}."
    return Sample("none", [_user(req, img)], ans, {img: seed}, [], source="describe", split=gen.split)


def _make_unsupported(gen: Generator) -> Sample:
    rng = gen.rng
    items = [u for u in UNSUPPORTED if not (u[2] & set(gen.registry.names()))]
    what, reqs, _ = rng.choice(items)
    req = phrase(rng.choice(parts(reqs, gen.split, UNSUPPORTED_EXTRA[what])), rng, gen.split)
    if "{object}" in req:  # only train-only phrasings have one: a shape of some scene, maybe with its colour
        shape, colour, _box, _area = rng.choice(scene_info(rng.choice(gen.scenes)).objects)
        req = req.replace("{object}", f"{colour} {shape}" if rng.random() < 0.5 else shape)
    ans = f"Sorry, I can't help with {what}: I have no expert for it. I can use: {_experts_line(gen)}."
    return _none_sample(gen, req, ans, f"unsupported:{what}", image=rng.random() < 0.7)


def _make_text_task(gen: Generator) -> Sample:
    rng = gen.rng
    req = phrase(rng.choice(parts(TEXT_TASKS, gen.split, TEXT_TASKS_EXTRA)), rng, gen.split, image=False)
    ans = f"That is not an image task, and I only work with images. I can use: {_experts_line(gen)}."
    return _none_sample(gen, req, ans, "text_task", image=rng.random() < 0.35)


def _make_arithmetic(gen: Generator) -> Sample:
    rng = gen.rng
    a, b = rng.randint(1, 60), rng.randint(1, 40)
    op = rng.choice(["+", "-", "*"])
    val = a + b if op == "+" else a - b if op == "-" else a * b
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    forms = ["what is {a} {op} {b}?", "{a} {op} {b} = ?", "compute {a} {w} {b}", "how much is {a} {w} {b}?",
             "calculate {a}{op}{b}", "what's {a} {w} {b}", "quick maths: {a} {op} {b}", "{a} {w} {b}?"]
    req = rng.choice(in_split(forms, gen.split)).format(a=a, b=b, op=op, w=word)
    return _none_sample(gen, req, f"{a} {op} {b} = {val}.", "arithmetic", image=False)


def _make_no_image(gen: Generator) -> Sample | None:
    rng = gen.rng
    intents = [(n, e) for n, e in gen._single_intents() if _needs_image(gen.registry.get_class(n))]
    if not intents:
        return _make_chat(gen)
    name, ex = rng.choice(intents)
    slots = fill_slots(None, "", rng)
    req = _fmt(phrase(ex.request, rng, gen.split, verbs=expert_verbs(gen.registry.get_class(name)), image=False),
               slots.values)
    return _none_sample(gen, req, rng.choice(NO_IMAGE), f"no_image:{name}", image=False)


NONE_KINDS = [
    NoneKind("chat", 0.16, _make_chat),
    NoneKind("describe", 0.2, _make_describe),
    NoneKind("unsupported", 0.26, _make_unsupported),
    NoneKind("text_task", 0.2, _make_text_task),
    NoneKind("arithmetic", 0.06, _make_arithmetic),
    NoneKind("no_image", 0.12, _make_no_image),
]


def to_jsonl(samples: Sequence[Sample]) -> str:
    return "\n".join(json.dumps(s.to_dict()) for s in samples)
