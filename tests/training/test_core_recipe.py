"""The core recipe: a tiny end-to-end train/resume/load/eval run, and the metrics themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import core as recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _optimizer_states_in_tmp(tmp_path, monkeypatch):
    """The tiny runs' optimizer states go to the test's folder, not the user's cache (.cache/core)."""
    monkeypatch.setattr(recipe, "_state_path", lambda out: tmp_path / "states" / f"trainer_state-{out.name}.pt")


def _has_tokenizer() -> bool:
    return (REPO / "models" / "core" / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.skipif(not _has_tokenizer(), reason="models/core/tokenizer missing")
def test_tiny_train_resume_load_and_eval(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "core"
    assert recipe.main_train(["--tiny", "--steps", "2", "--out", str(out), "--save-every", "1"]) == 0
    for name in ("config.json", "core.json", "vision.safetensors", "adapter/adapter_config.json",
                 "tokenizer/tokenizer.json", "lm.safetensors", "train_log.jsonl", "phrases.txt"):
        assert (out / name).exists(), name
    # the answers of training conversations, which the loaded core drafts its answers from
    phrases = (out / "phrases.txt").read_text().splitlines()
    assert len(phrases) >= 50 and not any("<call" in line for line in phrases)
    assert recipe.main_train(["--tiny", "--steps", "3", "--out", str(out), "--resume"]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [1, 2, 3]
    assert json.loads((out / "core.json").read_text())["trained_steps"] == 3
    capsys.readouterr()
    assert recipe.main_eval(["--model", str(out), "--n", "6", "--no-human", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("expert_accuracy", "exact_call_accuracy", "argument_f1", "none_accuracy", "fusion_faithfulness", "n"):
        assert key in res
    from orchestrator.core.model import CoreModel

    assert CoreModel.load(out, device="cpu").phrases.sentences == len(phrases)
    # a core trained before the recipe wrote them gets them from --phrases-only (no training)
    (out / "phrases.txt").unlink()
    assert recipe.main_train(["--phrases-only", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answers"] > len(phrases)
    assert (out / "phrases.txt").exists() and json.loads((out / "core.json").read_text())["trained_steps"] == 3


@pytest.mark.skipif(not _has_tokenizer(), reason="models/core/tokenizer missing")
def test_resume_keeps_the_adapters_layers(tmp_path, capsys):
    """Resuming never drops LoRA layers: by default it trains the adapter's own layers, a wider
    --lora-layers adds layers (the old ones keep their weights), a narrower one is refused."""
    pytest.importorskip("peft")
    out = tmp_path / "core"
    adapter = out / "adapter" / "adapter_model.safetensors"
    assert recipe.main_train(["--tiny", "--steps", "1", "--out", str(out), "--lora-layers", "1"]) == 0
    assert recipe.adapter_layers(adapter) == [1]  # the top one of the tiny LM's 2 layers
    assert recipe.main_train(["--tiny", "--steps", "2", "--out", str(out), "--resume"]) == 0
    assert recipe.adapter_layers(adapter) == [1]
    core = recipe.build_trainable(tiny=True, out=out, resume=True, lora_layers=0, log=lambda *_: None)
    from safetensors.torch import load_file

    saved = load_file(str(adapter))
    mine = {k: v for k, v in core.model.state_dict().items() if "lora_" in k}
    top = [k for k in saved if ".layers.1." in k]
    assert top and all(any(m.endswith(k.replace(".weight", ".default.weight")) and (mine[m] == saved[k]).all()
                           for m in mine) for k in top)
    assert any(".layers.0." in k for k in mine)
    assert recipe.main_train(["--tiny", "--steps", "3", "--out", str(out), "--resume", "--lora-layers", "0"]) == 0
    assert recipe.adapter_layers(adapter) == [0, 1]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        recipe.main_train(["--tiny", "--steps", "4", "--out", str(out), "--resume", "--lora-layers", "1"])
    assert "would drop some of them" in capsys.readouterr().err
    assert recipe.adapter_layers(adapter) == [0, 1]


def test_routing_metrics():
    img = "image-" + "a" * 24
    gold = [[{"id": "c1", "expert": "detect", "args": {"image": img, "query": "red circle"}}],
            [],
            [{"id": "c1", "expert": "segment", "args": {"image": img, "target": "the star"}},
             {"id": "c2", "expert": "edit", "args": {"image": img, "mask": "$c1", "instruction": "remove it"}}]]
    pred = [[{"id": "c1", "expert": "detect", "args": {"image": img, "query": "Red circle"}}],
            [{"id": "x", "expert": "crop", "args": {"image": img}}],
            [{"id": "a", "expert": "segment", "args": {"image": img, "target": "star"}},
             {"id": "b", "expert": "edit", "args": {"image": img, "mask": "$a", "instruction": "make it blue"}}]]
    m = recipe.routing_metrics(gold, pred)
    assert m["expert_accuracy"] == round(2 / 3, 4)
    assert m["exact_call_accuracy"] == round(1 / 3, 4)
    assert m["none_accuracy"] == 0.0 and m["n_none"] == 1
    empty = recipe.routing_metrics([], [])  # nothing scored: no number, rather than a 0.0 that reads as failure
    assert empty["expert_accuracy"] is None and empty["none_accuracy"] is None and empty["n"] == 0
    # tp: 2 + 2 + 2 (image, mask ref); fp: 1 (crop image) + 1 (instruction); fn: 1 (instruction)
    assert m["argument_f1"] == round(12 / 15, 4)


def test_norm_value():
    assert recipe._norm_value("The Red Circle.") == "red circle"
    assert recipe._norm_value("[0, 0, 500, 500]") == "[0,0,500,500]"
    assert recipe._norm_value("0.60") == "0.6"


def test_queries_compare_singular_and_plural_alike():
    call = {"id": "c1", "expert": "detect", "args": {"image": "image-1", "query": "red circles"}}
    same = {**call, "args": {"image": "image-1", "query": "Red circle"}}
    other = {**call, "args": {"image": "image-1", "query": "red square"}}
    prompt = {**call, "args": {"prompt": "two red circles"}}
    assert recipe._norm_calls([call]) == recipe._norm_calls([same]) != recipe._norm_calls([other])
    assert recipe._norm_calls([prompt])[0][1] == (("prompt", "two red circles"),)


def test_faithful():
    tool = "c1 detect done: found 2 red circles -> boxes-" + "a" * 24
    assert recipe.faithful("I found 2 red circles.", tool, ["2", "circles"])
    assert not recipe.faithful("I found 3 red circles.", tool, ["2"])
    assert not recipe.faithful("I found 2 blue circles.", tool, ["2"])
    assert recipe.faithful("Sorry, the detect step failed: out of memory.", "c1 detect failed: out of memory", ["fail"])
    assert not recipe.faithful("Done!", "c1 detect failed: out of memory", ["fail"])


def test_human_set_is_valid_and_balanced():
    from orchestrator.commands import Call, validate
    from training.core_data import data_registry

    rows = recipe.load_human_set()
    assert len(rows) >= 60
    assert sum(1 for r in rows if not r["calls"]) >= 12
    reg = data_registry()
    samples = recipe.human_samples()
    assert len(samples) == len([r for r in rows if all(c["expert"] in reg for c in r["calls"])])
    for s in samples:
        calls = [Call(c["id"], c["expert"], c["args"]) for c in s.calls]
        v = validate(calls, reg)
        assert not v.errors, (s.messages, v.errors)


@pytest.mark.skipif(not _has_tokenizer(), reason="models/core/tokenizer missing")
def test_fine_tune_a_llava_checkpoint_with_the_same_recipe(tmp_path):
    """`--base PATH`: LoRA over a full LLaVA-family checkpoint (here a tiny one), loadable afterwards."""
    pytest.importorskip("peft")
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from orchestrator.core import model as cm

    tok = cm.load_tokenizer(REPO / "models" / "core" / "tokenizer")
    cfg = cm.llava_config(cm.tiny_text_config(len(tok)), cm.vision_config(tiny=True),
                          tok.convert_tokens_to_ids(cm.IMAGE_TOKEN))
    torch.manual_seed(0)
    base = tmp_path / "llava"
    LlavaForConditionalGeneration(cfg).save_pretrained(base)
    ip = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=16,
                   vision_feature_select_strategy="default").save_pretrained(base)

    out = tmp_path / "tuned"
    assert recipe.main_train(["--base", str(base), "--steps", "2", "--batch", "2", "--out", str(out)]) == 0
    meta = json.loads((out / "core.json").read_text())
    assert meta["base"] == str(base.resolve()) and meta["trained_steps"] == 2
    core = cm.CoreModel.load(out)
    img = "image-" + "d" * 24
    from training.shapes import make_scene

    text = core.generate([{"role": "user", "content": "find the red circle", "images": [img]}],
                         {img: make_scene(3, size=64).image}, max_new_tokens=4)
    assert isinstance(text, str)


@pytest.mark.skipif(not _has_tokenizer(), reason="models/core/tokenizer missing")
def test_snapshots_and_average(tmp_path, capsys):
    """--snapshot-every keeps the adapter along the run; --average writes their element-wise mean as
    a loadable core, and refuses adapters of another layout with a clear error."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    out = tmp_path / "core"
    assert recipe.main_train(["--tiny", "--steps", "3", "--out", str(out), "--snapshot-every", "1",
                              "--save-every", "10"]) == 0
    snaps = sorted((out / "snapshots").glob("*.safetensors"))
    assert [s.name for s in snaps] == ["step-000001.safetensors", "step-000002.safetensors",
                                       "step-000003.safetensors"]
    states = [load_file(str(s)) for s in snaps]
    key = next(k for k in states[0] if "lora_B" in k)
    assert not (states[0][key] == states[2][key]).all()  # the run moved between snapshots

    soup = tmp_path / "soup"
    capsys.readouterr()
    assert recipe.main_train(["--average", str(out), *map(str, snaps[:2]), "--out", str(soup)]) == 0
    assert json.loads(capsys.readouterr().out)["averaged"] == 3
    avg = load_file(str(soup / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in avg:
        assert (avg[k] - (final[k] + states[0][k] + states[1][k]) / 3).abs().max() < 1e-6, k
    info = json.loads((soup / "core.json").read_text())
    assert len(info["averaged_from"]) == 3 and info["trained_steps"] == 3
    from orchestrator.core.model import CoreModel

    core = CoreModel.load(soup)
    assert isinstance(core.generate_batch([([{"role": "user", "content": "hello"}], {})], max_new_tokens=3)[0], str)

    other = tmp_path / "other"
    assert recipe.main_train(["--tiny", "--steps", "1", "--out", str(other), "--lora-layers", "1"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        recipe.main_train(["--average", str(out), str(other), "--out", str(tmp_path / "bad")])
    assert "not adapters of one layout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.main_train(["--average", str(out), "--out", str(tmp_path / "bad")])
    assert "at least two" in capsys.readouterr().err


@pytest.mark.skipif(not _has_tokenizer(), reason="models/core/tokenizer missing")
def test_snapshots_keep_and_average_the_projector_when_it_trains(tmp_path, capsys):
    """A run that trains the projector (--train-vision) snapshots it beside each adapter; --average
    then averages the projectors as well (the vision tower itself is the first directory's), and an
    average with a source that has no projector keeps the first directory's."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    out = tmp_path / "core"
    assert recipe.main_train(["--tiny", "--steps", "2", "--out", str(out), "--train-vision", "--lr", "1e-2",
                              "--snapshot-every", "1", "--save-every", "10"]) == 0
    snaps = sorted((out / "snapshots").iterdir())
    assert [s.name for s in snaps] == ["step-000001.projector.safetensors", "step-000001.safetensors",
                                       "step-000002.projector.safetensors", "step-000002.safetensors"]
    p1 = load_file(str(snaps[0]))
    final = load_file(str(out / "vision.safetensors"))
    assert p1 and all(k.startswith("multi_modal_projector.") for k in p1)
    key = next(k for k in p1 if k.endswith("weight"))
    assert not (p1[key] == final[key]).all()  # the projector moved between step 1 and the end

    soup = tmp_path / "soup"
    capsys.readouterr()
    assert recipe.main_train(["--average", str(out), *map(str, snaps), "--out", str(soup)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["averaged"] == 3 and res["projector"] == "averaged"  # the .projector files are not adapters
    avg = load_file(str(soup / "vision.safetensors"))
    p2 = load_file(str(snaps[2]))
    for k in final:
        want = (final[k] + p1[k] + p2[k]) / 3 if k in p1 else final[k]
        assert (avg[k] - want).abs().max() < 1e-6, k

    (snaps[0]).unlink()  # step 1 now has no projector: the first directory's is kept
    assert recipe.main_train(["--average", str(out), str(snaps[1]), "--out", str(tmp_path / "soup2")]) == 0
    assert json.loads(capsys.readouterr().out)["projector"] == f"from {out}"
    kept = load_file(str(tmp_path / "soup2" / "vision.safetensors"))
    assert all((kept[k] == final[k]).all() for k in final)


def test_eval_seed_picks_another_heldout_draw(monkeypatch, capsys):
    """--seed is passed to evaluate (another draw of the held-out templates); the default is draw 0."""
    seen = []

    class _Core:
        @staticmethod
        def load(path):
            return object()

    monkeypatch.setattr("orchestrator.core.model.CoreModel", _Core)
    monkeypatch.setattr(recipe, "evaluate", lambda core, **kw: seen.append(kw["seed"]) or {"errors": []})
    assert recipe.main_eval(["--json", "--n", "2", "--no-human"]) == 0
    assert recipe.main_eval(["--json", "--n", "2", "--no-human", "--seed", "3"]) == 0
    assert seen == [0, 3]


@pytest.mark.skipif(not _has_tokenizer(), reason="models/core/tokenizer missing")
def test_align_trains_the_projector_only(tmp_path, capsys):
    """--align (LLaVA stage 1 on a trained core): the projector learns from questions about the image,
    the LoRA adapter is saved exactly as it was, and the eval reports grounding on describe samples."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    out = tmp_path / "core"
    assert recipe.main_train(["--tiny", "--steps", "2", "--out", str(out)]) == 0
    adapter0 = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    proj0 = {k: v for k, v in load_file(str(out / "vision.safetensors")).items() if "multi_modal_projector" in k}
    assert not proj0["multi_modal_projector.linear_2.weight"].any()  # blank image tokens before
    assert recipe.main_train(["--tiny", "--align", "--steps", "4", "--lr", "1e-2", "--out", str(out),
                              "--resume"]) == 0
    adapter1 = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter1.keys() == adapter0.keys()
    assert all((adapter1[k] == adapter0[k]).all() for k in adapter0)
    proj1 = load_file(str(out / "vision.safetensors"))
    assert proj1["multi_modal_projector.linear_2.weight"].abs().sum() > 0
    capsys.readouterr()
    assert recipe.main_eval(["--model", str(out), "--n", "4", "--no-human", "--json", "--kind", "describe"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_grounding"] == 4 and "grounding_f1" in res


def test_grounding_metrics():
    assert recipe.scene_facts("The image shows a red circle, two blue squares and a star on a noisy dark grey "
                              "background.") == {"red circle", "blue square", "bg: noisy dark grey background"}
    assert recipe.scene_facts("It is a grey gradient background.") == {"bg: grey gradient background"}
    gold = ["The image shows a red circle and two blue squares on a beige background.", "It is a white background."]
    assert recipe.grounding_metrics(gold, gold) == {"grounding_f1": 1.0, "grounding_exact": 1.0, "n_grounding": 2}
    res = recipe.grounding_metrics(gold, ["The image shows a red circle and a green star on a beige background.",
                                          "It is a slate background."])
    # facts: gold {red circle, blue square, bg beige} + {bg white}; predicted {red circle, green star,
    # bg beige} + {bg slate}: tp 2, fp 2, fn 2
    assert res == {"grounding_f1": 0.5, "grounding_exact": 0.0, "n_grounding": 2}
    assert recipe.grounding_metrics([], [])["grounding_f1"] is None


def test_describe_samples_ask_about_the_attached_image():
    from training.core_data import Generator

    for s in Generator(split="heldout", seed=3, n_scenes=16).generate(12, "describe"):
        assert s.kind == "none" and s.source == "describe" and not s.calls and len(s.images) == 1
        assert s.answer.startswith(("The image shows ", "It is a "))


@pytest.mark.skipif(not _has_tokenizer(), reason="models/core/tokenizer missing")
def test_handles_share_of_the_training_conversations(tmp_path, monkeypatch, capsys):
    """--handles SHARE writes that share of the training conversations with short handles (img1 …), as
    the loop shows them to the core; the rest keep their artifact ids."""
    import re

    from orchestrator.core.format import render

    pytest.importorskip("peft")
    seen: list[str] = []
    real = recipe.encode_sample
    monkeypatch.setattr(recipe, "encode_sample", lambda core, s, images: seen.append(render(s.messages))
                        or real(core, s, images))
    ids = re.compile(r"\bimage-[0-9a-f]{24}\b")
    handle = re.compile(r"\bimg1\b")
    assert recipe.main_train(["--tiny", "--steps", "2", "--batch", "4", "--out", str(tmp_path / "all"),
                              "--handles", "1"]) == 0
    with_images = [t for t in seen if ids.search(t) or handle.search(t)]
    assert with_images and all(handle.search(t) and not ids.search(t) for t in with_images)
    assert json.loads((tmp_path / "all" / "core.json").read_text())["handles_share"] == 1.0
    seen.clear()
    assert recipe.main_train(["--tiny", "--steps", "6", "--batch", "4", "--out", str(tmp_path / "half"),
                              "--handles", "0.5"]) == 0
    assert any(handle.search(t) for t in seen) and any(ids.search(t) for t in seen)
    seen.clear()
    assert recipe.main_train(["--tiny", "--steps", "2", "--batch", "4", "--out", str(tmp_path / "none")]) == 0
    assert not any(handle.search(t) for t in seen) and any(ids.search(t) for t in seen)
    with pytest.raises(SystemExit):
        recipe.main_train(["--tiny", "--steps", "1", "--out", str(tmp_path / "bad"), "--handles", "1.5"])
