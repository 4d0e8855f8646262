"""The one referring vocabulary (experts.referring): detect's queries and segment's targets read the
same words the same way — colours and their synonyms, class synonyms, plurals, picks, generic nouns."""

from __future__ import annotations

import pytest

from experts.referring import (
    COLOUR_WORDS,
    PICK_ORDER,
    PICKS,
    QueryMatcher,
    parse_query,
    parse_target,
    pick_one,
)
from training.shapes import SHAPES


@pytest.fixture(scope="module")
def detect_matcher() -> QueryMatcher:
    """detect's matcher for the shapes world's classes (no sentence encoder: words only)."""
    return QueryMatcher(list(SHAPES))


@pytest.mark.parametrize(("word", "colour"), [
    ("crimson", "red"), ("scarlet", "red"), ("red", "red"), ("navy", "blue"), ("azure", "blue"),
    ("violet", "purple"), ("magenta", "purple"), ("teal", "green"), ("golden", "yellow"),
    ("amber", "orange"), ("gray", "grey"), ("white", "white"),
])
def test_a_colour_word_means_one_colour_to_detect_and_segment(detect_matcher: QueryMatcher, word: str,
                                                               colour: str) -> None:
    part = detect_matcher.parse(f"{word} circle").parts[0]
    assert (part.classes, part.colours) == ({"circle"}, {colour})
    target = parse_target(f"the {word} circle")
    assert (target.colours, target.noun) == ({colour}, "circle")


def test_crimson_circle_is_the_red_circle_to_both(detect_matcher: QueryMatcher) -> None:
    for text in ("crimson circle", "the crimson circle"):
        d_red, d_crimson = detect_matcher.parse(text.replace("crimson", "red")), detect_matcher.parse(text)
        assert (d_crimson.parts[0].classes, d_crimson.parts[0].colours) == (d_red.parts[0].classes,
                                                                            d_red.parts[0].colours)
        s_red, s_crimson = parse_target(text.replace("crimson", "red")), parse_target(text)
        assert (s_crimson.colours, s_crimson.noun, s_crimson.what) == (s_red.colours, s_red.noun, "red circle")


@pytest.mark.parametrize(("text", "noun", "cls"), [
    ("the red circles", "circle", "circle"), ("boxes", "box", "square"), ("the crimson ball", "ball", "circle"),
    ("the largest cubes", "cube", "square"), ("the round thing", "round thing", "circle"),
])
def test_plurals_and_class_synonyms(detect_matcher: QueryMatcher, text: str, noun: str, cls: str) -> None:
    assert detect_matcher.parse(text).parts[0].classes == {cls}
    target = parse_target(text)
    assert target.noun == noun and target.how == "open"  # segment resolves the words against what it sees
    assert detect_matcher.lookup(target.noun) == cls


@pytest.mark.parametrize("word", sorted(PICKS))
def test_picks_mean_the_same_to_both(detect_matcher: QueryMatcher, word: str) -> None:
    pick = PICKS[word]
    assert detect_matcher.parse(f"the {word} square").parts[0].pick == pick
    target = parse_target(f"the {word} square")
    assert (target.pick, target.superlative, target.noun) == (pick, PICK_ORDER[pick], "square")


@pytest.mark.parametrize(("text", "superlative"), [
    ("the largest red square", ("area", "max")), ("the smallest star", ("area", "min")),
    ("the triangle on the left", ("x", "min")), ("the rightmost shape", ("x", "max")),
    ("the circle at the top", ("y", "min")), ("the uppermost hexagon", ("y", "min")),
    ("the bottommost star", ("y", "max")), ("the biggest one", ("area", "max")),
])
def test_superlatives_and_positions(text: str, superlative: tuple[str, str]) -> None:
    assert parse_target(text).superlative == superlative


@pytest.mark.parametrize("text", ["the red shape", "the red one", "red objects", "everything red"])
def test_generic_nouns_name_no_class(detect_matcher: QueryMatcher, text: str) -> None:
    part = detect_matcher.parse(text).parts[0]
    assert (part.classes, part.colours, part.how) == (None, {"red"}, "any")
    target = parse_target(text)
    assert (target.noun, target.colours, target.what) == (None, {"red"}, "red object")


def test_request_words_are_filler_for_both(detect_matcher: QueryMatcher) -> None:
    for text in ("segment the blue square", "cut out the blue square", "find the two blue squares"):
        assert detect_matcher.parse(text).parts[0].classes == {"square"}
        assert (parse_target(text).noun, parse_target(text).colours) == ("square", {"blue"})


def test_an_unknown_noun_is_unmatched_with_classes_and_open_without(detect_matcher: QueryMatcher) -> None:
    assert detect_matcher.parse("the banana").unmatched == ["banana"]
    part = parse_query("the yellow banana").parts[0]
    assert (part.noun, part.colours, part.how, part.classes) == ("banana", {"yellow"}, "open", None)


def test_class_names_come_before_colour_words() -> None:
    # COCO has a class called "orange": standing alone as the noun it is the fruit, not a colour
    coco = QueryMatcher(["orange", "car"])
    assert coco.parse("oranges").parts[0].classes == {"orange"}
    assert coco.parse("red cars").parts[0].colours == {"red"}
    assert parse_target("the orange").colours == {"orange"}  # without classes it is the colour


def test_colour_words_name_palette_colours() -> None:
    from experts.colour import GREYS, HUES

    assert set(COLOUR_WORDS.values()) == set(HUES) | set(GREYS)


def test_pick_one_measures_what_the_caller_says() -> None:
    items = [(10, 5), (30, 50), (10, 20)]  # (centre x, area)
    kw = {"centre": lambda it: (it[0], 0.0), "area": lambda it: it[1]}
    assert pick_one(items, "left", **kw) == (10, 5)  # the first of equals
    assert pick_one(items, "right", **kw) == (30, 50)
    assert pick_one(items, "smallest", **kw) == (10, 5)
    assert pick_one(items, "largest", **kw) == (30, 50)
