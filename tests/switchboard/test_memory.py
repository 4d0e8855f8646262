"""The expert memory budget (switchboard.memory): footprints, LRU eviction order, reloads that still
answer correctly, and experts in use that are never unloaded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from switchboard.artifacts import ArtifactStore
from switchboard.expert import Expert, ExpertResult, RunContext
from switchboard.memory import MemoryBudget, get_budget, module_bytes, set_budget, torch_modules

torch = pytest.importorskip("torch")

SIDE = 128  # a Linear(128, 128): 128*128 + 128 float32 = 66,048 bytes
LINEAR_BYTES = (SIDE * SIDE + SIDE) * 4


class NumArgs(BaseModel):
    x: float


class NumResult(ExpertResult):
    value: float


class _Linear(Expert):
    """Holds one seeded Linear layer; answers sum(layer([x] * SIDE)), which depends on the weights."""

    abstract = True
    seed = 0

    def __init__(self) -> None:
        super().__init__()
        self.model: torch.nn.Module | None = None
        self.setups = 0
        self.entered = threading.Event()
        self.leave = threading.Event()
        self.leave.set()

    def setup(self) -> None:
        torch.manual_seed(self.seed)
        self.model = torch.nn.Linear(SIDE, SIDE)
        self.setups += 1

    def teardown(self) -> None:
        self.model = None
        super().teardown()

    def run(self, args: NumArgs, ctx: RunContext) -> NumResult:
        self.entered.set()
        self.leave.wait(30)
        assert self.model is not None, "ran without its model: unloaded while in use"
        with torch.inference_mode():
            value = float(self.model(torch.full((SIDE,), args.x)).sum())
        return NumResult(summary=f"{value:.4f}", value=value)


class ExpertA(_Linear):
    name = "mem_a"
    description = "Test expert A."
    Args = NumArgs
    Result = NumResult
    seed = 1


class ExpertB(_Linear):
    name = "mem_b"
    description = "Test expert B."
    Args = NumArgs
    Result = NumResult
    seed = 2


class ExpertC(_Linear):
    name = "mem_c"
    description = "Test expert C."
    Args = NumArgs
    Result = NumResult
    seed = 3


@pytest.fixture
def budget() -> Iterator[MemoryBudget]:
    b = MemoryBudget(int(2.5 * LINEAR_BYTES))  # room for two of the three
    set_budget(b)
    yield b
    set_budget(None)


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    return RunContext(ArtifactStore(tmp_path / "artifacts"))


def call(expert: Expert, ctx: RunContext, x: float = 1.0) -> float:
    return expert(NumArgs(x=x), ctx).value


def test_footprint_is_parameter_bytes(budget: MemoryBudget, ctx: RunContext) -> None:
    a = ExpertA()
    call(a, ctx)
    assert budget.footprint("mem_a") == LINEAR_BYTES
    assert budget.used_bytes == LINEAR_BYTES and budget.loaded() == ["mem_a"]
    # shared storage counts once; modules are found through plain objects and lists
    holder = type("Holder", (), {})()
    holder.parts = [a.model, a.model]
    assert module_bytes(torch_modules({"h": holder})) == LINEAR_BYTES


def test_least_recently_used_is_unloaded_and_reloads_correctly(budget: MemoryBudget, ctx: RunContext) -> None:
    a, b, c = ExpertA(), ExpertB(), ExpertC()
    before = {e.name: call(e, ctx) for e in (a, b)}
    call(a, ctx)  # a is now more recently used than b
    assert budget.loaded() == ["mem_b", "mem_a"]
    call(c, ctx)  # over the budget: b goes
    assert [(name, how) for name, _, how in budget.evictions] == [("mem_b", "teardown")]
    assert not b.is_setup and b.model is None and a.is_setup and c.is_setup
    assert budget.loaded() == ["mem_a", "mem_c"] and budget.used_bytes <= budget.limit_bytes
    # b answers again, with the same weights, after a reload that first made room (a was LRU)
    assert call(b, ctx) == pytest.approx(before["mem_b"])
    assert b.setups == 2 and budget.loads["mem_b"] == 2
    assert [name for name, _, _ in budget.evictions] == ["mem_b", "mem_a"]
    assert budget.loaded() == ["mem_c", "mem_b"]
    assert call(a, ctx) == pytest.approx(before["mem_a"])
    assert [name for name, _, _ in budget.evictions] == ["mem_b", "mem_a", "mem_c"]


def test_an_expert_in_use_is_not_unloaded(budget: MemoryBudget, ctx: RunContext) -> None:
    a, b, c = ExpertA(), ExpertB(), ExpertC()
    call(a, ctx)
    call(b, ctx)
    a.leave.clear()
    a.entered.clear()
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(call(a, ctx)))
    t.start()
    assert a.entered.wait(10)  # a is running (and now the most recently used)
    call(b, ctx)  # b is now more recent than a, so a is the LRU... but in use
    call(c, ctx)
    assert [name for name, _, _ in budget.evictions] == ["mem_b"]  # b went instead of a
    a.leave.set()
    t.join(10)
    assert len(out) == 1 and a.setups == 1


def test_only_pinned_experts_left_goes_over_budget(ctx: RunContext) -> None:
    small = MemoryBudget(LINEAR_BYTES // 2)
    set_budget(small)
    try:
        a = ExpertA()
        assert call(a, ctx) is not None  # bigger than the whole budget: it still loads and runs
        assert small.loaded() == ["mem_a"] and small.evictions == []
    finally:
        set_budget(None)


def test_no_budget_tracks_but_never_unloads(ctx: RunContext) -> None:
    set_budget(MemoryBudget(None))
    try:
        experts = [ExpertA(), ExpertB(), ExpertC()]
        for e in experts:
            call(e, ctx)
        assert get_budget().loaded() == ["mem_a", "mem_b", "mem_c"] and get_budget().evictions == []
        assert get_budget().used_bytes == 3 * LINEAR_BYTES
    finally:
        set_budget(None)


def test_budget_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from switchboard.settings import get_settings

    monkeypatch.setenv("SWITCHBOARD_EXPERT_MEMORY_BUDGET_MB", "1.5")
    get_settings.cache_clear()
    set_budget(None)
    try:
        assert get_budget().limit_bytes == int(1.5 * 1024 * 1024)
    finally:
        get_settings.cache_clear()
        set_budget(None)


def test_shipped_detect_and_segment_under_a_budget_for_one(tmp_path: Path) -> None:
    """The real experts, in one process with room for only one of them: each call unloads the other,
    and every reload still gives the same answer."""
    from experts.detect import DetectExpert
    from experts.segment import SegmentExpert
    from training.shapes import make_scene

    store = ArtifactStore(tmp_path / "artifacts")
    image = store.put_image(make_scene(7).image).id
    detect, segment = DetectExpert(), SegmentExpert()

    def det() -> list:
        r = detect({"image": image, "query": "everything"}, RunContext(store))
        return list(zip(r.labels, r.boxes, strict=True))

    def seg() -> str:
        return segment({"image": image, "points": [[500, 500]]}, RunContext(store)).objects[0].mask

    set_budget(MemoryBudget(None))
    try:
        first_det, first_seg = det(), seg()
        sizes = {n: get_budget().footprint(n) for n in ("detect", "segment")}
        assert all(sizes.values()), sizes
        budget = MemoryBudget(max(sizes.values()) + 1024)  # either fits, both do not
        set_budget(budget)
        detect.teardown(), segment.teardown()
        for _ in range(2):
            assert det() == first_det
            assert seg() == first_seg  # the mask artifact id: a content hash of the same pixels
        assert [name for name, _, _ in budget.evictions] == ["detect", "segment", "detect"]
        assert budget.loads == {"detect": 2, "segment": 2}
        assert budget.loaded() == ["segment"]
    finally:
        set_budget(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU offload needs a CUDA device")
def test_gpu_experts_are_offloaded_to_the_cpu(ctx: RunContext) -> None:
    class GpuA(ExpertA):
        def setup(self) -> None:
            super().setup()
            self.model = self.model.cuda()

        def run(self, args: NumArgs, ctx: RunContext) -> NumResult:
            with torch.inference_mode():
                value = float(self.model(torch.full((SIDE,), args.x, device="cuda")).sum())
            return NumResult(summary=f"{value:.4f}", value=value)

    class GpuB(GpuA):
        name = "mem_gpu_b"
        seed = 2

    set_budget(MemoryBudget(int(1.5 * LINEAR_BYTES)))
    try:
        a, b = GpuA(), GpuB()
        first = call(a, ctx)
        call(b, ctx)
        assert get_budget().evictions[0][::2] == ("mem_a", "offload")
        assert a.is_setup and a.model.weight.device.type == "cpu"
        assert call(a, ctx) == pytest.approx(first) and a.setups == 1  # moved back, not reloaded
        assert b.model.weight.device.type == "cpu"
    finally:
        set_budget(None)
