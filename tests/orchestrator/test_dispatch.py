"""The in-process dispatcher: concurrency, references, time limits, failures that lose nothing."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image
from pydantic import BaseModel

from experts.crop import CropExpert
from orchestrator.dispatch import CallEvent, LocalDispatcher
from orchestrator.plan import Plan
from switchboard.artifacts import ArtifactStore
from switchboard.expert import Example, Expert, ExpertResult, ImageRef, RunContext
from switchboard.registry import Registry


class SleepArgs(BaseModel):
    image: ImageRef
    seconds: float = 0.0
    fail: bool = False


class SleepResult(ExpertResult):
    thread: str


class SleepExpert(Expert):
    """Sleeps, optionally fails; returns the image it got as a new image artifact (so it can be chained)."""

    name = "sleep"
    description = "sleep then echo the image"
    Args = SleepArgs
    Result = SleepResult
    examples = [Example(request="wait", args={"image": "{image}"})]

    def run(self, args: SleepArgs, ctx: RunContext) -> SleepResult:
        ctx.progress(0.5, "half way")
        time.sleep(args.seconds)
        if args.fail:
            raise RuntimeError("boom on purpose")
        img = ctx.open_image(args.image)
        out = ctx.save_image(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        return SleepResult(summary=f"slept {args.seconds}s", artifacts=[out], thread=threading.current_thread().name)


class QuickSleep(SleepExpert):
    name = "quick"
    time_limit = 0.3


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    r.register(SleepExpert, "test")
    r.register(QuickSleep, "test")
    r.register(CropExpert, "switchboard")
    return r


@pytest.fixture
def image(store: ArtifactStore) -> str:
    img = Image.new("RGB", (10, 10))
    img.putpixel((0, 0), (255, 255, 255))
    return store.put_image(img).id


def run(reg, store, text, **kw):
    plan = Plan.from_text(text, reg)
    events: list[CallEvent] = []
    d = LocalDispatcher(reg, store, max_workers=4, **kw)
    try:
        return plan, d.run_plan(plan, conversation_id="conv", on_event=events.append), events
    finally:
        d.close()


def test_independent_calls_run_concurrently(reg, store, image) -> None:
    text = "".join(f'<call id="c{i}" expert="sleep" image="{image}" seconds="0.4"/>' for i in range(4))
    t0 = time.monotonic()
    _, result, _ = run(reg, store, text)
    elapsed = time.monotonic() - t0
    assert result.ok and len(result.outcomes) == 4
    assert elapsed < 1.2, f"4 × 0.4 s calls took {elapsed:.2f} s: not concurrent"
    assert len({o.result["thread"] for o in result.outcomes}) == 4


def test_references_pass_results_along(reg, store, image) -> None:
    text = (f'<call id="c1" expert="sleep" image="{image}"/>'
            f'<call id="c2" expert="sleep" image="$c1"/>'
            f'<call id="c3" expert="crop" image="$c2" region="[0,0,500,500]"/>')
    _, result, events = run(reg, store, text)
    assert result.ok
    o = result.by_id()
    assert o["c2"].args["image"] == o["c1"].result["artifacts"][0]["id"]
    assert o["c3"].args["image"] == o["c2"].result["artifacts"][0]["id"]
    # flipped twice, then the top-left quarter: the white pixel is back at (0, 0)
    crop = store.open_image(o["c3"].result["artifacts"][0]["id"])
    assert crop.getpixel((0, 0)) == (255, 255, 255)
    stages = [(e.call_id, e.stage) for e in events]
    assert stages.index(("c1", "done")) < stages.index(("c2", "queued"))
    assert ("c1", "progress") in stages
    assert store.get(o["c1"].result["artifacts"][0]["id"]).conversation_id == "conv"


def test_failure_is_reported_and_others_kept(reg, store, image) -> None:
    text = (f'<call id="c1" expert="sleep" image="{image}" fail="true"/>'
            f'<call id="c2" expert="sleep" image="$c1"/>'
            f'<call id="c3" expert="sleep" image="{image}" seconds="0.1"/>')
    _, result, events = run(reg, store, text)
    o = result.by_id()
    assert o["c1"].status == "failed" and "boom on purpose" in o["c1"].error
    assert o["c2"].status == "skipped" and "c1" in o["c2"].error
    assert o["c3"].status == "done"
    assert [x.call_id for x in result.outcomes] == ["c1", "c2", "c3"]
    assert ("c1", "failed") in [(e.call_id, e.stage) for e in events]


def test_time_limit_per_call(reg, store, image) -> None:
    text = (f'<call id="c1" expert="quick" image="{image}" seconds="3"/>'
            f'<call id="c2" expert="sleep" image="{image}" seconds="0.5"/>')
    t0 = time.monotonic()
    _, result, _ = run(reg, store, text)
    assert time.monotonic() - t0 < 2.0
    o = result.by_id()
    assert o["c1"].status == "failed" and "timed out" in o["c1"].error
    assert o["c2"].status == "done"


def test_default_timeout_from_dispatcher(reg, store, image) -> None:
    _, result, _ = run(reg, store, f'<call id="c1" expert="sleep" image="{image}" seconds="2"/>', default_timeout=0.2)
    assert "timed out" in result.outcomes[0].error


def test_missing_artifact_of_kind_is_a_clear_failure(reg, store, image) -> None:
    boxes = store.put_json({"boxes": []}, kind="boxes")
    text = (f'<call id="c1" expert="crop" image="{image}" boxes="{boxes.id}"/>'
            f'<call id="c2" expert="crop" image="$c1" region="[0,0,10,10]"/>')
    _, result, _ = run(reg, store, text)
    o = result.by_id()
    assert o["c1"].status == "done"
    assert o["c2"].status == "failed" and "made no image artifact" in o["c2"].error


def test_invalid_calls_do_not_run_but_valid_ones_do(reg, store, image) -> None:
    plan, result, _ = run(reg, store, f'<call id="c1" expert="nope"/><call id="c2" expert="sleep" image="{image}"/>')
    assert [e.code for e in plan.errors] == ["unknown_expert"]
    assert [o.call_id for o in result.outcomes] == ["c2"] and result.ok


def test_levels(reg, image) -> None:
    plan = Plan.from_text(f'<call id="a" expert="sleep" image="{image}"/><call id="b" expert="sleep" image="$a"/>'
                          f'<call id="c" expert="sleep" image="{image}"/>', reg)
    assert [[c.id for c in wave] for wave in plan.levels()] == [["a", "c"], ["b"]]


def test_a_cancelled_turn_takes_back_its_queued_calls(reg, store, image) -> None:
    # one worker thread: c1 runs, c2 and c3 wait in the pool's queue; c4 waits for c1's result
    text = (f'<call id="c1" expert="sleep" image="{image}" seconds="0.6"/>'
            f'<call id="c2" expert="sleep" image="{image}" seconds="0.6"/>'
            f'<call id="c3" expert="sleep" image="{image}" seconds="0.6"/>'
            f'<call id="c4" expert="sleep" image="$c1"/>')
    plan = Plan.from_text(text, reg)
    events: list[CallEvent] = []
    gone = threading.Event()
    d = LocalDispatcher(reg, store, max_workers=1)

    def on_event(e: CallEvent) -> None:
        events.append(e)
        if e.call_id == "c1" and e.stage == "started":
            gone.set()  # the client goes away while c1 runs

    try:
        t0 = time.monotonic()
        result = d.run_plan(plan, conversation_id="conv", on_event=on_event, should_stop=gone.is_set)
        took = time.monotonic() - t0
    finally:
        d.close()
    o = result.by_id()
    assert o["c1"].status == "done"  # it was running: it finishes, and what it made is kept
    for cid in ("c2", "c3", "c4"):
        assert o[cid].status == "skipped" and "cancelled" in o[cid].error, o[cid]
    started = {e.call_id for e in events if e.stage == "started"}
    assert started == {"c1"}
    assert took < 1.5, f"the cancelled plan took {took:.2f} s"


def test_a_plan_that_is_not_stopped_runs_everything(reg, store, image) -> None:
    text = "".join(f'<call id="c{i}" expert="sleep" image="{image}" seconds="0.1"/>' for i in range(3))
    plan = Plan.from_text(text, reg)
    d = LocalDispatcher(reg, store, max_workers=1)
    try:
        result = d.run_plan(plan, conversation_id="conv", should_stop=lambda: False)
    finally:
        d.close()
    assert result.ok and len(result.outcomes) == 3
