"""Grammar-constrained decoding of commands, derived from the registry.

``CommandGrammar`` is a character-level automaton over a reply: free text, and ``<call …/>`` tags in
the canonical form of prompts/commands.md. Inside a tag it allows only registered experts, their
argument names (each once, required ones before ``/>``), values that fit the argument's type, and,
for artifact arguments, only the artifact ids the conversation holds (of an accepted kind) or
``$id`` references to earlier calls of the same reply. A reply that ends in free text is complete.

What the grammar guarantees: well-formed tags, registered experts, their argument names (no
repeats, required ones present), artifact values the conversation holds, values of the right shape
(a number parses as a number, a list as JSON), and integers inside their schema's bounds (pydantic
``ge``/``le``: a digit is admitted only while some in-range integer still starts with what is
written, so the tag can always be finished; a core once wrote ``steps="1239"`` for ``le=200``).
Other rules about ranges (of floats), lengths or combinations of arguments stay with the validator,
which reports them as clear ``bad_value`` errors: refusing them while decoding could leave the model
with no way to finish the tag (a float has no last digit to stop at). The loop may also withhold
arguments for one turn (``withheld``): a core that cannot see the image gets no point prompt for a
request that names an object (``evidence.guessed_arguments``).

``GrammarLogitsProcessor`` applies it to a transformers model: at each step the best-scoring token
whose text keeps the reply viable wins; all other tokens are masked. Outside tags almost every token
is viable, so the cost there is one check per step.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from switchboard.artifacts import accepted_kinds
from switchboard.expert import artifact_fields, dependent_fields, exclusive_fields

ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
LETTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
NUMBER_CHARS = set("-+0123456789.eE")
JSON_LIST_CHARS = set("[]0123456789,-. ")
TEXT_FORBIDDEN = set('"<>')
#: Where the core's answer lists the experts it can use (its refusals and greetings: "I can use: crop,
#: detect, …."), the rest of the sentence is the registry's names, forced (``CommandGrammar.lists_experts``)
LISTING_CUES = ("I can use:", "I can use these experts:")
_CUE_CHARS = max(len(c) for c in LISTING_CUES)
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


def _json_prefix_ok(prefix: str) -> bool:
    """Whether a prefix of numbers, commas and brackets can still become valid JSON."""
    depth = 0
    for ch in prefix:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            return False
    for middle in ("", "0"):
        try:
            json.loads(prefix + middle + "]" * depth)
            return True
        except (json.JSONDecodeError, RecursionError):
            continue
    return False


@dataclass(frozen=True)
class ArgSpec:
    """How one argument's value is constrained."""

    name: str
    required: bool
    kind: str  # "artifact", "string", "number", "integer", "bool", "enum", "json"
    artifact_kind: str | None = None
    choices: tuple[str, ...] = ()
    #: an integer's inclusive bounds from the schema (None: unbounded on that side)
    minimum: int | None = None
    maximum: int | None = None


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    args: dict[str, ArgSpec]
    #: arguments of which exactly one is given (``switchboard.expert.exactly_one``: segment's boxes,
    #: points or target); () when the schema declares none
    exclusive: tuple[str, ...] = ()
    #: arguments given only together with others (``switchboard.expert.only_with``: labels with points)
    requires: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def open_args(self, used: Iterable[str]) -> list[str]:
        """The arguments still free after ``used``: not written yet, and not the alternatives of an
        exclusive argument already written."""
        used = set(used)
        taken = bool(used & set(self.exclusive))
        return [a for a in self.args if a not in used and not (taken and a in self.exclusive)
                and set(self.requires.get(a, ())) <= used]

    def closable(self, used: Iterable[str]) -> bool:
        """Whether a call with arguments ``used`` may end: every required one, and one exclusive one."""
        used = set(used)
        return self.required <= used and (not self.exclusive or bool(used & set(self.exclusive)))

    @property
    def required(self) -> frozenset[str]:
        return frozenset(a.name for a in self.args.values() if a.required)


def _arg_kind(prop: dict[str, Any], defs: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    if "$ref" in prop:
        prop = defs.get(prop["$ref"].split("/")[-1], {})
    alts = [a for a in (prop.get("anyOf") or prop.get("oneOf") or []) if a.get("type") != "null"]
    if alts and len(alts) == 1:
        return _arg_kind(alts[0], defs)
    if alts:
        kinds = {_arg_kind(a, defs)[0] for a in alts}
        return ("string" if "string" in kinds else "json"), ()
    if "enum" in prop:
        return "enum", tuple(json.dumps(v) if not isinstance(v, str) else v for v in prop["enum"])
    t = prop.get("type")
    return {"string": "string", "number": "number", "integer": "integer", "boolean": "bool"}.get(t, "json"), ()


def _int_bounds(prop: dict[str, Any], defs: dict[str, Any]) -> tuple[int | None, int | None]:
    """An integer property's inclusive bounds (``minimum``/``maximum``, or the exclusive ones made
    inclusive), looked up through ``$ref`` and an ``Optional``'s single alternative as ``_arg_kind`` does."""
    if "$ref" in prop:
        prop = defs.get(prop["$ref"].split("/")[-1], {})
    alts = [a for a in (prop.get("anyOf") or prop.get("oneOf") or []) if a.get("type") != "null"]
    if len(alts) == 1:
        return _int_bounds(alts[0], defs)
    lo, hi = prop.get("minimum"), prop.get("maximum")
    if prop.get("exclusiveMinimum") is not None:
        lo = math.floor(prop["exclusiveMinimum"]) + 1
    if prop.get("exclusiveMaximum") is not None:
        hi = math.ceil(prop["exclusiveMaximum"]) - 1
    return (math.ceil(lo) if lo is not None else None), (math.floor(hi) if hi is not None else None)


def int_prefix_ok(prefix: str, lo: int | None, hi: int | None) -> bool:
    """Whether some integer in [lo, hi] (None: unbounded) is written starting with ``prefix`` (itself
    a prefix of an integer: ``-``, ``0``, ``12`` …, no leading zeros)."""
    if prefix == "":
        return lo is None or hi is None or lo <= hi
    if prefix == "-":  # some negative integer in range: -1, or hi itself when it is below -1
        top = -1 if hi is None else min(-1, hi)
        return lo is None or lo <= top
    if not INTEGER.fullmatch(prefix):
        return False
    negative, digits = prefix.startswith("-"), prefix.lstrip("-")
    v = int(digits)
    if v == 0:  # "0" (or "-0") takes no more digits
        return (lo is None or lo <= 0) and (hi is None or hi >= 0)
    for j in range(20):  # the completions with j more digits: one interval per j
        a, b = v * 10 ** j, v * 10 ** j + 10 ** j - 1
        if negative:
            a, b = -b, -a
        if (hi is None or a <= hi) and (lo is None or b >= lo):
            return True
        if (not negative and hi is not None and a > hi) or (negative and lo is not None and b < lo):
            return False
    return False


def specs_from_registry(registry: Any) -> dict[str, ExpertSpec]:
    """The grammar's view of the registry: each expert's arguments and how their values look."""
    return {name: _expert_spec(name, registry.get_class(name).Args) for name in registry.names()}


@functools.cache
def _expert_spec(name: str, args_model: type) -> ExpertSpec:
    """One expert's spec, read from its ``Args`` JSON schema once (pydantic builds a schema in ~1 ms, and
    every turn builds its grammar from the whole registry). Specs are shared: not to be changed."""
    schema = args_model.model_json_schema()
    props, defs = schema.get("properties", {}), schema.get("$defs", {})
    required = set(schema.get("required", []))
    arts = artifact_fields(args_model)
    args = {}
    for arg, prop in props.items():
        if arg in arts:
            args[arg] = ArgSpec(arg, arg in required, "artifact", arts[arg])
        else:
            kind, choices = _arg_kind(prop, defs)
            lo, hi = _int_bounds(prop, defs) if kind == "integer" else (None, None)
            args[arg] = ArgSpec(arg, arg in required, kind, None, choices, lo, hi)
    return ExpertSpec(name, args, exclusive_fields(args_model), dependent_fields(args_model))


# Automaton states
TEXT, LIT, ID, EXPERT, AFTER, NAME, VALUE, CLOSE = range(8)


@dataclass
class State:
    """Where the automaton is. Copied (cheaply) to try a candidate token."""

    mode: int = TEXT
    lit: str = ""  # the literal still expected (mode LIT)
    then: int = TEXT  # mode after the literal
    buf: str = ""  # the id / expert / name / value being written
    call_ids: tuple[str, ...] = ()
    expert: str | None = None
    used: tuple[str, ...] = ()
    arg: str | None = None
    calls: int = 0
    tail: str = ""  # the last characters of free text (mode TEXT), for LISTING_CUES

    def copy(self) -> State:
        s = State.__new__(State)
        s.__dict__.update(self.__dict__)
        return s


@dataclass
class CommandGrammar:
    """The language of valid replies for one registry and one conversation's artifacts."""

    experts: dict[str, ExpertSpec]
    artifacts: dict[str, str] = field(default_factory=dict)  # artifact id -> kind
    max_calls: int = 16
    allow_calls: bool = True
    #: When set, the reply is exactly these calls, in this order, and nothing else (the router's plan):
    #: the core writes only their ids and arguments.
    route: tuple[str, ...] | None = None
    #: The canonical form the core was trained on (training/core_data.py): call ids are c1, c2, … in
    #: reply order and, in a routed reply, the calls follow each other with exactly one newline and
    #: nothing else. It makes all of ``<call id="c1" expert="`` a forced continuation (jump-forward
    #: appends it without a forward pass); the free form stays the default for other callers.
    canonical: bool = False
    #: (expert, argument) pairs not admitted this turn: the loop withholds a point prompt from a core that
    #: cannot see the image when the request names an object (``evidence.guessed_arguments``)
    withheld: frozenset[tuple[str, str]] = frozenset()
    #: (expert, argument) pairs whose artifact value may only be a ``$`` reference to an earlier call of
    #: this reply, not an artifact of the conversation (``evidence.earlier_boxes_withheld``)
    refs_only: frozenset[tuple[str, str]] = frozenset()
    #: Free text that names the experts the core can use (after a cue of :data:`LISTING_CUES`) names
    #: exactly the registered ones: `` crop, detect, ….`` in the registry's order, as the core was trained
    #: to write them, is forced there. The list is the registry's now, with a plugin installed after the
    #: core was trained, and jump-forward writes it without forward passes.
    lists_experts: bool = True

    @classmethod
    def from_registry(cls, registry: Any, artifacts: dict[str, str] | None = None, **kw: Any) -> CommandGrammar:
        return cls(specs_from_registry(registry), dict(artifacts or {}), **kw)

    def start(self) -> State:
        return State()

    # -- the automaton ------------------------------------------------------------------------------
    def _values_for(self, spec: ArgSpec, state: State, expert: str | None = None) -> Iterable[str]:
        accepted = accepted_kinds(spec.artifact_kind or "")
        if (expert or state.expert or "", spec.name) not in self.refs_only:
            yield from (i for i, k in self.artifacts.items() if k in accepted)
        yield from ("$" + c for c in state.call_ids[:-1])  # earlier calls of this reply

    def _fillable(self, spec: ArgSpec, state: State, expert: str | None = None) -> bool:
        """Whether an argument can get any value at all (an artifact argument needs a candidate; a
        withheld one gets none)."""
        if (expert or state.expert or "", spec.name) in self.withheld:
            return False
        return spec.kind != "artifact" or next(iter(self._values_for(spec, state, expert)), None) is not None

    def _expert_ok(self, name: str, state: State) -> bool:
        spec = self.experts[name]
        return all(self._fillable(a, state, name) for a in spec.args.values() if a.required) and (
            not spec.exclusive or any(self._fillable(spec.args[a], state, name) for a in spec.exclusive))

    def _value_char_ok(self, spec: ArgSpec, state: State, ch: str) -> bool:
        new = state.buf + ch
        if spec.kind == "artifact":
            return any(v.startswith(new) for v in self._values_for(spec, state))
        if spec.kind == "enum":
            return any(c.startswith(new) for c in spec.choices)
        if spec.kind == "bool":
            return "true".startswith(new) or "false".startswith(new)
        if spec.kind == "number":
            return ch in NUMBER_CHARS and (bool(NUMBER.fullmatch(new)) or bool(NUMBER.fullmatch(new + "0")))
        if spec.kind == "integer":
            return (bool(INTEGER.fullmatch(new)) or new == "-") and int_prefix_ok(new, spec.minimum, spec.maximum)
        if spec.kind == "json":
            return ch in JSON_LIST_CHARS and _json_prefix_ok(new)
        return ch not in TEXT_FORBIDDEN

    def _value_complete(self, spec: ArgSpec, state: State, value: str) -> bool:
        if spec.kind == "artifact":
            return value in set(self._values_for(spec, state))
        if spec.kind == "enum":
            return value in spec.choices
        if spec.kind == "bool":
            return value in ("true", "false")
        if spec.kind == "number":
            return bool(NUMBER.fullmatch(value))
        if spec.kind == "integer":
            return bool(INTEGER.fullmatch(value)) and (spec.minimum is None or int(value) >= spec.minimum) and (
                spec.maximum is None or int(value) <= spec.maximum)
        if spec.kind == "json":
            try:
                json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                return False
        return True

    def feed(self, state: State, text: str) -> bool:
        """Advance ``state`` over ``text`` in place; False as soon as the reply stops being viable."""
        for ch in text:
            m = state.mode
            if m == TEXT and self.route is not None:
                if ch in " \n" and not self.canonical:
                    continue
                if ch != "<" or state.calls >= len(self.route):
                    return False
                self._open_call(state)
            elif m == TEXT:
                if ch == "<":
                    if not self.allow_calls or state.calls >= self.max_calls:
                        return False
                    self._open_call(state)
                    continue
                if not self.lists_experts:
                    continue
                state.tail = (state.tail + ch)[-_CUE_CHARS:]
                if ch == ":" and state.tail.endswith(LISTING_CUES):
                    state.mode, state.lit, state.then, state.tail = LIT, f" {', '.join(self.experts)}.", TEXT, ""
            elif m == LIT:
                if ch != state.lit[0]:
                    return False
                state.lit = state.lit[1:]
                if not state.lit:
                    state.mode = state.then
                    state.buf = ""
            elif m == ID:
                if ch == '"':
                    if not state.buf or state.buf in state.call_ids:
                        return False
                    state.call_ids = state.call_ids + (state.buf,)
                    state.mode, state.lit, state.then = LIT, ' expert="', EXPERT
                elif ch in ID_CHARS and (state.buf or ch in LETTERS) and len(state.buf) < 32:
                    state.buf += ch
                else:
                    return False
            elif m == EXPERT:
                if ch == '"':
                    if state.buf not in self._names(state) or not self._expert_ok(state.buf, state):
                        return False
                    state.expert, state.used, state.mode = state.buf, (), AFTER
                elif any(n.startswith(state.buf + ch) and self._expert_ok(n, state) for n in self._names(state)):
                    state.buf += ch
                else:
                    return False
            elif m == AFTER:
                spec = self.experts[state.expert or ""]
                if ch == " ":
                    if not [a for a in spec.open_args(state.used) if self._fillable(spec.args[a], state)]:
                        return False
                    state.mode, state.buf = NAME, ""
                elif ch == "/":
                    if not spec.closable(state.used):
                        return False
                    state.mode = CLOSE
                else:
                    return False
            elif m == CLOSE:
                if ch != ">":
                    return False
                state.mode, state.expert, state.used, state.calls = TEXT, None, (), state.calls + 1
                if self.canonical and self.route is not None and state.calls < len(self.route):
                    self._open_call(state, "\n<")  # the next routed call follows on the next line
            elif m == NAME:
                spec = self.experts[state.expert or ""]
                free = [a for a in spec.open_args(state.used) if self._fillable(spec.args[a], state)]
                if ch == "=":
                    if state.buf not in free:
                        return False
                    state.arg = state.buf
                    state.mode, state.lit, state.then = LIT, '"', VALUE
                elif any(a.startswith(state.buf + ch) for a in free):
                    state.buf += ch
                else:
                    return False
            elif m == VALUE:
                spec = self.experts[state.expert or ""].args[state.arg or ""]
                if ch == '"':
                    if not state.buf and spec.kind != "string":
                        return False
                    if not self._value_complete(spec, state, state.buf):
                        return False
                    state.used = state.used + (spec.name,)
                    state.mode, state.buf = AFTER, ""
                elif self._value_char_ok(spec, state, ch) and len(state.buf) < 400:
                    state.buf += ch
                else:
                    return False
        return True

    def _open_call(self, state: State, before: str = "") -> None:
        """Enter a tag: ``<`` was just read, or (``before``) the reply must still write it. In the canonical
        form the call id is fixed too."""
        state.buf = ""
        if self.canonical:
            cid = f"c{len(state.call_ids) + 1}"
            state.call_ids = state.call_ids + (cid,)
            state.mode, state.lit, state.then = LIT, before + f'call id="{cid}" expert="', EXPERT
        else:
            state.mode, state.lit, state.then = LIT, before + 'call id="', ID

    def _next_chars(self, state: State) -> Iterable[str] | None:
        """A superset of the characters that may come next, or None where the choice is open (free text,
        call ids, numbers, strings)."""
        m = state.mode
        if m == TEXT:
            return None if self.route is None else ("<",) if self.canonical else (" ", "\n", "<")
        if m == LIT:
            return (state.lit[0],)
        if m in (AFTER, CLOSE):
            return (" ", "/") if m == AFTER else (">",)
        n = len(state.buf)
        if m == EXPERT:
            words: Iterable[str] = self._names(state)
        elif m == NAME:
            words = self.experts[state.expert or ""].args
        elif m == VALUE:
            spec = self.experts[state.expert or ""].args[state.arg or ""]
            if spec.kind == "artifact":
                words = self._values_for(spec, state)
            elif spec.kind == "enum":
                words = spec.choices
            elif spec.kind == "bool":
                words = ("true", "false")
            else:
                return None
        else:
            return None
        end = "=" if m == NAME else '"'
        return {w[n] for w in words if len(w) > n and w.startswith(state.buf)} | {end}

    def forced(self, state: State, limit: int = 256) -> str:
        """The text every viable reply continues with from ``state`` (empty when there is a choice,
        including the choice to end): what jump-forward decoding appends without a forward pass.

        Character by character: where exactly one character is viable and the reply cannot end there,
        it is forced. That covers a tag's fixed syntax, the rest of an expert's or argument's name once
        its prefix is unique (a routed call's whole expert name), and an artifact value with a single
        candidate (the only image of the conversation).
        """
        out: list[str] = []
        s = state.copy()
        while len(out) < limit and not self.can_end(s):
            chars = self._next_chars(s)
            if chars is None:
                break
            ok = [c for c in chars if self.feed(s.copy(), c)]
            if len(ok) != 1:
                break
            self.feed(s, ok[0])
            out.append(ok[0])
        return "".join(out)

    def free_text(self, state: State, text: str) -> bool:
        """Whether ``text`` is free text here that keeps the reply viable, decided without feeding it (the
        common case of an answer: no tag can open, no listing cue can end in it); False: feed it to know."""
        return state.mode == TEXT and self.route is None and "<" not in text and not (
            self.lists_experts and ":" in text)

    def viable(self, text: str) -> bool:
        return self.feed(self.start(), text)

    def _names(self, state: State) -> Iterable[str]:
        """The experts the next call may name: any registered one, or the routed one."""
        if self.route is None:
            return self.experts
        return [n for n in self.route[state.calls:state.calls + 1] if n in self.experts]

    def serves_route(self) -> bool:
        """Whether the routed calls can begin here: the first routed expert exists and its required
        arguments can be filled (an image to read, say). No route: True."""
        return not self.route or self.viable(f'<call id="c1" expert="{self.route[0]}"')

    def can_end(self, state: State) -> bool:
        return state.mode == TEXT and (self.route is None or state.calls >= len(self.route))

    def complete(self, text: str) -> bool:
        s = self.start()
        return self.feed(s, text) and self.can_end(s)

    def gbnf(self) -> str:
        """This grammar as GBNF, for a server that constrains decoding itself (see :func:`gbnf`)."""
        return gbnf(self)


# -- GBNF: the same language for a server that constrains decoding itself ------------------------------
_GBNF_VALUES = {
    "string": '[^"<>]*',
    "number": '"-"? ("0" | [1-9] [0-9]*) ("." [0-9]+)? ([eE] [-+]? [0-9]+)?',
    "integer": '"-"? ("0" | [1-9] [0-9]*)',
    "bool": '"true" | "false"',
    "json": "j-value",
}
_GBNF_JSON = ('j-value ::= j-num | "[" " "? (j-value " "? ("," " "? j-value " "?)*)? "]"\n'
              'j-num ::= "-"? ("0" | [1-9] [0-9]*) ("." [0-9]+)?')


def _lit(text: str) -> str:
    """A GBNF string literal."""
    esc = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return '"' + "".join(esc.get(ch, ch) for ch in text) + '"'


def _rule(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", name).strip("-").lower() or "x"


def gbnf(grammar: CommandGrammar) -> str:
    """The replies of ``grammar`` as a GBNF grammar (llama.cpp's ``grammar``; vLLM's and xgrammar's EBNF
    read the same syntax), so a server that constrains decoding can keep a remote core's reply valid.

    It describes a subset of the automaton's language, in the canonical form: call ids are c1, c2 … in
    reply order, routed calls follow each other on their own lines, and each call's arguments come in
    the order its ``Args`` declares them (optional ones may be left out). Everything else is the
    automaton's: registered (or routed) experts only, each required argument present, artifact values
    from the conversation's artifacts of an accepted kind or ``$`` references to earlier calls, values
    of the right shape, no ``<`` in free text, and no call at all where calls are not allowed. String
    values have no length bound here (the automaton stops them at 400 characters; ``max_tokens``
    bounds them on a server). Raises ValueError when a routed call can have no valid form.
    """
    rules: dict[str, str] = {}
    names = {e: f"e{i}-{_rule(e)}" for i, e in enumerate(grammar.experts)}

    def value(expert: str, spec: ArgSpec, position: int) -> str | None:
        if spec.kind == "artifact":
            accepted = accepted_kinds(spec.artifact_kind or "")
            values = [i for i, k in grammar.artifacts.items()
                      if k in accepted and (expert, spec.name) not in grammar.refs_only]
            values += [f"$c{k}" for k in range(1, position)]
            return " | ".join(_lit(v) for v in values) or None
        if spec.kind == "enum":
            name = f"{names[expert]}-{_rule(spec.name)}"
            rules[name] = " | ".join(_lit(c) for c in spec.choices) or '""'
            return name
        if spec.kind == "integer" and (spec.minimum is not None or spec.maximum is not None):
            return bounded_integer(spec)
        name = f"v-{spec.kind}"
        rules[name] = _GBNF_VALUES[spec.kind]
        return name

    def bounded_integer(spec: ArgSpec) -> str:
        """A bounded integer as GBNF: no sign where the minimum is not negative, and no more digits than
        the bounds have (the exact range stays the automaton's and the validator's)."""
        lo, hi = spec.minimum, spec.maximum
        signed = lo is None or lo < 0
        width = None if hi is None or lo is None else max(len(str(abs(lo))), len(str(abs(hi))))
        more = "[0-9]*"
        if width is not None:
            more = ""
            for _ in range(width - 1):  # [1-9] then up to width-1 more digits
                more = f"([0-9] {more})?" if more else "[0-9]?"
        name = f"v-integer-{'signed-' if signed else ''}{width or 'any'}"
        rules[name] = ('"-"? ' if signed else "") + f'("0" | [1-9] {more})'.replace(" )", ")")
        return name

    def call(expert: str, position: int) -> str | None:
        """``expert``'s arguments as the ``position``-th call (None: its required ones cannot be filled)."""
        parts, one_of, member = [], [], {}
        exp = grammar.experts[expert]
        for spec in exp.args.values():
            v = None if (expert, spec.name) in grammar.withheld else value(expert, spec, position)
            if v is None:
                if spec.required:
                    return None
                continue
            arg = f"{_lit(' ' + spec.name + '=' + chr(34))} ({v}) {_lit(chr(34))}"
            if spec.name in exp.exclusive:  # exactly one of them, where the first of them is declared
                if not one_of:
                    parts.append("")
                    at = len(parts) - 1
                member[spec.name] = len(one_of)
                one_of.append(arg)
                continue
            needs = exp.requires.get(spec.name, ())
            if len(needs) == 1 and needs[0] in exp.exclusive:  # labels: only in the points alternative
                if needs[0] in member:
                    one_of[member[needs[0]]] += f" ({arg})?"
                continue
            parts.append(arg if spec.required else f"({arg})?")
        if exp.exclusive:
            if not one_of:
                return None
            parts[at] = f"({' | '.join(one_of)})"
        name = f"{names[expert]}-{position}"
        rules[name] = " ".join(parts) if parts else '""'
        return name

    def tag(position: int, experts: Iterable[str]) -> str | None:
        """The ``position``-th call naming one of ``experts`` (None: none of them can be called there)."""
        alts = []
        for e in experts:
            body = call(e, position) if e in grammar.experts else None
            if body is not None:
                alts.append(f"{_lit(e + chr(34))} {body}")
        if not alts:
            return None
        name = f"call-{position}"
        rules[name] = (f'{_lit(f"<call id={chr(34)}c{position}{chr(34)} expert={chr(34)}")} '
                       f'({" | ".join(alts)}) "/>"')
        return name

    if grammar.route:
        calls = [tag(k + 1, [e]) for k, e in enumerate(grammar.route)]
        if None in calls:
            k = calls.index(None)
            raise ValueError(f"the routed call c{k + 1} ({grammar.route[k]}) cannot be written here")
        root = ' "\\n" '.join(str(c) for c in calls)
    elif grammar.route is not None:  # routed to no call at all: the automaton admits only the empty reply
        root = '""'
    elif not grammar.allow_calls or grammar.max_calls < 1:
        root = "text"
    else:  # free text and up to max_calls calls; a position no expert can fill ends the chain
        tags = []
        for k in range(1, grammar.max_calls + 1):
            t = tag(k, grammar.experts)
            if t is None:
                break
            tags.append(t)
        for k, t in enumerate(tags, start=1):
            rules[f"tail-{k}"] = f"{t} text" + (f" tail-{k + 1}?" if k < len(tags) else "")
        root = "text tail-1?" if tags else "text"
    lines = [f"root ::= {root}"] + (["text ::= [^<]*"] if "text" in root else [])
    lines += [f"{name} ::= {body}" for name, body in sorted(rules.items())]
    if "v-json" in rules:
        lines.append(_GBNF_JSON)
    return "\n".join(lines) + "\n"


class GrammarLogitsProcessor:
    """A transformers LogitsProcessor that keeps generation inside a CommandGrammar.

    ``prompt_length`` None means "the length of the input at the first call" (the prompt).
    Greedy-friendly: per row it walks the candidates from the highest score down and keeps the
    first ``keep`` viable tokens (``keep=1`` for greedy decoding), masking everything else.
    """

    def __init__(self, grammar: CommandGrammar, tokenizer: Any, prompt_length: int | None = None, *, keep: int = 1,
                 max_candidates: int = 4096) -> None:
        self.grammar = grammar
        self.prompt_length = prompt_length
        self.keep = keep
        self.max_candidates = max_candidates
        self.eos_ids = set(_eos_ids(tokenizer))
        self.token_text = token_texts(tokenizer)
        self.states: list[State] = []
        self.seen: list[int] = []

    def _advance(self, row: int, ids: list[int]) -> None:
        if self.prompt_length is None:  # the first call sees exactly the prompt
            self.prompt_length = len(ids)
        while len(self.states) <= row:
            self.states.append(self.grammar.start())
            self.seen.append(0)
        new = ids[self.prompt_length + self.seen[row]:]
        for tid in new:
            if tid not in self.eos_ids:
                self.grammar.feed(self.states[row], self.token_text[tid])
        self.seen[row] += len(new)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for row in range(scores.shape[0]):
            self._advance(row, input_ids[row].tolist())
            state = self.states[row]
            order = torch.argsort(scores[row], descending=True)[: self.max_candidates].tolist()
            allowed: list[int] = []
            for tid in order:
                if tid in self.eos_ids:
                    ok = self.grammar.can_end(state)
                else:
                    text = self.token_text[tid]
                    ok = self.grammar.free_text(state, text) or self.grammar.feed(state.copy(), text)
                if ok:
                    allowed.append(tid)
                    if len(allowed) >= self.keep:
                        break
            if not allowed:  # nothing viable among the candidates: end the reply rather than break it
                allowed = sorted(self.eos_ids)[:1]
            mask = torch.full_like(scores[row], float("-inf"))
            idx = torch.tensor(allowed, device=scores.device)
            mask[idx] = scores[row][idx]
            scores[row] = mask
        return scores


_TOKEN_TEXT_CACHE: dict[int, list[str]] = {}


def token_texts(tokenizer: Any) -> list[str]:
    """Each token id's text (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _TOKEN_TEXT_CACHE:
        n = len(tokenizer)
        _TOKEN_TEXT_CACHE[key] = [tokenizer.decode([i]) for i in range(n)]
    return _TOKEN_TEXT_CACHE[key]


def _eos_ids(tokenizer: Any) -> list[int]:
    ids = set()
    for attr in ("eos_token_id",):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(v)
    for tok in ("<|im_end|>", "<|endoftext|>"):
        try:
            tid = tokenizer.convert_tokens_to_ids(tok)
        except Exception:
            continue
        if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
            ids.add(tid)
    return sorted(ids)


ARTIFACT_IN_TEXT = re.compile(r"\b(?:image|overlay|mask|boxes|text|json)-[0-9a-f]{24}\b")
