"""The command language: control commands inside free text.

Canonical surface (one self-closing tag per call, attributes in double quotes)::

    I'll find the red circle and outline it.
    <call id="c1" expert="detect" image="image-3f…" query="red circle"/>
    <call id="c2" expert="segment" image="image-3f…" boxes="$c1"/>

- ``id`` names the call within the reply; ``expert`` is a registered expert; every other attribute
  is an argument of that expert's ``Args``.
- ``$c1`` as an artifact argument means "the artifact of that kind which call c1 produced": it
  makes the reply a DAG (c2 runs after c1).
- Values are text; arguments whose type is not a string (numbers, lists, booleans) are written as
  compact JSON (``confidence="0.4"``, ``points="[[500,500]]"``). Coordinates are integers on a 0–1000
  scale of the image's width and height.
- In values, ``& " < >`` are written ``&amp; &quot; &lt; &gt;``.

``parse`` never raises: it returns the text, the calls and structured errors. For a reply in the
canonical format, ``format_reply(parse(x)) == x``. ``validate`` checks calls against the registry.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from switchboard.artifacts import ID_PATTERN, accepted_kinds
from switchboard.expert import artifact_fields

TAG_START = re.compile(r"<call(?=[\s/>])")
_ATTR = r"""[A-Za-z_][A-Za-z0-9_-]*\s*=\s*(?:"[^"<>]*"|'[^'<>]*')"""
TAG = re.compile(rf"<call((?:\s+{_ATTR})*)\s*/>")
ATTR = re.compile(r"""([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"([^"<>]*)"|'([^'<>]*)')""")
REF = re.compile(r"^\$([A-Za-z][A-Za-z0-9_]{0,31})$")
CALL_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_ESC = {"&": "&amp;", '"': "&quot;", "<": "&lt;", ">": "&gt;"}
_UNESC = re.compile(r"&(amp|quot|lt|gt|apos);")
_UNESC_MAP = {"amp": "&", "quot": '"', "lt": "<", "gt": ">", "apos": "'"}


def escape(value: str) -> str:
    return "".join(_ESC.get(ch, ch) for ch in value)


def unescape(value: str) -> str:
    return _UNESC.sub(lambda m: _UNESC_MAP[m.group(1)], value)


@dataclass
class Call:
    """One command as written: its id, expert, and argument values as text (in written order)."""

    id: str
    expert: str
    args: dict[str, str] = field(default_factory=dict)

    def references(self) -> dict[str, str]:
        """argument name -> referenced call id, for ``$id`` values."""
        out = {}
        for k, v in self.args.items():
            m = REF.match(v)
            if m:
                out[k] = m.group(1)
        return out


@dataclass
class CommandError:
    """A structured problem with a command: which call, which expert/argument, what is wrong."""

    code: str
    message: str
    call_id: str | None = None
    expert: str | None = None
    argument: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def __str__(self) -> str:
        where = f"call {self.call_id}" if self.call_id else "reply"
        return f"{where}: {self.message}"


@dataclass
class Parsed:
    """A parsed reply: the segments (text and calls, in order), the calls, and syntax errors."""

    segments: list[str | Call]
    errors: list[CommandError] = field(default_factory=list)

    @property
    def calls(self) -> list[Call]:
        return [s for s in self.segments if isinstance(s, Call)]

    @property
    def text(self) -> str:
        """The prose without the commands, whitespace around removed tags tidied."""
        parts = [s for s in self.segments if isinstance(s, str)]
        text = "".join(parts)
        return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", text)).strip()


def format_value(value: Any) -> str:
    """Text form of an argument value: strings as they are, everything else compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def format_call(call: Call) -> str:
    attrs = [f'id="{escape(call.id)}"', f'expert="{escape(call.expert)}"']
    attrs += [f'{k}="{escape(v)}"' for k, v in call.args.items()]
    return "<call " + " ".join(attrs) + "/>"


def format_reply(parsed: Parsed | Iterable[str | Call]) -> str:
    """Render segments back to text, calls in the canonical form."""
    segments = parsed.segments if isinstance(parsed, Parsed) else parsed
    return "".join(s if isinstance(s, str) else format_call(s) for s in segments)


def parse(text: str) -> Parsed:
    """Split a reply into text and calls. Never raises; malformed tags become errors and stay as text."""
    if not isinstance(text, str):
        return Parsed([], [CommandError("syntax", f"reply must be text, got {type(text).__name__}")])
    segments: list[str | Call] = []
    errors: list[CommandError] = []
    pos = 0
    buf: list[str] = []
    auto = 0
    seen_ids: set[str] = set()
    for start in TAG_START.finditer(text):
        s = start.start()
        if s < pos:
            continue
        m = TAG.match(text, s)
        if m is None:
            buf.append(text[pos:s])
            end = text.find(">", s)
            frag = text[s : end + 1 if end != -1 else min(len(text), s + 80)]
            errors.append(CommandError(
                "syntax",
                f"malformed call tag {frag[:80]!r}: expected <call id=\"…\" expert=\"…\" name=\"value\" …/>",
            ))
            buf.append(text[s : s + 5])
            pos = s + 5
            continue
        buf.append(text[pos:s])
        attrs: list[tuple[str, str]] = []
        for a in ATTR.finditer(m.group(1)):
            raw = a.group(2) if a.group(2) is not None else a.group(3)
            attrs.append((a.group(1), unescape(raw)))
        names = [k for k, _ in attrs]
        dup = sorted({k for k in names if names.count(k) > 1})
        d = dict(attrs)
        call_id = d.pop("id", None)
        expert = d.pop("expert", None)
        if dup or expert is None:
            problem = f"attribute(s) {dup} repeated" if dup else "it has no expert attribute"
            errors.append(CommandError("syntax", f"malformed call tag {m.group(0)[:80]!r}: {problem}",
                                       call_id=call_id))
            buf.append(m.group(0))
            pos = m.end()
            continue
        if call_id is None:
            auto += 1
            while f"c{auto}" in seen_ids or re.search(rf'id\s*=\s*["\']c{auto}["\']', text):
                auto += 1
            call_id = f"c{auto}"
        if not CALL_ID.match(call_id):
            errors.append(CommandError("syntax", f"call id {call_id[:40]!r} must be a letter then letters, "
                                       "digits or _ (at most 32)", call_id=call_id[:40], expert=expert))
            buf.append(m.group(0))
            pos = m.end()
            continue
        if call_id in seen_ids:
            errors.append(CommandError("duplicate_id", f"call id {call_id!r} is used twice", call_id=call_id,
                                       expert=expert))
            buf.append(m.group(0))
            pos = m.end()
            continue
        seen_ids.add(call_id)
        if buf:
            segments.append("".join(buf))
            buf = []
        segments.append(Call(call_id, expert, d))
        pos = m.end()
    buf.append(text[pos:])
    tail = "".join(buf)
    if tail:
        segments.append(tail)
    # merge adjacent strings (a malformed tag leaves text pieces)
    merged: list[str | Call] = []
    for seg in segments:
        if isinstance(seg, str) and merged and isinstance(merged[-1], str):
            merged[-1] = merged[-1] + seg
        elif seg != "":
            merged.append(seg)
    return Parsed(merged, errors)


# -- validation ------------------------------------------------------------------------------------



@dataclass
class ValidCall:
    """A call that passed validation: typed arguments (references kept as ``$id`` strings)."""

    id: str
    expert: str
    args: BaseModel
    raw: Call
    depends_on: dict[str, str] = field(default_factory=dict)  # argument -> call id

    def to_tool_call(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.expert, "arguments": json.dumps(self.args.model_dump(mode="json", exclude_unset=True))},
        }


@dataclass
class Validated:
    calls: list[ValidCall]
    errors: list[CommandError]


def _is_stringish(prop: dict[str, Any], defs: dict[str, Any]) -> bool:
    if "$ref" in prop:
        prop = defs.get(prop["$ref"].split("/")[-1], {})
    if prop.get("type") == "string":
        return True
    if "enum" in prop and all(isinstance(v, str) for v in prop["enum"]):
        return True
    alts = prop.get("anyOf") or prop.get("oneOf") or []
    return any(_is_stringish(a, defs) for a in alts if a.get("type") != "null")


@functools.cache
def _schema(args_model: type[BaseModel]) -> dict[str, Any]:
    return args_model.model_json_schema()


def convert_args(args_model: type[BaseModel], raw: dict[str, str]) -> dict[str, Any]:
    """Turn text values into JSON values for non-string arguments (``"0.4"`` -> 0.4)."""
    schema = _schema(args_model)
    props, defs = schema.get("properties", {}), schema.get("$defs", {})
    out: dict[str, Any] = {}
    for k, v in raw.items():
        prop = props.get(k)
        if prop is None or _is_stringish(prop, defs):
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, RecursionError):
            out[k] = v  # pydantic reports the type error
    return out


def _describe_validation_error(e: ValidationError) -> list[tuple[str | None, str, str]]:
    out = []
    for err in e.errors():
        loc = err.get("loc") or ()
        arg = str(loc[0]) if loc else None
        etype = err.get("type", "")
        if etype == "missing":
            out.append((arg, "missing_argument", f"missing argument {arg!r}"))
        elif etype == "extra_forbidden":
            out.append((arg, "unknown_argument", f"unknown argument {arg!r}"))
        elif not loc:  # a check across arguments (a model validator)
            out.append((None, "bad_value", f"invalid arguments: {err.get('msg')}"))
        else:
            where = ".".join(str(x) for x in loc)
            out.append((arg, "bad_value", f"bad value for {where!r}: {err.get('msg')}"))
    return out


def validate(parsed: Parsed | list[Call], registry: Any, *, artifact_exists: Any = None,
             max_calls: int | None = None) -> Validated:
    """Check calls against their experts' ``Args`` and the references between them.

    ``artifact_exists(id) -> kind | None`` (optional) checks literal artifact ids against a store.
    A call that depends on an invalid call is invalid too. Never raises.
    """
    calls = parsed.calls if isinstance(parsed, Parsed) else list(parsed)
    errors: list[CommandError] = list(parsed.errors) if isinstance(parsed, Parsed) else []
    if max_calls is not None and len(calls) > max_calls:
        errors.append(CommandError("too_many_calls", f"{len(calls)} calls in one reply; the limit is {max_calls}"))
        return Validated([], errors)
    ids = {c.id for c in calls}
    good: dict[str, ValidCall] = {}
    for call in calls:
        def err(code: str, msg: str, arg: str | None = None, _c: Call = call) -> None:
            errors.append(CommandError(code, f"{_c.expert}: {msg}", call_id=_c.id, expert=_c.expert, argument=arg))

        if call.expert not in registry:
            errors.append(CommandError(
                "unknown_expert",
                f"unknown expert {call.expert!r}; available: {', '.join(registry.names()) or '(none)'}",
                call_id=call.id, expert=call.expert))
            continue
        cls = registry.get_class(call.expert)
        kinds = artifact_fields(cls.Args)
        ok = True
        deps: dict[str, str] = {}
        for arg, value in call.args.items():
            m = REF.match(value)
            if m:
                if arg not in kinds:
                    err("bad_reference", f"argument {arg!r} cannot take a reference ({value}); only "
                        f"artifact arguments can ({', '.join(sorted(kinds)) or 'none'})", arg)
                    ok = False
                elif m.group(1) not in ids:
                    err("dangling_reference", f"argument {arg!r} refers to {value}, but no call has id "
                        f"{m.group(1)!r} in this reply", arg)
                    ok = False
                else:
                    deps[arg] = m.group(1)
            elif arg in kinds and value:
                am = ID_PATTERN.match(value)
                accepted = accepted_kinds(kinds[arg])
                if am is None:
                    err("bad_value", f"argument {arg!r} must be a {kinds[arg]} artifact id or a $<call id> "
                        f"reference, got {value[:60]!r}", arg)
                    ok = False
                elif am.group("kind") not in accepted:
                    err("bad_value", f"argument {arg!r} needs a {kinds[arg]} artifact, but {value} is a "
                        f"{am.group('kind')}", arg)
                    ok = False
                elif artifact_exists is not None and not artifact_exists(value):
                    err("unknown_artifact", f"argument {arg!r}: no artifact {value!r}", arg)
                    ok = False
        try:
            args = cls.Args.model_validate(convert_args(cls.Args, call.args))
        except ValidationError as e:
            for arg, code, msg in _describe_validation_error(e):
                if code == "unknown_argument":
                    msg += f" (arguments of {call.expert}: {', '.join(cls.Args.model_fields)})"
                err(code, msg, arg)
            ok = False
        if ok:
            good[call.id] = ValidCall(call.id, call.expert, args, call, deps)
    # cycles among valid calls, then calls that depend on invalid ones
    for cycle in _find_cycles({cid: set(vc.depends_on.values()) for cid, vc in good.items()}):
        for cid in cycle:
            vc = good.pop(cid, None)
            if vc is not None:
                errors.append(CommandError("cyclic_reference", f"{vc.expert}: references form a cycle: "
                                           + " -> ".join(cycle + [cycle[0]]), call_id=cid, expert=vc.expert))
    changed = True
    while changed:
        changed = False
        for cid, vc in list(good.items()):
            bad = [d for d in vc.depends_on.values() if d not in good]
            if bad:
                del good[cid]
                changed = True
                errors.append(CommandError("invalid_dependency", f"{vc.expert}: depends on {bad[0]}, which is invalid",
                                           call_id=cid, expert=vc.expert))
    order = [c.id for c in calls if c.id in good]
    return Validated([good[c] for c in order], errors)


def _find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan), each as a list of call ids."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


# -- OpenAI tool_calls ------------------------------------------------------------------------------

def call_to_tool_call(call: Call | ValidCall, registry: Any = None) -> dict[str, Any]:
    """An OpenAI ``tool_calls`` entry for a call (typed JSON arguments where the schema is known)."""
    if isinstance(call, ValidCall):
        return call.to_tool_call()
    args: dict[str, Any] = dict(call.args)
    if registry is not None and call.expert in registry:
        args = convert_args(registry.get_class(call.expert).Args, call.args)
    return {"id": call.id, "type": "function",
            "function": {"name": call.expert, "arguments": json.dumps(args, ensure_ascii=False)}}


def tool_call_to_call(entry: dict[str, Any]) -> Call:
    """The inverse of ``call_to_tool_call``. Raises ValueError with a clear message on a bad entry."""
    try:
        fn = entry["function"]
        name = fn["name"]
        raw = fn.get("arguments") or "{}"
        args = json.loads(raw) if isinstance(raw, str) else raw
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"bad tool_calls entry: {e}") from None
    if not isinstance(args, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return Call(str(entry.get("id") or "c1"), str(name), {str(k): format_value(v) for k, v in args.items()})
