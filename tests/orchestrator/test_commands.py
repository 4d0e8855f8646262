"""The command language: parse/format round trip (property), fuzzing, validation errors, tool_calls."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from orchestrator.commands import (
    Call,
    call_to_tool_call,
    escape,
    format_call,
    format_reply,
    parse,
    tool_call_to_call,
    unescape,
    validate,
)
from switchboard.expert import BoxesRef, Example, Expert, ExpertResult, ImageRef, MaskRef
from switchboard.registry import Registry

IMG = "image-" + "a" * 24
IMG2 = "image-" + "b" * 24
MASK = "mask-" + "c" * 24


class FindArgs(BaseModel):
    image: ImageRef
    query: str
    confidence: float = Field(default=0.25, ge=0, le=1)


class OutlineArgs(BaseModel):
    image: ImageRef
    boxes: BoxesRef | None = None
    points: list[list[int]] | None = None
    multimask: bool = False


class PaintArgs(BaseModel):
    image: ImageRef
    mask: MaskRef
    instruction: str


def _expert(name_: str, args_: type[BaseModel], example: dict) -> type[Expert]:
    return type(f"E_{name_}", (Expert,), {
        "name": name_, "description": f"{name_} things", "Args": args_, "Result": ExpertResult,
        "examples": [Example(request="do {object}", args=example)],
    })


@pytest.fixture(scope="module")
def reg() -> Registry:
    r = Registry()
    r.register(_expert("find", FindArgs, {"image": "{image}", "query": "{object}"}), "test")
    r.register(_expert("outline", OutlineArgs, {"image": "{image}"}), "test")
    r.register(_expert("paint", PaintArgs, {"image": "{image}", "mask": "mask-" + "0" * 24,
                                             "instruction": "{instruction}"}), "test")
    return r


# -- parsing ------------------------------------------------------------------------------------

def test_parse_text_and_calls() -> None:
    reply = (f'Looking now.\n<call id="c1" expert="find" image="{IMG}" query="red circle"/>\n'
             f'<call id="c2" expert="outline" image="{IMG}" boxes="$c1"/>\nDone.')
    p = parse(reply)
    assert not p.errors
    assert [c.id for c in p.calls] == ["c1", "c2"]
    assert p.calls[0].args == {"image": IMG, "query": "red circle"}
    assert p.calls[1].references() == {"boxes": "c1"}
    assert p.text == "Looking now.\n\nDone."
    assert format_reply(p) == reply


def test_parse_normalises_non_canonical_tags() -> None:
    p = parse(f"<call   expert='find' id='x1'  query='a &amp; b' image='{IMG}' />")
    assert not p.errors
    assert format_reply(p) == f'<call id="x1" expert="find" query="a &amp; b" image="{IMG}"/>'


def test_missing_id_gets_one() -> None:
    p = parse(f'<call expert="find" image="{IMG}" query="x"/><call id="c1" expert="find" image="{IMG}" query="y"/>')
    assert [c.id for c in p.calls] == ["c2", "c1"]


@pytest.mark.parametrize("bad, fragment", [
    ('<call id="c1" expert="find" query="x">', "malformed call tag"),
    ('<call id="c1" query="x"/>', "no expert attribute"),
    ('<call id="c1" expert="find" expert="x"/>', "repeated"),
    ('<call id="c1" expert="find" query=x/>', "malformed"),
])
def test_malformed_tags_are_errors_and_kept_as_text(bad: str, fragment: str) -> None:
    p = parse(f"before {bad} after")
    assert not p.calls
    assert p.errors and fragment in p.errors[0].message
    assert bad in p.text  # nothing is lost


def test_duplicate_ids() -> None:
    p = parse(f'<call id="c1" expert="find" image="{IMG}" query="a"/><call id="c1" expert="find" image="{IMG}" query="b"/>')
    assert len(p.calls) == 1
    assert p.errors[0].code == "duplicate_id"


def test_words_that_start_with_call_are_text() -> None:
    p = parse("<callback> and <caller/> are not commands")
    assert not p.calls and not p.errors


# -- property: format(parse(x)) == x for canonical replies -------------------------------------

_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda s: s not in ("id", "expert"))
_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
_prose = st.text(max_size=40).filter(lambda s: "<call" not in s)


@st.composite
def canonical_replies(draw) -> str:
    n = draw(st.integers(0, 4))
    ids = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True), min_size=n, max_size=n, unique=True))
    segments: list[str | Call] = []
    for cid in ids:
        segments.append(draw(_prose))
        args = draw(st.dictionaries(_names, _values, max_size=4))
        segments.append(Call(cid, draw(_names), args))
    segments.append(draw(_prose))
    return format_reply([s for s in segments if s != ""])


@given(canonical_replies())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_format_parse_roundtrip(reply: str) -> None:
    p = parse(reply)
    assert not p.errors
    assert format_reply(p) == reply


@given(st.text(max_size=40))
def test_escape_roundtrip(s: str) -> None:
    assert unescape(escape(s)) == s
    assert '"' not in escape(s) and "<" not in escape(s)


# -- fuzz: arbitrary text never raises -------------------------------------------------------------

_alphabet = st.sampled_from(list('<call id="c1" expert=find query/>$&;quot\'\n ') + ["<call ", "/>", '="', "&amp;"])
_tagsoup = st.lists(_alphabet, max_size=60).map("".join)


@given(st.one_of(st.text(max_size=200), _tagsoup, st.binary(max_size=50).map(lambda b: b.decode("latin-1"))))
@settings(max_examples=500)
def test_parse_and_validate_never_raise(text: str) -> None:
    p = parse(text)
    v = validate(p, _fuzz_registry)
    # every call either validated or produced an error naming it
    named = {e.call_id for e in v.errors}
    assert all(c.id in named or c.id in {vc.id for vc in v.calls} for c in p.calls)
    format_reply(p)


_fuzz_registry = Registry()
_fuzz_registry.register(_expert("find", FindArgs, {"image": "{image}", "query": "{object}"}), "test")


def test_parse_rejects_non_text() -> None:
    assert parse(None).errors[0].code == "syntax"  # type: ignore[arg-type]


# -- validation ------------------------------------------------------------------------------------

def _v(reg: Registry, text: str, **kw):
    return validate(parse(text), reg, **kw)


def test_valid_plan_with_reference(reg: Registry) -> None:
    v = _v(reg, f'<call id="c1" expert="find" image="{IMG}" query="dog" confidence="0.4"/>'
                f'<call id="c2" expert="outline" image="{IMG}" boxes="$c1" multimask="true"/>')
    assert not v.errors
    assert v.calls[0].args.confidence == 0.4
    assert v.calls[1].args.multimask is True
    assert v.calls[1].depends_on == {"boxes": "c1"}


@pytest.mark.parametrize("text, code, needle", [
    (f'<call id="c1" expert="fly" image="{IMG}"/>', "unknown_expert", "available: find, outline, paint"),
    (f'<call id="c1" expert="find" image="{IMG}" query="x" colour="red"/>', "unknown_argument", "'colour'"),
    (f'<call id="c1" expert="find" image="{IMG}"/>', "missing_argument", "'query'"),
    (f'<call id="c1" expert="find" image="{IMG}" query="x" confidence="high"/>', "bad_value", "confidence"),
    (f'<call id="c1" expert="find" image="{IMG}" query="x" confidence="7"/>', "bad_value", "confidence"),
    (f'<call id="c1" expert="outline" image="{IMG}" boxes="$c9"/>', "dangling_reference", "c9"),
    (f'<call id="c1" expert="find" image="{IMG}" query="$c1"/>', "bad_reference", "query"),
    ('<call id="c1" expert="find" image="../../etc/passwd" query="x"/>', "bad_value", "artifact id"),
    (f'<call id="c1" expert="paint" image="{IMG}" mask="{IMG2}" instruction="x"/>', "bad_value", "mask"),
])
def test_validation_errors_name_call_and_problem(reg: Registry, text: str, code: str, needle: str) -> None:
    v = _v(reg, text)
    assert not v.calls
    assert v.errors[0].code == code, v.errors
    assert v.errors[0].call_id == "c1"
    assert needle in v.errors[0].message


def test_cycle_and_dependents_are_errors(reg: Registry) -> None:
    v = _v(reg, f'<call id="a" expert="outline" image="$b"/><call id="b" expert="outline" image="$a"/>'
                f'<call id="c" expert="outline" image="$a"/><call id="d" expert="find" image="{IMG}" query="ok"/>')
    codes = {e.call_id: e.code for e in v.errors}
    assert codes == {"a": "cyclic_reference", "b": "cyclic_reference", "c": "invalid_dependency"}
    assert [c.id for c in v.calls] == ["d"]
    assert "a -> b -> a" in next(e.message for e in v.errors if e.call_id == "a")


def test_unknown_artifact_checked_against_store(reg: Registry) -> None:
    v = _v(reg, f'<call id="c1" expert="find" image="{IMG}" query="x"/>', artifact_exists=lambda i: False)
    assert v.errors[0].code == "unknown_artifact"


def test_too_many_calls(reg: Registry) -> None:
    text = "".join(f'<call id="c{i}" expert="find" image="{IMG}" query="x"/>' for i in range(5))
    v = _v(reg, text, max_calls=3)
    assert not v.calls and v.errors[0].code == "too_many_calls"


# -- tool calls ------------------------------------------------------------------------------------

def test_tool_call_roundtrip(reg: Registry) -> None:
    text = f'<call id="c1" expert="find" image="{IMG}" query="red &quot;ball&quot;" confidence="0.5"/>'
    v = _v(reg, text)
    tc = v.calls[0].to_tool_call()
    assert tc["type"] == "function" and tc["function"]["name"] == "find"
    assert json.loads(tc["function"]["arguments"]) == {"image": IMG, "query": 'red "ball"', "confidence": 0.5}
    back = tool_call_to_call(tc)
    assert format_call(back) == text
    assert call_to_tool_call(parse(text).calls[0], reg) == tc


def test_bad_tool_call_entry() -> None:
    with pytest.raises(ValueError, match="bad tool_calls entry"):
        tool_call_to_call({"function": {"name": "x", "arguments": "{not json"}})
    with pytest.raises(ValueError, match="JSON object"):
        tool_call_to_call({"function": {"name": "x", "arguments": "[1]"}})
