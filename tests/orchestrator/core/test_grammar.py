"""Grammar-constrained decoding: whatever the model prefers, the reply parses and validates."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from experts.crop import CropExpert
from orchestrator.commands import parse, validate
from orchestrator.core.grammar import CommandGrammar, GrammarLogitsProcessor
from switchboard.expert import BoxesRef, Example, Expert, ExpertResult, ImageRef, MaskRef
from switchboard.registry import Registry

IMG = "image-" + "a" * 24
IMG2 = "image-" + "b" * 24
MASK = "mask-" + "c" * 24


class FindArgs(BaseModel):
    image: ImageRef
    query: str
    confidence: float = Field(default=0.25, ge=0, le=1)


class PaintArgs(BaseModel):
    image: ImageRef
    mask: MaskRef
    instruction: str
    boxes: BoxesRef | None = None
    multimask: bool = False


def _expert(name_: str, args_: type[BaseModel], example: dict) -> type[Expert]:
    return type(f"G_{name_}", (Expert,), {"name": name_, "description": name_, "Args": args_,
                                          "Result": ExpertResult, "examples": [Example(request="x", args=example)]})


@pytest.fixture(scope="module")
def reg() -> Registry:
    r = Registry()
    r.register(_expert("find", FindArgs, {"image": "{image}", "query": "{object}"}), "t")
    r.register(_expert("paint", PaintArgs, {"image": "{image}", "mask": MASK, "instruction": "x"}), "t")
    r.register(CropExpert, "switchboard")
    return r


@pytest.fixture(scope="module")
def grammar(reg) -> CommandGrammar:
    return CommandGrammar.from_registry(reg, {IMG: "image", IMG2: "image", MASK: "mask"})


@pytest.mark.parametrize("text", [
    "Just chatting, no tools.",
    f'Sure.\n<call id="c1" expert="find" image="{IMG}" query="red circle"/>',
    f'<call id="c1" expert="find" image="{IMG}" query="x" confidence="0.5"/>'
    f'<call id="c2" expert="paint" image="{IMG2}" mask="{MASK}" instruction="make it blue" multimask="false"/>',
    f'<call id="c1" expert="find" image="{IMG}" query="x"/><call id="c2" expert="crop" image="$c1" region="[0,0,500,500]"/>',
])
def test_accepts_valid_replies(grammar, text) -> None:
    assert grammar.complete(text)


@pytest.mark.parametrize("text, why", [
    ('<call id="c1" expert="fly"', "unknown expert"),
    (f'<call id="c1" expert="find" image="{IMG}" colour="red"', "unknown argument"),
    (f'<call id="c1" expert="find" image="{IMG}"/>', "missing required argument"),
    (f'<call id="c1" expert="find" image="{IMG}" image="{IMG}"', "argument twice"),
    ('<call id="c1" expert="find" image="image-' + "f" * 24, "artifact not in the conversation"),
    (f'<call id="c1" expert="paint" image="{IMG}" mask="{IMG}"', "image where a mask is needed"),
    ('<call id="c1" expert="find" image="$c1"', "reference to itself"),
    ('<call id="c1" expert="find" image="$c2"', "reference to a later call"),
    (f'<call id="c1" expert="find" image="{IMG}" query="x" confidence="high"', "number expected"),
    (f'<call id="c1" expert="find" image="{IMG}" query="x" confidence="0.5.', "not a number"),
    (f'<call id="c1" expert="crop" image="{IMG}" region="[0,0]]', "unbalanced list"),
    (f'<call id="c1" expert="find" image="{IMG}" query="a"b"', "quote inside a value"),
    (f'<call id="c1" expert="find" image="{IMG}" query="x"/><call id="c1"', "duplicate id"),
    ("<cal>", "broken tag"),
    ("<div>", "other tags"),
])
def test_refuses_malformed(grammar, text, why) -> None:
    assert not grammar.viable(text), why


def test_incomplete_tag_is_viable_but_not_complete(grammar) -> None:
    text = f'<call id="c1" expert="find" image="{IMG}" que'
    assert grammar.viable(text) and not grammar.complete(text)


def test_no_calls_mode(reg) -> None:
    g = CommandGrammar.from_registry(reg, {IMG: "image"}, allow_calls=False)
    assert g.complete("The answer is 3 circles.")
    assert not g.viable("<call")


class CharTokenizer:
    """A tiny tokenizer: single characters plus a few multi-character pieces, and an end token."""

    def __init__(self, extra: list[str]) -> None:
        chars = [chr(c) for c in range(32, 127)]
        self.vocab = ["<eos>", *chars, *extra]
        self.eos_token_id = 0
        self.unk_token_id = None

    def __len__(self) -> int:
        return len(self.vocab)

    def decode(self, ids: list[int]) -> str:
        return "".join("" if i == 0 else self.vocab[i] for i in ids)

    def convert_tokens_to_ids(self, tok: str) -> int:
        return -1


def test_random_preferences_always_give_valid_commands(reg, grammar) -> None:
    """Drive the processor with random scores (a model that wants to write garbage): every reply it
    lets through parses and validates without a single error."""
    import torch

    extra = ['<call id="', '" expert="', 'find', 'paint', 'crop', '" image="', IMG, MASK, "$c1", "/>", '"/>',
             " query=", " mask=", " region=", '"', "[0,0,500,500]", " confidence=", "0.5", " instruction="]
    tok = CharTokenizer(extra)
    gen = torch.Generator().manual_seed(0)
    bias = torch.tensor([5.0 if i >= 96 else 0.0 for i in range(len(tok))])
    n_calls = 0
    for trial in range(40):
        proc = GrammarLogitsProcessor(grammar, tok, prompt_length=0)
        ids: list[int] = []
        for _ in range(3000):
            scores = (torch.rand(len(tok), generator=gen) + bias).unsqueeze(0)
            scores[0, 0] = -1.0 if len(ids) < 150 else 10.0  # end when the grammar allows it, after 150
            out = proc(torch.tensor([ids], dtype=torch.long), scores)
            nxt = int(torch.argmax(out[0]))
            if nxt == 0:
                break
            ids.append(nxt)
        text = tok.decode(ids)
        p = parse(text)
        v = validate(p, reg)
        # the grammar guarantees form, experts, argument names, artifacts and value shapes; ranges,
        # lengths and rules across arguments (crop: "region or boxes") are the validator's
        assert not p.errors, (trial, text, p.errors)
        assert {e.code for e in v.errors} <= {"bad_value"}, (trial, text, v.errors)
        n_calls += len(v.calls)
    assert n_calls >= 20, "the walk should produce many calls"


def test_a_route_allows_exactly_its_calls_in_order(reg) -> None:
    """With the router's plan the reply is those calls, in that order, and nothing else."""
    g = CommandGrammar.from_registry(reg, {IMG: "image", MASK: "mask"}, route=("find", "crop"))
    two = f'<call id="c1" expert="find" image="{IMG}" query="dog"/>\n<call id="c2" expert="crop" image="{IMG}" boxes="$c1"/>'
    assert g.complete(two)
    assert not g.complete(two.split("\n")[0])  # the second routed call is missing
    assert not g.viable('<call id="c1" expert="crop"')  # another expert first
    assert not g.viable("Sure, here it is")  # no free text instead of the calls
    assert not g.viable(two + '\n<call id="c3"')  # no call beyond the route
    assert not g.viable(two + " and done")
    assert g.complete(two + "\n")
    # without a route the same grammar takes any order and free text
    free = CommandGrammar.from_registry(reg, {IMG: "image", MASK: "mask"})
    assert free.complete(f'Cropping. <call id="c1" expert="crop" image="{IMG}" region="[0,0,500,500]"/>')


def test_forced_continuations_jump_forward(reg) -> None:
    """What the grammar leaves no choice about is forced: a routed call's syntax and expert name, the
    only candidate artifact, the rest of a unique argument name; free choices are never forced."""
    g = CommandGrammar.from_registry(reg, {IMG: "image"}, route=("find",), canonical=True)
    s = g.start()
    assert g.forced(s) == '<call id="c1" expert="find" '  # find has required arguments: no "/>" yet
    g.feed(s, '<call id="c1" expert="find" i')
    assert g.forced(s) == f'mage="{IMG}" '  # the only image of the conversation, then query is still due
    g.feed(s, f'mage="{IMG}" ')
    assert g.forced(s) == ""  # query or confidence: the model chooses
    g.feed(s, "q")
    assert g.forced(s) == 'uery="'
    g.feed(s, 'uery="red"')
    assert g.forced(s) == ""  # " confidence=…" or "/>"
    g.feed(s, "/")
    assert g.forced(s) == ">"
    g.feed(s, ">")
    assert g.can_end(s) and g.forced(s) == ""
    # two images: the value is the model's choice; free text is never forced
    two = CommandGrammar.from_registry(reg, {IMG: "image", IMG2: "image"}, canonical=True)
    t = two.start()
    assert two.forced(t) == ""
    two.feed(t, '<')
    assert two.forced(t) == 'call id="c1" expert="'
    two.feed(t, 'call id="c1" expert="find" image="')
    assert two.forced(t) == "image-"


def test_forced_text_is_always_viable(reg) -> None:
    """Walking a reply and appending every forced continuation never leaves the grammar."""
    g = CommandGrammar.from_registry(reg, {IMG: "image", MASK: "mask"}, route=("find", "paint"), canonical=True)
    two = (f'<call id="c1" expert="find" image="{IMG}" query="dog"/>\n'
           f'<call id="c2" expert="paint" image="$c1" mask="{MASK}" instruction="blue"/>')
    s, text = g.start(), ""
    for _ in two:
        jump = g.forced(s)
        assert two.startswith(text + jump), (text, jump)
        if jump:
            assert g.feed(s, jump)
            text += jump
        if len(text) < len(two) and text == two[:len(text)]:
            assert g.feed(s, two[len(text)])
            text += two[len(text)]
    assert text == two and g.complete(two)


def test_canonical_form_fixes_call_ids_and_separators(reg) -> None:
    g = CommandGrammar.from_registry(reg, {IMG: "image", MASK: "mask"}, route=("find", "crop"), canonical=True)
    two = f'<call id="c1" expert="find" image="{IMG}" query="dog"/>\n<call id="c2" expert="crop" image="{IMG}" boxes="$c1"/>'
    assert g.complete(two)
    assert not g.viable('<call id="x1"')
    assert not g.viable(" <call")
    assert not g.viable(two.replace("\n", " "))
    free = CommandGrammar.from_registry(reg, {IMG: "image"}, canonical=True)
    assert free.complete(f'Sure. <call id="c1" expert="find" image="{IMG}" query="x"/>')
    assert not free.viable('<call id="c2"')


class StepsArgs(BaseModel):
    image: ImageRef
    steps: int = Field(default=20, ge=1, le=200)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    offset: int = Field(default=0, gt=-10, lt=10)
    count: int = 3  # unbounded


def test_bounded_integers_only_take_values_in_range() -> None:
    """A core once wrote steps="1239" for le=200: a digit is admitted only while an in-range integer
    still starts with what is written, so every tag can be finished and none is out of range."""
    r = Registry()
    r.register(_expert("gen", StepsArgs, {"image": "{image}"}), "t")
    g = CommandGrammar.from_registry(r, {IMG: "image"})
    head = f'<call id="c1" expert="gen" image="{IMG}" '
    for ok in ('steps="1"', 'steps="200"', 'steps="99"', 'seed="0"', 'seed="2147483647"', 'offset="-9"',
               'offset="9"', 'count="123456789"', 'count="-4"'):
        assert g.complete(head + ok + "/>"), ok
    for bad in ('steps="1239"', 'steps="201"', 'steps="0"', 'steps="-1"', 'steps="300"', 'seed="-1"',
                'seed="2147483648"', 'offset="-10"', 'offset="10"'):
        assert not g.complete(head + bad + "/>"), bad
    assert g.viable(head + 'steps="123') and not g.viable(head + 'steps="1239')  # refused at the digit
    assert g.viable(head + 'steps="30') and not g.viable(head + 'steps="300')
    assert not g.viable(head + 'steps="0') and not g.viable(head + 'steps="-')  # ge=1: no 0, no sign
    text = CommandGrammar.from_registry(r, {IMG: "image"}, route=("gen",), canonical=True).gbnf()
    assert 'v-integer-3 ::= ("0" | [1-9] ([0-9] [0-9]?)?)' in text  # steps: at most 3 digits, no sign
    assert 'v-integer-signed-1 ::= "-"? ("0" | [1-9])' in text  # offset: -9..9
    assert "v-integer ::=" in text  # count: unbounded


def test_exactly_one_of_is_in_the_grammar() -> None:
    """segment takes exactly one of boxes, points or target (``exactly_one`` in its schema): the automaton
    and the GBNF refuse a call with two or none, so "boxes=… target=…" cannot be written, and every call
    the grammar admits validates."""
    from experts.segment import SegmentExpert

    r = Registry()
    r.register(SegmentExpert, "switchboard")
    r.register(CropExpert, "switchboard")
    box = "boxes-" + "d" * 24
    g = CommandGrammar.from_registry(r, {IMG: "image", box: "boxes"}, canonical=True)
    two = f'<call id="c1" expert="segment" image="{IMG}" boxes="{box}" target="the red star"/>'
    none = f'<call id="c1" expert="segment" image="{IMG}" multimask="true"/>'
    assert not g.viable(two) and not g.complete(none)
    assert not g.complete(f'<call id="c1" expert="crop" image="{IMG}" region="[0,0,500,500]" boxes="{box}"/>')
    for one in (f'boxes="{box}"', 'points="[[500,500]]"', 'target="the red star"'):
        text = f'<call id="c1" expert="segment" image="{IMG}" {one}/>'
        assert g.complete(text), text
        assert not validate(parse(text), r, artifact_exists=lambda i: True).errors
    # labels go with points (``only_with``): offered after points only, in the automaton and the GBNF
    assert g.complete(f'<call id="c1" expert="segment" image="{IMG}" points="[[500,500]]" labels="[1]"/>')
    assert not g.viable(f'<call id="c1" expert="segment" image="{IMG}" boxes="{box}" labels=')
    assert not g.viable(f'<call id="c1" expert="segment" image="{IMG}" labels=')
    # after one of them, only the other arguments are offered
    s = g.start()
    assert g.feed(s, f'<call id="c1" expert="segment" image="{IMG}" boxes="{box}" ')
    assert not g.feed(s.copy(), "t") and not g.feed(s.copy(), "p") and g.feed(s.copy(), "m")
    # with no boxes artifact and points withheld, target is the only way left
    g2 = CommandGrammar.from_registry(r, {IMG: "image"}, canonical=True, withheld=frozenset({("segment", "points")}))
    assert g2.complete(f'<call id="c1" expert="segment" image="{IMG}" target="x"/>')
    assert not g2.viable(f'<call id="c1" expert="segment" image="{IMG}" points=')
    # the GBNF says the same: one alternation where the first of them is declared
    rule = next(line for line in g.gbnf().splitlines() if line.startswith("e") and "-segment-1 ::=" in line)
    assert '(" boxes=' in rule and '| " points=' in rule and '| " target=' in rule
    assert '(" target=\\"" (v-string) "\\"")?' not in rule
    assert '| " points=\\"" (v-json) "\\"" (" labels=' in rule  # labels only inside points' alternative


def test_refs_only_arguments_take_only_this_replys_calls() -> None:
    """``refs_only``: an earlier turn's boxes artifact is not offered (it may hold every object), the boxes
    of a call earlier in the same reply are."""
    from experts.detect import DetectExpert
    from experts.segment import SegmentExpert

    r = Registry()
    r.register(SegmentExpert, "switchboard")
    r.register(DetectExpert, "switchboard")
    box = "boxes-" + "d" * 24
    g = CommandGrammar.from_registry(r, {IMG: "image", box: "boxes"}, canonical=True,
                                     refs_only=frozenset({("segment", "boxes")}))
    assert not g.viable(f'<call id="c1" expert="segment" image="{IMG}" boxes="{box}"')
    assert g.complete(f'<call id="c1" expert="segment" image="{IMG}" target="the red star"/>')
    chain = (f'<call id="c1" expert="detect" image="{IMG}" query="red star"/>\n'
             f'<call id="c2" expert="segment" image="{IMG}" boxes="$c1"/>')
    assert g.complete(chain)
    assert box not in next(line for line in g.gbnf().splitlines() if "-segment-1 ::=" in line)
