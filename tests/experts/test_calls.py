"""An expert calling another (``RunContext.call``): through the caller ``execute_call`` supplies, or,
when the expert is run directly, through the process registry; validated and tagged alike."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, Field, ValidationError

from orchestrator.dispatch import CallFailed, execute_call
from switchboard.artifacts import ArtifactStore
from switchboard.errors import UnknownExpert
from switchboard.expert import Expert, ExpertResult, RunContext
from switchboard.registry import Registry


class EchoArgs(BaseModel):
    text: str = Field(min_length=1)


class EchoResult(ExpertResult):
    call_id: str
    conversation_id: str | None


class Echo(Expert):
    """Saves its text and reports the context it ran under."""

    name = "echo"
    description = "test double: echoes its text"
    Args = EchoArgs
    Result = EchoResult

    def run(self, args: EchoArgs, ctx: RunContext) -> EchoResult:
        ctx.progress(1.0, "echoed")
        art = ctx.save_json({"text": args.text}, kind="json")
        return EchoResult(summary=args.text, artifacts=[art], call_id=ctx.call_id, conversation_id=ctx.conversation_id)


class RelayArgs(BaseModel):
    text: str
    to: str = "echo"


class RelayResult(ExpertResult):
    inner: dict[str, Any]


class Relay(Expert):
    """Calls another expert and returns what it said."""

    name = "relay"
    description = "test double: relays its text to another expert"
    Args = RelayArgs
    Result = RelayResult

    def run(self, args: RelayArgs, ctx: RunContext) -> RelayResult:
        inner = ctx.call(args.to, {"text": args.text})
        return RelayResult(summary=f"relayed: {inner['summary']}", inner=inner)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    import switchboard.registry as registry_module

    reg = Registry()
    reg.register(Echo, "test")
    reg.register(Relay, "test")
    monkeypatch.setattr(registry_module, "_registry", reg)
    return reg


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def test_without_a_caller_the_given_registry_runs_it(registry: Registry, store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError, match="neither a caller nor a registry"):
        RunContext(store).call("echo", {"text": "hi"})
    ctx = RunContext(store, call_id="c7", conversation_id="conv-1", registry=registry)
    out = ctx.call("echo", {"text": "hi"})
    assert out["summary"] == "hi" and (out["call_id"], out["conversation_id"]) == ("c7", "conv-1")
    assert store.get(out["artifacts"][0]["id"]).call_id == "c7"
    with pytest.raises(ValidationError):
        ctx.call("echo", {"text": ""})
    with pytest.raises(UnknownExpert):
        ctx.call("nope", {"text": "hi"})


def test_a_supplied_caller_is_used(store: ArtifactStore) -> None:
    seen: list[tuple[str, dict]] = []
    ctx = RunContext(store, caller=lambda name, args: seen.append((name, args)) or {"summary": "stub"})
    assert ctx.call("echo", {"text": "hi"}) == {"summary": "stub"}
    assert seen == [("echo", {"text": "hi"})]


def test_execute_call_runs_nested_calls_under_the_same_call(registry: Registry, store: ArtifactStore,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import switchboard.registry as registry_module

    monkeypatch.setattr(registry_module, "_registry", None)  # the caller must use execute_call's registry
    monkeypatch.setattr(registry_module, "get_registry", lambda: pytest.fail("the process registry was used"))
    events: list[tuple[float, str]] = []
    out = execute_call(registry, store, "relay", {"text": "hello"}, call_id="c3", conversation_id="conv-9",
                       progress=lambda f, m: events.append((f, m)))
    assert out["summary"] == "relayed: hello"
    assert (out["inner"]["call_id"], out["inner"]["conversation_id"]) == ("c3", "conv-9")
    assert store.get(out["inner"]["artifacts"][0]["id"]).conversation_id == "conv-9"
    assert events == []  # the nested call's progress is not the caller's


def test_nested_failures_are_the_callers_failure(registry: Registry, store: ArtifactStore) -> None:
    with pytest.raises(CallFailed, match=r"^relay: unknown expert 'nope'"):
        execute_call(registry, store, "relay", {"text": "x", "to": "nope"}, call_id="c1")
    with pytest.raises(CallFailed, match=r"^relay: invalid arguments"):
        execute_call(registry, store, "relay", {"text": ""}, call_id="c1")


class BatchedEcho(Echo):
    """Echo with a real ``run_batch``, so a worker's batching registry batches its calls."""

    def run_batch(self, items):
        return [self.run(args, ctx) for args, ctx in items]


def test_nested_calls_in_a_batching_worker(store: ArtifactStore) -> None:
    # a worker hands execute_call its batching registry: the nested call joins the other expert's batches
    from workers.batching import BatchingRegistry, ExpertBatchers

    reg = Registry()
    reg.register(BatchedEcho, "test")
    reg.register(Relay, "test")
    batchers = ExpertBatchers(max_size=4, window_s=0.0)
    try:
        out = execute_call(BatchingRegistry(reg, batchers), store, "relay", {"text": "hi"}, call_id="c5")
    finally:
        batchers.close()
    assert out["inner"]["summary"] == "hi" and out["inner"]["call_id"] == "c5"
    assert sum(b.sizes.total() for b in batchers.all()) == 1
