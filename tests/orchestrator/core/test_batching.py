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
    assert core.batcher.stats["rows"] - before["rows"] > core.batcher.stats["passes"] - before["passes"]  # shared
