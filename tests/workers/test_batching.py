"""The batcher (workers.batching) in-process: the window, the size cap, per-call errors, and results
reaching the caller they belong to. Timing is only ever used as an upper bound that a working batcher
cannot hit (a 30 s window that must not be waited out), never as a speed claim."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.dispatch import CallFailed, execute_call
from switchboard.artifacts import ArtifactStore
from switchboard.expert import RunContext
from switchboard.registry import Registry
from switchboard.settings import Settings
from tests.workers.batch_experts import EchoArgs, EchoExpert
from workers.batching import Batcher, BatchingRegistry, ExpertBatchers, batching_applies


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    return RunContext(ArtifactStore(tmp_path / "artifacts"))


@pytest.fixture
def expert() -> EchoExpert:
    return EchoExpert()


def hold(batcher: Batcher, expert: EchoExpert, ctx: RunContext) -> cf.Future:
    """Keep the batch thread busy with a blocking call, so that what is submitted next queues up."""
    fut = batcher.submit(EchoArgs(text="gate", mode="block"), ctx)
    deadline = time.monotonic() + 10
    while ["gate"] not in expert.batches:
        assert time.monotonic() < deadline, "the gate call never started"
        time.sleep(0.005)
    return fut


def test_window_waits_for_more_calls(expert: EchoExpert, ctx: RunContext) -> None:
    b = Batcher(expert, max_size=3, window_s=30.0)
    first = b.submit(EchoArgs(text="a"), ctx)
    time.sleep(0.2)
    assert not first.done()  # within its window, the batch waits for company
    rest = [b.submit(EchoArgs(text=t), ctx) for t in "bc"]
    results = [f.result(timeout=10) for f in [first, *rest]]  # max size reached: runs at once, not in 30 s
    assert [r.text for r in results] == ["a", "b", "c"]
    assert expert.batches == [["a", "b", "c"]]
    assert {r.batch_size for r in results} == {3}
    b.close()


def test_lone_call_runs_after_the_window(expert: EchoExpert, ctx: RunContext) -> None:
    b = Batcher(expert, max_size=8, window_s=0.01)
    assert b.run(EchoArgs(text="solo"), ctx).text == "solo"
    assert expert.batches == [["solo"]] and b.sizes == {1: 1}  # a batch of one goes through run()
    b.close()


def test_max_size_caps_batches(expert: EchoExpert, ctx: RunContext) -> None:
    b = Batcher(expert, max_size=4, window_s=0.05)
    gate = hold(b, expert, ctx)
    futs = [b.submit(EchoArgs(text=str(i)), ctx) for i in range(10)]
    expert.release()
    assert gate.result(timeout=10).text == "gate"
    assert [f.result(timeout=10).text for f in futs] == [str(i) for i in range(10)]
    assert expert.batches[1:] == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8", "9"]]
    assert b.sizes == {1: 1, 4: 2, 2: 1}
    b.close()


def test_errors_stay_with_their_call(expert: EchoExpert, ctx: RunContext) -> None:
    b = Batcher(expert, max_size=8, window_s=0.05)
    gate = hold(b, expert, ctx)
    ok1 = b.submit(EchoArgs(text="ok1"), ctx)
    bad = b.submit(EchoArgs(text="bad", mode="boom"), ctx)
    ok2 = b.submit(EchoArgs(text="ok2"), ctx)
    expert.release()
    gate.result(timeout=10)
    # the batch raised (bad), so its calls ran again one by one: each got its own outcome
    assert ok1.result(timeout=10).text == "ok1" and ok2.result(timeout=10).text == "ok2"
    assert ok1.result().batch_size == 1
    with pytest.raises(ValueError, match="boom on bad"):
        bad.result(timeout=10)
    assert expert.batches[1] == ["ok1", "bad", "ok2"]
    assert expert.batches[2:] == [["ok1"], ["bad"], ["ok2"]]
    assert b.fallbacks == 1
    b.close()


def test_a_wrong_result_fails_only_its_call(expert: EchoExpert, ctx: RunContext) -> None:
    b = Batcher(expert, max_size=8, window_s=0.05)
    gate = hold(b, expert, ctx)
    ok = b.submit(EchoArgs(text="ok"), ctx)
    wrong = b.submit(EchoArgs(text="wrong", mode="wrongtype"), ctx)
    expert.release()
    gate.result(timeout=10)
    assert ok.result(timeout=10).batch_size == 2  # no fallback: the batch itself succeeded
    with pytest.raises(TypeError, match="run_batch returned ExpertResult, not EchoResult"):
        wrong.result(timeout=10)
    assert b.fallbacks == 0
    b.close()


def test_results_reach_their_callers_across_threads(expert: EchoExpert, ctx: RunContext) -> None:
    b = Batcher(expert, max_size=5, window_s=0.02)
    texts = [f"t{i}" for i in range(40)]
    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(lambda t: b.run(EchoArgs(text=t), ctx).text, texts))
    assert got == texts
    ran = [t for batch in expert.batches for t in batch]
    assert sorted(ran) == sorted(texts)  # every call ran exactly once
    assert max(len(x) for x in expert.batches) <= 5
    b.close()


def test_execute_call_through_the_batching_registry(expert: EchoExpert, tmp_path: Path) -> None:
    """Validation, error messages and JSON results are those of an unbatched call."""
    reg = Registry()
    reg.register(EchoExpert, "tests")
    batching = BatchingRegistry(reg, ExpertBatchers(max_size=4, window_s=0.01))
    store = ArtifactStore(tmp_path / "artifacts")
    out = execute_call(batching, store, "wt_echo", {"text": "hi"}, call_id="c1")
    assert out["text"] == "hi" and out["summary"] == "echo hi"
    with pytest.raises(CallFailed, match="wt_echo: invalid arguments"):
        execute_call(batching, store, "wt_echo", {"txt": "hi"}, call_id="c2")
    with pytest.raises(CallFailed, match="wt_echo failed: ValueError: boom on x"):
        execute_call(batching, store, "wt_echo", {"text": "x", "mode": "boom"}, call_id="c3")
    # one batcher per expert instance, reused
    assert batching.batchers.for_expert(reg.instance("wt_echo")) is batching.batchers.all()[0]
    batching.batchers.close()


def test_experts_without_a_run_batch_are_not_batched() -> None:
    from experts.crop import CropExpert

    reg = Registry()
    reg.register(EchoExpert, "tests")
    reg.register(CropExpert, "tests")
    batching = BatchingRegistry(reg, ExpertBatchers(max_size=4, window_s=0.01))
    assert batching.instance("crop") is reg.instance("crop")
    assert batching.instance("wt_echo").batcher.expert is reg.instance("wt_echo")


def test_batching_applies_only_off_the_main_thread() -> None:
    on, off = Settings(batch_max_size=8), Settings(batch_max_size=1)
    assert not batching_applies(on)  # a prefork child or solo pool runs tasks on its main thread
    seen: list[bool] = []
    t = threading.Thread(target=lambda: seen.extend([batching_applies(on), batching_applies(off)]))
    t.start()
    t.join()
    assert seen == [True, False]


def test_cli_batch_flags_pick_a_threads_pool(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            worker_app: Any) -> None:
    from switchboard.settings import get_settings
    from workers import cli
    from workers.tasks import _settings

    monkeypatch.setenv("SWITCHBOARD_EXTRA_EXPERTS", "tests.workers.batch_experts:EchoExpert")
    for var in ("SWITCHBOARD_BATCH_MAX_SIZE", "SWITCHBOARD_BATCH_WINDOW_MS"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    seen: list[list[str]] = []
    monkeypatch.setattr(worker_app, "start", lambda argv: seen.append(argv) or 0)
    assert cli.main(["--experts", "wt_echo", "--batch-max", "8", "--batch-window-ms", "3"]) == 0
    s = _settings()
    assert (s.batch_max_size, s.batch_window_ms) == (8, 3.0)  # what the tasks of this process read
    assert cli.main(["--experts", "wt_echo", "--batch-max", "8", "-c", "16"]) == 0
    assert cli.main(["--experts", "wt_echo", "--batch-max", "8", "--pool", "prefork"]) == 2
    assert "needs the threads pool" in capsys.readouterr().err
    assert cli.main(["--experts", "wt_echo", "--batch-max", "0"]) == 2
    first, second = seen
    assert first[first.index("--pool") + 1] == "threads" and first[first.index("--concurrency") + 1] == "8"
    assert second[second.index("--concurrency") + 1] == "16"
