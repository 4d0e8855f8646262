"""The loop: plan → execute → fuse → answer, as a stream of typed events.

1. **plan** — the core reads the conversation (and its images) and writes a reply; decoding is
   constrained by the registry's grammar, so commands are well formed and address only artifacts
   this conversation holds. With a router (``orchestrator.core.router``), a new request is routed
   first: the router picks the expert sequence (or none) from the request's meaning, and the grammar
   then lets the core write exactly those calls (or only a plain answer); the core fills in the ids
   and arguments. Follow-ups in a conversation ("now remove it") are planned by the core alone. A
   question about an image the core cannot see ("how many circles are there?") is planned and
   answered from the detector's results instead (``evidence``: a visible detect call).
2. **execute** — the reply's calls are validated and run by the dispatcher (in-process or Celery);
   call events (queued, started, progress, done, failed) are forwarded as they happen.
3. **fuse** — a ``tool`` turn with one line per call (summary or error, artifact ids) is appended,
   and the core writes the final answer (no calls allowed in it), which is checked against the calls
   (``fusion``: a claim they do not support turns it into their own summaries). Its prompt begins with the plan
   pass's prompt and reply, so a core that offers ``new_prefix_cache()`` starts from the plan pass's
   keys and values and prefills only the tool turn (``reuse_prefix``; same answer, less latency).
4. **answer** — the reply with the answer, the calls (as OpenAI ``tool_calls``) and the artifacts.

A reply without calls is the answer itself. Artifacts made in a turn stay addressable by id in the
following turns ("now remove it").

Decoding: a core with ``decode`` (the shipped one) is decoded with jump-forward: what the grammar
leaves no choice about (a tag's syntax, a routed expert's name, the only image's id) is appended
without a forward pass, with the grammar in the canonical form the core was trained on (call ids c1,
c2 …). Prompts are bounded (``max_prompt_tokens``: history dropped oldest first, said in
``ChatResult.trimmed_messages``; a message that alone is too long is refused with
:class:`ContextLengthExceeded`); ``max_tokens`` caps the answer (``finish_reason="length"``); a turn
whose ``should_stop`` says so (a client gone) stops decoding and runs no calls (queued ones are taken
back by the dispatcher). A core that asks for them (``core.short_handles``) reads and writes short
handles (``img1``, ``mask2`` …, ``orchestrator.core.handles``) instead of artifact ids; the reply's
handles are mapped back to ids before it is parsed, so the conversation and the calls hold ids.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, Field

from orchestrator.commands import parse, validate
from orchestrator.core.arithmetic import checked_arithmetic
from orchestrator.core.evidence import EXPERT as EVIDENCE_EXPERT
from orchestrator.core.evidence import (
    ImageQuestion,
    earlier_boxes_withheld,
    evidence_answer,
    evidence_question,
    guessed_arguments,
    self_contained,
)
from orchestrator.core.format import tool_turn
from orchestrator.core.fusion import faithful_answer, unseen_answer
from orchestrator.core.grammar import CommandGrammar, GrammarLogitsProcessor
from orchestrator.core.handles import Handles
from orchestrator.core.sampling import Sampling
from orchestrator.dispatch import Dispatcher
from orchestrator.events import CallEvent, CallRecord, StageEvent, TextEvent, pump
from orchestrator.plan import Plan
from orchestrator.session import Conversation, ConversationStore
from switchboard.artifacts import ArtifactStore
from switchboard.errors import SwitchboardError

__all__ = ["Assistant", "CallEvent", "CallRecord", "ChatResult", "ContextLengthExceeded", "Event", "Sampling",
           "SamplingUnsupported", "StageEvent", "TextEvent", "TurnUsage"]


#: the router's probability of "no expert" above which a follow-up that points back is answered without
#: calls: "thanks!" 0.82, "what did you do?" 0.95, "ok" 0.92 — and "do it again" 0.77, "again please"
#: 0.59, left to the core (shipped router-2)
PLAIN_FOLLOW_UP = 0.8


class ContextLengthExceeded(SwitchboardError):
    """A message that alone does not fit the core's prompt limit (OpenAI's ``context_length_exceeded``)."""

    code = "context_length_exceeded"
    status = 400


class SamplingUnsupported(SwitchboardError):
    """Sampling asked of a core that only decodes greedily (one without ``decode``)."""

    code = "unsupported_parameter"
    status = 400

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class TurnUsage(BaseModel):
    """What the core did in one turn, over its passes (the plan, and the answer after calls)."""

    prompt_tokens: int = 0  #: prompt tokens of every pass (images as their vision tokens)
    cached_tokens: int = 0  #: of them, taken from the previous pass's KV cache instead of prefilled
    completion_tokens: int = 0  #: tokens the passes generated (text the grammar forced included)
    core_seconds: float = 0.0  #: time spent in the core's passes

    def add(self, prompt: int, completion: int, seconds: float, cached: int = 0) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cached_tokens += cached
        self.core_seconds += seconds


class ChatResult(BaseModel):
    """The end of a turn (its last event): the answer, the plan it came from, and how each call went."""

    conversation_id: str
    answer: str
    plan: str
    calls: list[CallRecord]  # one per call of the plan, in reply order (invalid ones included)
    errors: list[dict[str, Any]]
    artifacts: list[dict[str, Any]]  # id, kind, role, call_id
    #: the route the turn took: the router's expert sequence ([] = answer directly; None = no router or a
    #: follow-up), or ["detect"] for an image question answered from evidence (whatever the router said)
    route: list[str] | None = None
    # why the core's drafted answer was replaced by the calls' own summaries (empty: it was not)
    corrections: list[str] = Field(default_factory=list)
    #: "stop"; "length" when the answer reached ``max_tokens``; "cancelled" when the turn was stopped
    finish_reason: Literal["stop", "length", "cancelled"] = "stop"
    #: older messages left out of the core's prompt to fit ``max_prompt_tokens`` (0: none)
    trimmed_messages: int = 0
    #: tokens and time of the core's passes
    usage: TurnUsage = Field(default_factory=TurnUsage)


Event = StageEvent | TextEvent | CallEvent | ChatResult
#: generation budget per routed call (an artifact id alone is ~24 tokens)
TOKENS_PER_CALL = 80


class Assistant:
    """Runs conversations through a core, the registry's experts and a dispatcher."""

    def __init__(self, core: Any, registry: Any, store: ArtifactStore, dispatcher: Dispatcher,
                 conversations: ConversationStore, *, max_new_tokens: int = 160, history_messages: int = 8,
                 max_calls: int = 16, reuse_prefix: bool = True, router: Any = None,
                 cannot_see: Callable[[Any], bool] | None = None, jump_forward: bool = True,
                 max_prompt_tokens: int | None = 2048, short_handles: bool | None = None) -> None:
        self.core = core
        # the core reads and writes short handles (img1, mask2 …) instead of artifact ids; None: when the
        # core says it was made for them (``core.short_handles``, True for a CoreModel)
        self.short_handles = bool(getattr(core, "short_handles", False)) if short_handles is None else short_handles
        self.registry = registry
        self.store = store
        self.dispatcher = dispatcher
        self.conversations = conversations
        self.max_new_tokens = max_new_tokens
        self.history_messages = history_messages
        self.max_calls = max_calls
        self.reuse_prefix = reuse_prefix
        self.router = router
        # whether the core's own vision cannot read an image (the embedded core only knows the shapes
        # world); a plain answer that describes shapes in such an image is not given
        self.cannot_see = cannot_see
        self.jump_forward = jump_forward
        self.max_prompt_tokens = max_prompt_tokens
        self._turn = threading.local()  # per thread (concurrent turns share the assistant): .trimmed

    # -- pieces -----------------------------------------------------------------------------------
    def _prompt_messages(self, conv: Conversation) -> list[dict[str, Any]]:
        msgs = conv.messages[-self.history_messages:]
        while msgs and msgs[0]["role"] != "user":  # never start mid-turn
            msgs = msgs[1:]
        msgs = [{k: v for k, v in m.items() if k in ("role", "content", "images")} for m in msgs]
        kept = self._fit(msgs)
        self._turn.trimmed = max(self._trimmed, len(msgs) - len(kept))
        return kept

    def _fit(self, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The newest turns that fit ``max_prompt_tokens``: whole turns are dropped oldest first (the
        prompt always starts at a user message); the last user message alone must fit."""
        count = getattr(self.core, "count_tokens", None)
        if self.max_prompt_tokens is None or count is None:
            return msgs
        while count(msgs) > self.max_prompt_tokens:
            users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            if len(users) < 2:
                n = count(msgs)
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.max_prompt_tokens} tokens; the message needs "
                    f"{n} tokens. Please shorten the message.")
            msgs = msgs[users[1]:]
        return msgs

    @property
    def _trimmed(self) -> int:
        """Messages this thread's latest prompt left out (read by ``run``, per turn)."""
        return getattr(self._turn, "trimmed", 0)

    def read_window(self, messages: list[dict[str, Any]]) -> int:
        """How many of the newest ``messages`` (the last one the new user turn) the core would read:
        at most ``history_messages``, starting at a user message, within ``max_prompt_tokens``. The
        API imports only these from a request's history (their images are the only ones stored)."""
        msgs = messages[-self.history_messages:]
        while msgs and msgs[0]["role"] != "user":
            msgs = msgs[1:]
        return len(self._fit([{k: v for k, v in m.items() if k in ("role", "content", "images")} for m in msgs]))

    def check_message(self, message: str, images: list[str] | None = None) -> None:
        """Refuse, before the turn starts, a message that alone does not fit the prompt limit."""
        count = getattr(self.core, "count_tokens", None)
        if self.max_prompt_tokens is None or count is None:
            return
        self._fit([{"role": "user", "content": message, "images": list(images or [])}])

    def _images(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {i: self.store.open_image(i) for m in messages for i in (m.get("images") or [])}

    def _prefix_cache(self) -> Any:
        """A KV cache for the passes of one turn, when enabled and the core offers one."""
        make = getattr(self.core, "new_prefix_cache", None)
        return make() if self.reuse_prefix and make is not None else None

    def _route(self, conv: Conversation, message: str, images: list[str]) -> tuple[str, ...] | None:
        """The router's expert sequence for this message, or None when the core plans on its own.

        The router reads one request, so it is asked on a conversation's first turn, whenever a
        message brings an image (a new task), and for a follow-up that names its own object ("now remove
        the red star": ``evidence.self_contained``); follow-ups that point back ("now remove it") are left
        to the core, which reads the whole conversation — unless the router is sure they ask for no expert
        at all ("thanks!", "what did you find?": ``PLAIN_FOLLOW_UP``), which the core, given calls, planned as
        one. A route the conversation cannot serve (an expert that needs an image when there is none) is
        not imposed.
        """
        if self.router is None:
            return None
        first_turn = not any(m["role"] == "assistant" for m in conv.messages)
        has_image = any(kind == "image" for kind in conv.artifacts.values())
        router = self.router

        def ask() -> Any:
            return router.route(message, has_image=has_image, registry=self.registry)

        # the router's encoder runs on the core's compute thread where it has one, as the core's passes
        # do: the core's torch work stays on one thread (orchestrator.core.batching says why)
        run = getattr(self.core, "run", None)
        routed = run(ask) if run is not None else ask()
        route = routed.experts
        if not (first_turn or images or self_contained(message)):
            # a follow-up that points back ("now remove it") is read against the conversation
            plain = not route and routed.source == "head" and routed.score >= PLAIN_FOLLOW_UP
            return () if plain else None
        if route:
            if not CommandGrammar.from_registry(self.registry, conv.artifacts, route=tuple(route)).serves_route():
                return None
        return tuple(route)

    def _asked(self, conv: Conversation, message: str,
               route: tuple[str, ...] | None) -> tuple[ImageQuestion, str] | None:
        """An image question about the conversation's latest image that the core cannot see, and that
        image: answered from the detector's results (``evidence``), not by the core. None otherwise."""
        images = [i for i, kind in conv.artifacts.items() if kind == "image"]
        if self.cannot_see is None or not images:
            return None
        question = evidence_question(message, route, self.registry, getattr(self.router, "trained_experts", None))
        if question is None or not self.cannot_see(self.store.open_image(images[-1])):
            return None
        return question, images[-1]

    def _withheld(self, conv: Conversation) -> frozenset[tuple[str, str]]:
        """Arguments the core may not write in this plan: where it cannot see the conversation's latest
        image, a point prompt for a request that names an object (``evidence.guessed_arguments``)."""
        images = [i for i, kind in conv.artifacts.items() if kind == "image"]
        last = next((m for m in reversed(conv.messages) if m["role"] == "user"), None)
        if self.cannot_see is None or not images or last is None:
            return frozenset()
        withheld = guessed_arguments(str(last["content"]), self.registry)
        return withheld if withheld and self.cannot_see(self.store.open_image(images[-1])) else frozenset()

    def _refs_only(self, conv: Conversation) -> frozenset[tuple[str, str]]:
        """Arguments that may take boxes only from this reply's own calls: where the latest request names
        one object, not an earlier turn's boxes, which may hold every object (``evidence.earlier_boxes_withheld``)."""
        last = next((m for m in reversed(conv.messages) if m["role"] == "user"), None)
        return earlier_boxes_withheld(str(last["content"]), self.registry) if last is not None else frozenset()

    def _generate(self, conv: Conversation, *, allow_calls: bool, phase: Literal["plan", "answer"],
                  emit: Callable[[Event], None], prefix_cache: Any = None,
                  route: tuple[str, ...] | None = None, max_tokens: int | None = None,
                  should_stop: Callable[[], bool] | None = None, sampling: Sampling | None = None,
                  usage: TurnUsage | None = None) -> tuple[str, str]:
        """The core's reply and why it ended ("stop", "length", "cancelled"); its tokens and time are
        added to ``usage``."""
        messages = self._prompt_messages(conv)
        images, artifacts = self._images(messages), conv.artifacts
        handles = Handles.for_conversation(messages, artifacts) if self.short_handles else None
        if handles is not None:  # the core reads and writes img1, mask2 … (orchestrator.core.handles)
            messages, images, artifacts = handles.messages(messages), handles.images(images), handles.artifacts(artifacts)
        if route is not None and not route:
            allow_calls, route = False, None  # routed to a plain answer
        fast = self._decodes
        grammar = CommandGrammar.from_registry(self.registry, artifacts, allow_calls=allow_calls,
                                               max_calls=self.max_calls, route=route, canonical=fast,
                                               withheld=self._withheld(conv) if allow_calls else frozenset(),
                                               refs_only=self._refs_only(conv) if allow_calls else frozenset())
        extra = {"prefix_cache": prefix_cache} if prefix_cache is not None else {}
        # a routed chain must fit: each call copies an artifact id (~24 tokens) and its arguments
        budget = max(self.max_new_tokens, TOKENS_PER_CALL * len(route)) if route else self.max_new_tokens
        if max_tokens is not None:
            budget = min(budget, max_tokens)
        pieces = 0

        def on_text(t: str) -> None:
            nonlocal pieces
            pieces += 1
            emit(TextEvent(type=phase, text=t))

        flush: Callable[[], None] = lambda: None  # noqa: E731
        if handles is not None:
            on_text, flush = handles.stream(on_text)
        usage = usage if usage is not None else TurnUsage()
        started = time.perf_counter()
        if fast:
            if sampling is not None and sampling.changes_tokens:
                extra["sampling"] = sampling
            out = self.core.decode(messages, images, grammar=grammar, max_new_tokens=budget,
                                   on_text=on_text, should_stop=should_stop, **extra)
            flush()
            cached = (getattr(prefix_cache, "last", None) or {}).get("reused", 0) if prefix_cache is not None else 0
            usage.add(getattr(out, "prompt_tokens", 0), getattr(out, "tokens", 0), time.perf_counter() - started,
                      cached)
            return (handles.ids(out.text) if handles is not None else out.text), out.finish_reason
        processor = GrammarLogitsProcessor(grammar, self.core.tokenizer, prompt_length=None)
        text = self.core.generate(messages, images, max_new_tokens=budget,
                                  logits_processor=[processor], on_text=on_text, **extra)
        flush()
        text = handles.ids(text) if handles is not None else text
        count, encode = getattr(self.core, "count_tokens", None), getattr(self.core.tokenizer, "encode", None)
        completion = len(encode(text, add_special_tokens=False)) if encode is not None else pieces
        usage.add(count(messages) if count is not None else 0, completion, time.perf_counter() - started)
        return text, "stop"

    @property
    def _decodes(self) -> bool:
        """Whether the core is decoded through its ``decode`` (jump-forward; a remote core, which has no
        ``generate``, always) rather than transformers' ``generate`` with the grammar's logits processor."""
        return hasattr(self.core, "decode") and (self.jump_forward or not hasattr(self.core, "generate"))

    @property
    def samples(self) -> bool:
        """Whether the answer can be sampled (``Sampling``): only cores decoded by ``decode`` can."""
        return self._decodes

    def plan(self, conv: Conversation) -> str:
        """The core's reply for the conversation as it stands (not executed), routed as ``run`` would."""
        last = conv.messages[-1] if conv.messages and conv.messages[-1]["role"] == "user" else None
        route = self._route(conv, str(last["content"]), list(last.get("images") or [])) if last else None
        asked = self._asked(conv, str(last["content"]), route) if last else None
        if asked is not None:
            return asked[0].call(asked[1])
        return self._generate(conv, allow_calls=True, phase="plan", emit=lambda e: None, route=route)[0].strip()

    # -- the whole turn ---------------------------------------------------------------------------
    def run(self, message: str, *, images: list[str] | None = None, conversation_id: str | None = None,
            on_event: Callable[[Event], None] | None = None, max_tokens: int | None = None,
            should_stop: Callable[[], bool] | None = None, sampling: Sampling | None = None) -> ChatResult:
        """One user turn, start to finish. ``images`` are artifact ids already in the store.

        ``max_tokens`` caps the answer (a plain reply, or the answer after the calls); ``should_stop``
        (asked at every decoding step) ends the turn early: no calls are started after it says so.
        ``sampling`` chooses the answer's tokens (the answer after calls, or a reply routed straight to
        a plain answer; plans stay greedy) and its ``stop`` strings end the answer (finish "stop").
        """
        emit = on_event or (lambda e: None)
        if sampling is not None and sampling.changes_tokens and not self.samples:
            param = "temperature" if not sampling.greedy else "presence_penalty"
            raise SamplingUnsupported(f"Unsupported parameter: '{param}' is not supported by this core, which "
                                      "decodes greedily.", param)
        self.check_message(message, images)
        usage = TurnUsage()
        self._turn.trimmed = 0
        conv = self.conversations.get(conversation_id) if conversation_id else self.conversations.create()
        for image_id in images or []:
            conv.add_artifact(image_id, self.store.get(image_id).kind)
        route = self._route(conv, message, list(images or []))
        conv.messages.append({"role": "user", "content": message, "images": list(images or [])})

        emit(StageEvent(stage="planning"))
        prefix_cache = self._prefix_cache()
        asked = self._asked(conv, message, route)
        if asked is not None:  # an image question the core cannot see: the detector's results answer it
            reply, finish = asked[0].call(asked[1]), "stop"
            emit(TextEvent(type="plan", text=reply))
        else:
            reply, finish = self._generate(conv, allow_calls=True, phase="plan", emit=emit,
                                           prefix_cache=prefix_cache, route=route, should_stop=should_stop,
                                           max_tokens=max_tokens if route == () else None,
                                           sampling=sampling if route == () else None, usage=usage)
        reply = reply.strip()
        # the route the turn took: on an evidence turn the detect call the loop made, not the router's guess
        routed = [EVIDENCE_EXPERT] if asked is not None else list(route) if route is not None else None
        parsed = parse(reply)
        validated = validate(parsed, self.registry, max_calls=self.max_calls,
                             artifact_exists=lambda i: i in conv.artifacts)
        errors = [e.to_dict() for e in validated.errors]
        if should_stop is not None and should_stop():
            finish = "cancelled"  # the client went away: start no calls
        if not parsed.calls and not parsed.errors or finish == "cancelled":
            answer, corrections = reply, []
            if self.cannot_see is not None:
                images = self._images(self._prompt_messages(conv)).values()
                answer, corrections = unseen_answer(reply, sum(bool(self.cannot_see(i)) for i in images))
            answer, computed = checked_arithmetic(answer)  # a sum the core wrote is recomputed
            corrections = corrections + computed
            answer, finish = self._finish(answer, finish, max_tokens, sampling)
            conv.messages.append({"role": "assistant", "content": answer})
            self.conversations.save(conv)
            result = ChatResult(conversation_id=conv.id, answer=answer, plan=reply, calls=[], errors=[], artifacts=[],
                                route=routed, corrections=corrections, finish_reason=finish,  # type: ignore[arg-type]
                                trimmed_messages=self._trimmed, usage=usage)
            emit(StageEvent(stage="done"))
            emit(result)
            return result

        emit(StageEvent(stage="executing"))
        plan = Plan.from_validated(validated)
        outcome = self.dispatcher.run_plan(plan, conversation_id=conv.id, on_event=emit,
                                              **({"should_stop": should_stop} if should_stop is not None else {}))
        by_id = outcome.by_id()
        calls: list[CallRecord] = []
        for call in parsed.calls:
            record = by_id.get(call.id)
            if record is None:  # it did not validate, so it never ran
                err = next((e for e in validated.errors if e.call_id == call.id), None)
                record = CallRecord.invalid(call.id, call.expert, dict(call.args),
                                            str(err.message) if err else "invalid call")
            calls.append(record)
        lines = [c.outcome() for c in calls]
        for e in parsed.errors:
            lines.append({"call_id": "-", "expert": "-", "status": "invalid", "error": e.message})
        artifacts = outcome.artifacts()
        for a in artifacts:
            conv.add_artifact(a["id"], a["kind"])
        conv.messages.append({"role": "assistant", "content": reply})
        conv.messages.append({"role": "tool", "content": tool_turn(lines)})

        emit(StageEvent(stage="answering"))
        # The answer is checked against the calls before anyone sees it (fusion.faithful_answer), so
        # it is sent once checked (word by word), not as the core writes it.
        if asked is not None:
            answer, corrections = evidence_answer(asked[0], calls, self.store.open_image(asked[1]).size), []
        else:
            drafted, finish = self._generate(conv, allow_calls=False, phase="answer", emit=lambda e: None,
                                             prefix_cache=prefix_cache, max_tokens=max_tokens,
                                             should_stop=should_stop, sampling=sampling, usage=usage)
            answer, corrections = faithful_answer(drafted.strip(), calls)
        answer, finish = self._finish(answer, finish, max_tokens, sampling)
        for piece in re.findall(r"\s*\S+", answer):
            emit(TextEvent(type="answer", text=piece))
        conv.messages.append({"role": "assistant", "content": answer})
        self.conversations.save(conv)
        result = ChatResult(conversation_id=conv.id, answer=answer, plan=reply, calls=calls, errors=errors,
                            artifacts=artifacts, route=routed, corrections=corrections,
                            finish_reason=finish, trimmed_messages=self._trimmed, usage=usage)  # type: ignore[arg-type]
        emit(StageEvent(stage="done"))
        emit(result)
        return result

    def _finish(self, answer: str, finish: str, max_tokens: int | None,
                sampling: Sampling | None) -> tuple[str, str]:
        """The answer as sent, and its finish reason: cut before a ``stop`` string ("stop"), then to
        ``max_tokens`` ("length"); a cancelled turn's answer is left as it is."""
        if finish == "cancelled":
            return answer, finish
        if sampling is not None and sampling.stop:
            answer, stopped = sampling.cut(answer)
            if stopped:  # as every answer, without trailing whitespace
                answer, finish = answer.rstrip(), "stop"
        if max_tokens is not None:
            answer, cut = self._cap(answer, max_tokens)
            finish = "length" if cut else finish
        return answer, finish

    def _cap(self, answer: str, max_tokens: int) -> tuple[str, bool]:
        """The answer cut to ``max_tokens`` tokens (the checked answer may be the calls' own summaries,
        longer than what the core wrote), and whether it was cut."""
        tok = getattr(self.core, "tokenizer", None)
        if tok is None or not hasattr(tok, "encode"):
            words = answer.split(" ")
            return (" ".join(words[:max_tokens]), True) if len(words) > max_tokens else (answer, False)
        ids = tok.encode(answer, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return answer, False
        return tok.decode(ids[:max_tokens], skip_special_tokens=True), True

    def stream(self, message: str, **kw: Any) -> Iterator[Event]:
        """The same turn as ``run``, as an iterator of events (the last one is the ChatResult).

        An exception inside the turn is re-raised from the iterator.
        """
        return pump(lambda emit: self.run(message, on_event=emit, **kw), name="assistant-turn")
