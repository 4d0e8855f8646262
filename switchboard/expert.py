"""The expert contract.

An expert is a class with declarative attributes that are checked when the subclass is defined::

    class DetectExpert(Expert):
        name = "detect"
        description = "Find objects matching a text query; returns boxes and an overlay."
        Args = DetectArgs            # pydantic model: what a command may pass
        Result = DetectResult        # subclass of ExpertResult: what comes back (JSON-serialisable)
        examples = [Example(request="find the {object}", args={"image": "{image}", "query": "{object}"})]
        phrasings = compose(["find", "spot"], ["the {object}", "every {object}"])  # optional, train-only
        verbs = ["find", "locate", "spot", "look for"]  # optional: interchangeable leading verbs
        queue = "detect"             # optional; defaults to the name
        time_limit = 60.0            # optional; seconds per call

        def setup(self): ...         # load models: once per process, on first use
        def run(self, args, ctx): ...

Construction is cheap; ``setup()`` runs lazily on the first call, so importing the registry or
starting a Celery prefork parent never loads a model. Results carry artifact ids, never pixels.

``examples`` seed the core's training data and its held-out evaluation (every fourth one is held out
when there are four or more). ``phrasings`` are optional extra ways to ask for the call of
``examples[0]`` (its arguments, with the same slots), used for training only: a plugin composes many
of them from small vocabularies with ``compose`` so that the core learns its intent rather than a
dozen surfaces. A phrasing that contains a held-out example's request, or shares half its words
with one, is dropped.

The training-data generator (``training/core_data.py``) treats every expert alike, built-in or
plugin; besides ``examples`` and ``phrasings`` it reads these optional attributes:

- ``verbs``: interchangeable leading verbs of the expert's requests (``["find", "locate", …]``). A
  request that starts with one may have it swapped for another; split 3:1 like ``examples`` (every
  fourth is held out when there are four or more).
- ``train_verbs``: more such verbs for training only (``compose`` them); one that contains a
  held-out verb is dropped.
- ``named_values``: ``NamedValues`` — requests that name an argument's value in words ("crop to the
  top half" -> ``region=[0, 0, 1000, 500]``), for training only.
- ``simulate()``: a classmethod that makes up a plausible result of a call (summary, artifacts, and
  what a faithful final answer says) for the core's fusion turns; the default reports the arguments.
"""

from __future__ import annotations

import functools
import os
import re
import string
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol

from pydantic import BaseModel, Field, ValidationError

from switchboard.errors import ExpertDefinitionError
from switchboard.memory import get_budget

if TYPE_CHECKING:
    import random

    from PIL import Image

    from switchboard.artifacts import ArtifactMeta, ArtifactStore
    from switchboard.settings import Settings

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
ARTIFACT_KEY = "x-artifact"
# Slots that example templates may use; the training-data generator fills them.
EXAMPLE_SLOTS = {
    "image": "image-000000000000000000000000",
    "object": "red circle",
    "colour": "red",
    "shape": "circle",
    "prompt": "a red circle on a grey background",
    "text": "hello",
    "instruction": "make it blue",
}


def _artifact_ref(kind: str, description: str):
    return Annotated[
        str,
        Field(
            description=description,
            json_schema_extra={ARTIFACT_KEY: kind},
            min_length=1,
            max_length=64,
        ),
    ]


ImageRef = _artifact_ref("image", "An image artifact id, or $<call id> for the image another call made.")
BoxesRef = _artifact_ref("boxes", "A boxes artifact id, or $<call id> for the boxes another call found.")
MaskRef = _artifact_ref("mask", "A mask artifact id, or $<call id> for the mask another call made.")


def exactly_one(*fields: str) -> dict[str, Any]:
    """JSON-schema ``oneOf`` saying exactly one of ``fields`` is given, for an ``Args`` model's
    ``model_config = ConfigDict(json_schema_extra=exactly_one("boxes", "points", "target"))``.

    The model's own validator still enforces it; declaring it in the schema is what lets the command
    grammar (and a server's grammar) admit only calls that give exactly one, so a core cannot write
    ``boxes=… target=…`` in the first place. Several groups: ``{"allOf": [exactly_one(…), exactly_one(…)]}``
    is not supported; declare the one that matters."""
    return {"oneOf": [{"required": [f]} for f in fields]}


def only_with(field: str, *others: str) -> dict[str, Any]:
    """JSON-schema ``dependentRequired``: ``field`` is given only together with ``others`` (segment's
    ``labels`` go with ``points``). Merge it with ``exactly_one``'s dict in ``json_schema_extra``; the
    command grammar then offers ``field`` only once ``others`` are written."""
    return {"dependentRequired": {field: list(others)}}


def dependent_fields(args_model: type[BaseModel]) -> dict[str, tuple[str, ...]]:
    """``only_with``'s declarations: field -> the fields it needs."""
    deps = args_model.model_json_schema().get("dependentRequired") or {}
    return {str(k): tuple(str(x) for x in v) for k, v in deps.items() if isinstance(v, list)}


def exclusive_fields(args_model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of which exactly one is given (``exactly_one``), in declaration order; () if none."""
    schema = args_model.model_json_schema()
    groups = schema.get("oneOf") or []
    names = [g["required"][0] for g in groups if isinstance(g, dict) and len(g.get("required") or []) == 1]
    return tuple(n for n in schema.get("properties", {}) if n in names) if len(names) == len(groups) else ()


def artifact_fields(args_model: type[BaseModel]) -> dict[str, str]:
    """Map of argument name -> artifact kind, for arguments that hold artifact ids or references."""
    return dict(_artifact_fields(args_model))


@functools.cache
def _artifact_fields(args_model: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    schema = args_model.model_json_schema()
    out = []
    for fname, prop in schema.get("properties", {}).items():
        for alt in [prop, *prop.get("anyOf", []), *prop.get("oneOf", [])]:
            if ARTIFACT_KEY in alt:
                out.append((fname, str(alt[ARTIFACT_KEY])))
                break
    return tuple(out)


class OutputArtifact(BaseModel):
    """An artifact an expert made: its id, kind, and what it is (``role``: "overlay", "mask 1" …)."""

    id: str
    kind: str
    role: str = ""


class ExpertResult(BaseModel):
    """Base of every expert result: a one-line summary for the conversation plus artifacts."""

    summary: str
    artifacts: list[OutputArtifact] = []


class Example(BaseModel):
    """A request template and the arguments it should produce; the seed of the core's training data.

    Strings may contain ``{slot}`` placeholders (see EXAMPLE_SLOTS); ``{image}`` stands for the
    attached image's artifact id.
    """

    request: str
    args: dict[str, Any]

    def fill(self, **slots: str) -> tuple[str, dict[str, Any]]:
        values = {**EXAMPLE_SLOTS, **slots}

        def sub(v: Any) -> Any:
            return v.format(**values) if isinstance(v, str) else v

        return sub(self.request), {k: sub(v) for k, v in self.args.items()}


class NamedValues(BaseModel):
    """Train-only requests that name an argument's value in words, for the generator's breadth:
    ``requests`` are templates with ``{value}`` where the words go, ``values`` maps the words to the
    argument's value, and ``args`` are the call's other arguments (templates, as in an ``Example``)."""

    arg: str
    values: dict[str, Any]
    requests: list[str]
    args: dict[str, Any] = {}
    rate: float = Field(default=0.5, ge=0.0, le=1.0, description="Share of the expert's training calls.")

    def example(self, words: str, template: str) -> Example:
        """The example these words (a key of ``values``) make with one of the ``requests``."""
        return Example(request=template.replace("{value}", words), args={**self.args, self.arg: self.values[words]})


class SimulatedScene(Protocol):
    """What ``Expert.simulate`` may ask about the scene of a training conversation (its ground truth)."""

    def matches(self, query: str) -> list[int]:
        """Indices of the scene's objects that a query ("red circle", "the largest star") denotes."""
        ...

    def where(self, index: int) -> str:
        """Where an object is, in words ("top left", "centre")."""
        ...

    def plural(self, phrase: str, n: int) -> str:
        """``phrase`` for ``n`` things ("red circle" -> "red circles")."""
        ...


class Simulation(BaseModel):
    """A made-up outcome of a call, for training the core to report results faithfully: the tool
    turn's ``summary`` and ``artifacts`` ((kind, role) pairs; the generator gives them ids), the
    sentence a faithful final answer says about it, and the ``facts`` that answer must state."""

    summary: str
    artifacts: list[tuple[str, str]] = []
    answer: str
    facts: list[str] = []


ProgressFn = Callable[[float, str], None]
#: Runs another expert for a call: ``caller(expert, args)`` -> its result as JSON (``RunContext.call``).
CallerFn = Callable[[str, dict[str, Any]], dict[str, Any]]


class RunContext:
    """What an expert's ``run`` gets besides its arguments: the store, the call's identity, progress,
    and ``call`` to run another expert."""

    def __init__(self, store: ArtifactStore, *, call_id: str = "c0", conversation_id: str | None = None,
                 progress: ProgressFn | None = None, settings: Settings | None = None,
                 caller: CallerFn | None = None, registry: Any = None) -> None:
        from switchboard.settings import get_settings

        self.store = store
        self.call_id = call_id
        self.conversation_id = conversation_id
        self.settings = settings or get_settings()
        self._progress = progress
        self._caller = caller
        self._registry = registry

    def call(self, expert: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run another expert for this call (segment grounds a text target with detect); its result as JSON.

        It runs in this process, under this call's conversation, with its artifacts in this store tagged
        with this call's id: through the caller that whoever runs this call supplied
        (``orchestrator.dispatch.execute_call``), else through the ``registry`` this context was built
        with (an expert run directly, e.g. in a unit test or an evaluation). Either way ``args`` are
        validated against the expert's ``Args`` (``call_expert``), and errors propagate as raised
        (``UnknownExpert`` when it is not installed), for this call to report as its own.
        """
        if self._caller is not None:
            return self._caller(expert, args)
        if self._registry is None:
            raise RuntimeError(
                f"this call needs the {expert!r} expert, but its RunContext has neither a caller nor a registry; "
                "build it with RunContext(store, registry=switchboard.get_registry()) or run the call "
                "through a dispatcher")
        return call_expert(self._registry, expert, args, self.nested())

    def nested(self) -> RunContext:
        """The context of a call this call makes: the same store, call id, conversation, settings and
        caller, but no progress (the other expert's 0..1 is not this call's)."""
        return RunContext(self.store, call_id=self.call_id, conversation_id=self.conversation_id,
                          settings=self.settings, caller=self._caller, registry=self._registry)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1]; forwarded as a stage event (and by workers to the orchestrator)."""
        if self._progress is not None:
            self._progress(max(0.0, min(1.0, float(fraction))), message)

    def _tags(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "conversation_id": self.conversation_id}

    def open_image(self, artifact_id: str, mode: str = "RGB") -> Image.Image:
        return self.store.open_image(artifact_id, mode=mode)

    def read_json(self, artifact_id: str) -> Any:
        return self.store.read_json(artifact_id)

    def save_image(self, image: Image.Image, kind: str = "image", role: str = "") -> OutputArtifact:
        meta = self.store.put_image(image, kind=kind, **self._tags())
        return OutputArtifact(id=meta.id, kind=meta.kind, role=role or kind)

    def save_json(self, obj: Any, kind: str = "json", role: str = "") -> OutputArtifact:
        meta = self.store.put_json(obj, kind=kind, **self._tags())
        return OutputArtifact(id=meta.id, kind=meta.kind, role=role or kind)

    def save_text(self, text: str, role: str = "text") -> OutputArtifact:
        meta: ArtifactMeta = self.store.put_text(text, **self._tags())
        return OutputArtifact(id=meta.id, kind=meta.kind, role=role)


def call_expert(registry: Any, expert: str, args: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Run the registry's instance of ``expert`` on ``args`` (validated against its ``Args``) with ``ctx``
    and return the result as JSON. Errors propagate; the caller decides how to report them."""
    inst = registry.instance(expert)
    typed = inst.Args.model_validate(args)
    return inst(typed, ctx).model_dump(mode="json")


def compose(*vocab: Sequence[str]) -> list[str]:
    """Every combination of one item per vocabulary, joined by spaces, deduplicated in order:
    ``compose(["read", "transcribe"], ["the text", "the sign"])`` gives four requests."""
    out = [""]
    for words in vocab:
        out = [f"{a} {b}".strip() for a in out for b in words]
    seen: dict[str, None] = {}
    for s in out:
        seen.setdefault(" ".join(s.split()), None)
    return list(seen)


def map_on_threads(fn: Callable[[Any], Any], items: Sequence[Any], *, name: str = "expert-batch") -> list[Any]:
    """``[fn(x) for x in items]`` on up to one thread per CPU, in order: for a batch's per-call work
    that releases the GIL (PNG decoding and encoding, numpy). One item or one CPU: the calling thread."""
    import concurrent.futures as cf

    threads = min(len(items), os.cpu_count() or 1)
    if threads <= 1:
        return [fn(x) for x in items]
    with cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name) as pool:
        return list(pool.map(fn, items))


class Expert:
    """Base class of every expert. Subclasses declare the class attributes below; see the module doc."""

    name: ClassVar[str]
    description: ClassVar[str]
    Args: ClassVar[type[BaseModel]]
    Result: ClassVar[type[ExpertResult]]
    examples: ClassVar[list[Example]] = []
    phrasings: ClassVar[list[str]] = []
    verbs: ClassVar[list[str]] = []
    train_verbs: ClassVar[list[str]] = []
    named_values: ClassVar[list[NamedValues]] = []
    queue: ClassVar[str | None] = None
    time_limit: ClassVar[float | None] = None
    abstract: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        where = f"{cls.__module__}.{cls.__qualname__}"

        def fail(msg: str) -> None:
            raise ExpertDefinitionError(f"expert class {where}: {msg}")

        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            fail(f"`name` must match {NAME_PATTERN.pattern} (lowercase, digits, _), got {name!r}")
        desc = getattr(cls, "description", None)
        if not isinstance(desc, str) or not desc.strip():
            fail("`description` must be a non-empty string (the core reads it)")
        args = getattr(cls, "Args", None)
        if not (isinstance(args, type) and issubclass(args, BaseModel)):
            fail("`Args` must be a pydantic BaseModel subclass")
        if args.model_config.get("extra") != "forbid":
            # Unknown arguments must be an error, not silently dropped.
            args.model_config["extra"] = "forbid"
            args.model_rebuild(force=True)
        for fname in args.model_fields:
            if fname in ("id", "expert") or not NAME_PATTERN.match(fname):
                fail(f"argument name {fname!r} is reserved or not a plain lowercase identifier")
        result = getattr(cls, "Result", None)
        if not (isinstance(result, type) and issubclass(result, ExpertResult)):
            fail("`Result` must be a subclass of switchboard.expert.ExpertResult")
        queue = cls.queue
        if queue is not None and (not isinstance(queue, str) or not NAME_PATTERN.match(queue)):
            fail(f"`queue` must be a plain lowercase identifier, got {queue!r}")
        if cls.time_limit is not None and not (isinstance(cls.time_limit, int | float) and cls.time_limit > 0):
            fail(f"`time_limit` must be a positive number of seconds, got {cls.time_limit!r}")
        if not isinstance(cls.examples, list) or not all(isinstance(e, Example) for e in cls.examples):
            fail("`examples` must be a list of switchboard.expert.Example")
        for i, ex in enumerate(cls.examples):
            fields = {f for _, f, _, _ in string.Formatter().parse(ex.request) if f}
            unknown = fields - EXAMPLE_SLOTS.keys()
            if unknown:
                fail(f"example {i} uses unknown slot(s) {sorted(unknown)}; slots: {sorted(EXAMPLE_SLOTS)}")
            try:
                _, filled = ex.fill()
                args.model_validate(filled)
            except (ValidationError, KeyError, IndexError, ValueError) as e:
                fail(f"example {i} ({ex.request!r}) does not validate against Args: {e}")
        if not isinstance(cls.phrasings, list | tuple) or not all(isinstance(p, str) for p in cls.phrasings):
            fail("`phrasings` must be a list of request strings")
        if cls.phrasings and not cls.examples:
            fail("`phrasings` rephrase the call of examples[0]: declare at least one example")
        base_slots = {f for _, f, _, _ in string.Formatter().parse(cls.examples[0].request) if f} \
            if cls.examples else set()
        for p in cls.phrasings:
            fields = {f for _, f, _, _ in string.Formatter().parse(p) if f}
            if fields - EXAMPLE_SLOTS.keys():
                fail(f"phrasing {p!r} uses unknown slot(s) {sorted(fields - EXAMPLE_SLOTS.keys())}")
            if fields != base_slots:
                fail(f"phrasing {p!r} must use the slots of examples[0] ({sorted(base_slots)}), got {sorted(fields)}")
        for attr in ("verbs", "train_verbs"):
            verbs = getattr(cls, attr)
            if not isinstance(verbs, list | tuple) or not all(isinstance(v, str) and v.strip() for v in verbs):
                fail(f"`{attr}` must be a list of non-empty strings")
        if not isinstance(cls.named_values, list | tuple) or not all(isinstance(n, NamedValues)
                                                                    for n in cls.named_values):
            fail("`named_values` must be a list of switchboard.expert.NamedValues")
        for nv in cls.named_values:
            if nv.arg not in args.model_fields:
                fail(f"named_values: {nv.arg!r} is not an argument")
            if not nv.values or not nv.requests or not all("{value}" in r for r in nv.requests):
                fail(f"named_values for {nv.arg!r}: give values, and requests that contain {{value}}")
            for words in nv.values:
                try:
                    args.model_validate(nv.example(words, nv.requests[0]).fill()[1])
                except (ValidationError, KeyError, IndexError, ValueError) as e:
                    fail(f"named_values for {nv.arg!r}: {words!r} does not validate against Args: {e}")

    # -- instances --------------------------------------------------------------------------------
    def __init__(self) -> None:
        self._setup_done = False
        self._setup_lock = threading.Lock()

    @classmethod
    def simulate(cls, args: dict[str, str], scene: SimulatedScene, rng: random.Random) -> Simulation:
        """A plausible outcome of a call with ``args`` (a command's arguments, as text) on ``scene``,
        for the core's training data; draw every choice from ``rng``. Never runs a model.

        Experts override it to report what their results say (counts, sizes); this default reports
        the call's plain arguments, or a short made-up result, and sometimes a text artifact."""
        shown = ", ".join(f"{k}={v}" for k, v in args.items() if not str(v).startswith(("image-", "$")))
        summary = rng.choice([f"{cls.name} finished ({shown})" if shown else f"{cls.name} finished",
                              f"result: {rng.choice(['OK', 'SALE', 'open', '3 items', 'exit'])}"])
        artifacts = [("text", "text")] if rng.random() < 0.5 else []
        return Simulation(summary=summary, artifacts=artifacts, answer=f"The {cls.name} expert says: {summary}.")

    @classmethod
    def queue_name(cls) -> str:
        return cls.queue or cls.name

    @classmethod
    def args_schema(cls) -> dict[str, Any]:
        return cls.Args.model_json_schema()

    @property
    def is_setup(self) -> bool:
        return self._setup_done

    def ensure_setup(self) -> None:
        """Run ``setup()`` once per instance (thread-safe), within the process's memory budget.

        Every call passes here first, so it also marks the expert as used for the budget's LRU order
        (``switchboard.memory``).
        """
        budget = get_budget()
        if self._setup_done:
            budget.touch(self)
            return
        with self._setup_lock:
            if not self._setup_done:
                with budget.loading(self):
                    self.setup()
                    self._setup_done = True

    def setup(self) -> None:
        """Load models. Called once, lazily, before the first ``run``. Override in subclasses."""

    def teardown(self) -> None:
        """Release models (used by memory budgets). The next call runs ``setup()`` again.

        Subclasses release their models, then call ``super().teardown()``.
        """
        self._setup_done = False
        get_budget().forget(self)

    def run(self, args: Any, ctx: RunContext) -> ExpertResult:
        """Run one validated call. Override in subclasses."""
        raise NotImplementedError(f"expert {self.name} does not implement run()")

    def run_batch(self, items: Sequence[tuple[Any, RunContext]]) -> list[ExpertResult]:
        """Run several calls at once. The default runs them one by one; models override to batch."""
        return [self.run(args, ctx) for args, ctx in items]

    def __call__(self, args: Any, ctx: RunContext) -> ExpertResult:
        with get_budget().pinned(self):  # not unloaded by the memory budget while it runs
            self.ensure_setup()
            if not isinstance(args, self.Args):
                args = self.Args.model_validate(args)
            result = self.run(args, ctx)
        if not isinstance(result, self.Result):
            raise TypeError(f"expert {self.name}.run returned {type(result).__name__}, not {self.Result.__name__}")
        return result
