"""Batched decoding steps (orchestrator.core.batching): concurrent turns share forward passes and get the
same logits, caches and greedy plans as alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from orchestrator.core import model as cm  # noqa: E402
from orchestrator.core.batching import StepBatcher, run_batch  # noqa: E402
from tests.orchestrator.core.tiny import tiny_core  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny():
    return tiny_core()


def _cache(core):
    from transformers import DynamicCache

    return DynamicCache(config=core.model.config.get_text_config())


def _ids(core, text: str) -> list[int]:
    return core.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_batched_pass_matches_each_sequence_alone(tiny) -> None:
    """Rows with different pasts (one empty: a prefill with an image) and different numbers of new tokens
    (a chosen token, a jump-forward insertion) give the logits and caches they give alone."""
    from training.shapes import make_scene

    core = tiny
    image = core.pixel_values([make_scene(3, size=64).image])
    prompt_a = core.encode([{"role": "user", "content": "find the red circle please", "images": ["img1"]}],
                           {"img1": make_scene(3, size=64).image})["input_ids"]
    pasts = [_ids(core, "one two three four five six seven"), _ids(core, "a")]
    feeds = [prompt_a, _ids(core, " eight"), _ids(core, ' bee cee dee <call id="c1"')]
    alone_kv, batch_kv = [], []
    for k in range(len(feeds)):
        for store in (alone_kv, batch_kv):
            kv = _cache(core)
            if k > 0:  # the same past in both
                run_batch(core, [(pasts[k - 1], kv, None)])
            store.append(kv)
    alone = [run_batch(core, [(feed, kv, image if k == 0 else None)])[0]
             for k, (feed, kv) in enumerate(zip(feeds, alone_kv, strict=True))]
    batched = run_batch(core, [(feed, kv, image if k == 0 else None)
                               for k, (feed, kv) in enumerate(zip(feeds, batch_kv, strict=True))])
    for a, b in zip(alone, batched, strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    for a, b in zip(alone_kv, batch_kv, strict=True):
        assert a.get_seq_length() == b.get_seq_length()
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.allclose(la.keys, lb.keys, atol=1e-4) and torch.allclose(la.values, lb.values, atol=1e-4)


def test_concurrent_steps_run_as_one_batch(tiny) -> None:
    core = tiny
    batcher = StepBatcher(core, window_s=2.0)  # long: the batch must start because all three asked
    feeds = [_ids(core, t) for t in ("red circle", "blue square on the left", "x")]
    want = [run_batch(core, [(f, _cache(core), None)])[0] for f in feeds]
    got: list = [None] * len(feeds)
    ready = threading.Barrier(len(feeds))

    def turn(k: int) -> None:
        with batcher.session():
            ready.wait()
            got[k] = batcher.step(feeds[k], _cache(core))

    threads = [threading.Thread(target=turn, args=(k,)) for k in range(len(feeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert batcher.stats == {"passes": 1, "rows": 3, "largest": 3}
    for w, g in zip(want, got, strict=True):
        assert torch.allclose(w, g, atol=1e-4)


def test_lockstep_turns_share_every_pass(tiny) -> None:
    """Turns whose steps arrive tens of milliseconds apart (their work between passes, a busy CPU) still
    run every pass together: the batch waits for every open session's step, not a fixed short window."""
    import time

    core = tiny
    batcher = StepBatcher(core, window_s=5.0)
    n_turns, n_steps = 4, 3
    got: list = [[] for _ in range(n_turns)]
    ready = threading.Barrier(n_turns)

    def turn(k: int) -> None:
        kv = _cache(core)
        with batcher.session():
            ready.wait()
            for step in range(n_steps):
                time.sleep(0.02 * k)  # turn k is 20*k ms late for every step: more than the old 4 ms window
                feed = _ids(core, "red circle") if step == 0 else [7 + k]  # a prompt, then chosen tokens
                got[k].append(batcher.step(feed, kv))

    threads = [threading.Thread(target=turn, args=(k,)) for k in range(n_turns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert batcher.stats == {"passes": n_steps, "rows": n_turns * n_steps, "largest": n_turns}
    assert all(len(g) == n_steps for g in got)


def test_a_turn_that_leaves_does_not_stall_the_others(tiny) -> None:
    """A batch waiting for an open session runs as soon as that session closes without a step (its turn
    finished, was cancelled, or failed), not when the window runs out."""
    import time

    core = tiny
    batcher = StepBatcher(core, window_s=30.0)
    leaving = threading.Event()
    took: dict[str, float] = {}

    def stepping() -> None:
        with batcher.session():
            t0 = time.monotonic()
            leaving.wait()
            batcher.step(_ids(core, "blue square"), _cache(core))
            took["step"] = time.monotonic() - t0

    def leaver() -> None:
        with batcher.session():
            leaving.set()
            time.sleep(0.2)  # opened, never steps, then leaves

    threads = [threading.Thread(target=stepping), threading.Thread(target=leaver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert took["step"] < 15.0  # not the 30 s window (load-tolerant bound; typically ~0.2 s)
    assert batcher.stats["passes"] == 1 and batcher.stats["rows"] == 1


def test_a_packed_pass_keeps_each_rows_last_logits(tiny) -> None:
    """Many rows of very different lengths in one packed pass (no padding): each row's logits and cache
    are its own, whatever its place in the pack."""
    core = tiny
    texts = ["a", "one two three four five six seven eight nine ten", "x y", "<call id=\"c1\"", "red"]
    pasts = [_ids(core, t) for t in ("", "past words here", "", "some longer past of several words", "p")]
    kvs_alone, kvs_batch, feeds = [], [], []
    for t, past in zip(texts, pasts, strict=True):
        pair = []
        for _ in range(2):
            kv = _cache(core)
            if past:
                run_batch(core, [(past, kv, None)])
            pair.append(kv)
        kvs_alone.append(pair[0])
        kvs_batch.append(pair[1])
        feeds.append(_ids(core, t))
    alone = [run_batch(core, [(f, kv, None)])[0] for f, kv in zip(feeds, kvs_alone, strict=True)]
    batched = run_batch(core, [(f, kv, None) for f, kv in zip(feeds, kvs_batch, strict=True)])
    for a, b in zip(alone, batched, strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert [kv.get_seq_length() for kv in kvs_batch] == [len(p) + len(f) for p, f in zip(pasts, feeds, strict=True)]
    # the next step (one token each) from the packed caches matches too
    nxt_alone = [run_batch(core, [([5], kv, None)])[0] for kv in kvs_alone]
    nxt_batch = run_batch(core, [([5], kv, None) for kv in kvs_batch])
    for a, b in zip(nxt_alone, nxt_batch, strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_a_failed_pass_reaches_every_waiting_turn(tiny) -> None:
    batcher = StepBatcher(tiny, window_s=0.001)
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises for an out-of-vocabulary id
        batcher.step([10 ** 9], _cache(tiny))
    assert batcher.step(_ids(tiny, "still works"), _cache(tiny)) is not None


def test_shipped_core_plans_are_the_same_batched_and_alone() -> None:
    """Greedy plans of concurrent turns (batched) are the plans each gives alone (real core, held-out requests)."""
    if not (REPO / "models" / "core" / "core.json").exists():
        pytest.skip("no shipped core")
    from orchestrator.core.grammar import CommandGrammar
    from orchestrator.core.handles import Handles
    from training.core import _Images
    from training.core_data import Generator, data_registry

    core = cm.CoreModel.load(device="cpu")
    assert core.batcher is not None
    ran_on: list[str] = []
    core.model.register_forward_pre_hook(lambda *_: ran_on.append(threading.current_thread().name))
    registry = data_registry()
    samples = [s for s in Generator(split="heldout", seed=10_003, n_scenes=16).generate(8) if s.kind != "fusion"][:4]
    images = _Images()
    work = []
    for s in samples:
        arts = {aid: aid.split("-")[0] for aid in s.images}
        h = Handles.for_conversation(s.messages, arts)
        work.append((h.messages(s.messages), h.images({a: images(sd) for a, sd in s.images.items()}),
                     CommandGrammar.from_registry(registry, h.artifacts(arts), canonical=True)))
    alone = [core.decode(m, im, grammar=g, max_new_tokens=60, batched=False).text for m, im, g in work]
    got: list = [None] * len(work)
    before = dict(core.batcher.stats)

    def turn(k: int) -> None:
        m, im, g = work[k]
        got[k] = core.decode(m, im, grammar=g, max_new_tokens=60).text

    threads = [threading.Thread(target=turn, args=(k,)) for k in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == alone
    assert set(ran_on) == {"core-compute"}  # alone (batched=False) too
    assert core.batcher.stats["rows"] - before["rows"] > core.batcher.stats["passes"] - before["passes"]  # shared


def test_packed_rows_give_each_turn_exactly_its_pass_alone() -> None:
    """With the linear layers packed (as a loaded core has them) and attention taken row by row, a
    batched pass gives every row the very bits its pass alone gives: prefill with an image, a jump
    after a past, one chosen token."""
    from orchestrator.core import packed
    from training.shapes import make_scene

    if not packed.available():
        pytest.skip("no oneDNN packed linear in this PyTorch build")
    core = tiny_core()
    packed.pack_linears(core.model)
    scene = make_scene(5, size=64).image
    image = core.pixel_values([scene])
    prompt = core.encode([{"role": "user", "content": "find the blue square", "images": ["img1"]}],
                         {"img1": scene})["input_ids"]
    pasts = [[], _ids(core, "one two three"), _ids(core, "a b")]
    feeds = [prompt, _ids(core, ' <call id="c1" expert="'), [11]]
    runs = []
    for batched in (False, True):
        kvs = [_cache(core) for _ in feeds]
        for kv, past in zip(kvs, pasts, strict=True):
            if past:
                run_batch(core, [(past, kv, None)])
        steps = [(f, kv, image if k == 0 else None) for k, (f, kv) in enumerate(zip(feeds, kvs, strict=True))]
        first = run_batch(core, steps) if batched else [run_batch(core, [s])[0] for s in steps]
        then = run_batch(core, [([7], kv, None) for kv in kvs]) if batched else \
            [run_batch(core, [([7], kv, None)])[0] for kv in kvs]
        runs.append((first + then, kvs))
    (alone, alone_kv), (batch, batch_kv) = runs
    for a, b in zip(alone, batch, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    for a, b in zip(alone_kv, batch_kv, strict=True):
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def _on_threads(fn, n: int) -> None:
    threads = [threading.Thread(target=fn) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)


def test_every_pass_runs_on_the_cores_compute_thread() -> None:
    """Passes alone, batched and through ``generate`` all run on the one compute thread (a thread that
    runs a parallel kernel starts an OpenMP team, and two teams slow each other's passes); with
    batching off (window 0) the thread stays and every step runs alone."""
    core = tiny_core().enable_batching()
    seen: list[str] = []
    core.model.register_forward_pre_hook(lambda *_: seen.append(threading.current_thread().name))
    msgs = [{"role": "user", "content": "hello there"}]
    from orchestrator.core.grammar import CommandGrammar
    from training.core_data import data_registry

    grammar = CommandGrammar.from_registry(data_registry(), {}, canonical=True)
    core.decode(msgs, grammar=grammar, max_new_tokens=4, batched=False)
    _on_threads(lambda: core.decode(msgs, grammar=grammar, max_new_tokens=4), 3)
    core.generate(msgs, max_new_tokens=3)
    assert seen and set(seen) == {"core-compute"}
    core.enable_batching(0)
    before = dict(core.batcher.stats)
    _on_threads(lambda: core.decode(msgs, grammar=grammar, max_new_tokens=4), 3)
    assert core.batcher.stats["rows"] - before["rows"] == core.batcher.stats["passes"] - before["passes"] > 0
    assert set(seen) == {"core-compute"}


def test_turns_arriving_in_a_burst_share_their_first_pass(tiny, monkeypatch) -> None:
    """Turns that open one after another (a burst of requests) put their prompts in one pass, though
    the first ones step before the last have opened; a lone turn does not wait for anyone."""
    import time

    from orchestrator.core import batching

    monkeypatch.setattr(batching, "SETTLE_S", 1.0)  # generous: the test machine may be loaded
    core = tiny
    batcher = StepBatcher(core, window_s=10.0)
    t0 = time.monotonic()
    with batcher.session():
        batcher.step(_ids(core, "a lone turn"), _cache(core))
    assert time.monotonic() - t0 < 5.0  # not held back by SETTLE_S or the window
    before = dict(batcher.stats)

    def turn(k: int) -> None:
        time.sleep(0.1 * k)  # opened 100 ms apart: each steps at once, before the next has opened
        with batcher.session():
            batcher.step(_ids(core, f"turn number {k}"), _cache(core))

    threads = [threading.Thread(target=turn, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert batcher.stats["passes"] - before["passes"] == 1
    assert batcher.stats["rows"] - before["rows"] == 4


def test_a_core_no_longer_used_is_freed_with_its_compute_thread(monkeypatch) -> None:
    import gc
    import time
    import weakref

    from orchestrator.core import batching

    monkeypatch.setattr(batching, "IDLE_CHECK_S", 0.05)
    core = tiny_core().enable_batching()
    name = core.run(lambda: threading.current_thread().name)  # (no assert on an expression holding core)
    assert name == "core-compute"
    thread, model = core.batcher._thread, weakref.ref(core.model)
    del core
    deadline = time.monotonic() + 30
    while (thread.is_alive() or model() is not None) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert not thread.is_alive() and model() is None
