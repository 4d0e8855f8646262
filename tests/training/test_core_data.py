"""Invocation-tuning data: generated from the registry, split explicitly, valid commands."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from pydantic import BaseModel

from orchestrator.commands import parse, validate
from orchestrator.core.format import render
from switchboard.expert import Example, Expert, ExpertResult, ImageRef, NamedValues, Simulation
from switchboard.registry import Registry
from training import core_data as D

N_SCENES = 6  # scenes are the slow part; a handful is enough to exercise every path


def _registry(*extra: type[Expert]) -> Registry:
    from experts.crop import CropExpert

    reg = Registry()
    reg.register(CropExpert, "switchboard")
    for cls in extra:
        reg.register(cls, "test-plugin")
    return reg


def _verbs() -> dict[str, D.Verbs]:
    """Every list of verbs the built-in data uses: the built-in experts' own, and the chains'."""
    from experts.crop import CropExpert
    from experts.detect import DetectExpert
    from experts.generate import GenerateExpert
    from experts.segment import SegmentExpert

    out = {cls.name: D.expert_verbs(cls) for cls in (CropExpert, DetectExpert, GenerateExpert, SegmentExpert)}
    return {**out, "remove": D.REMOVE_VERBS, "recolour": D.RECOLOUR_VERBS}


def _gen(reg=None, split="train", seed=0, planned=True):
    return D.Generator(reg if reg is not None else _registry(), split=split, seed=seed, n_scenes=N_SCENES,
                       planned=planned)


def test_in_split_partitions_every_list_of_parts():
    for items in (D.FRAMES_IMPERATIVE, D.FRAMES_ANY, D.PREFIXES, D.SUFFIXES, D.TEXT_TASKS, D.DESCRIBE,
                  *(list(v.listed) for v in _verbs().values()), *(c.requests for c in D.CHAINS)):
        train, held = D.in_split(items, "train"), D.in_split(items, "heldout")
        assert held and train
        assert not set(train) & set(held)
        assert sorted(train + held) == sorted(items)
    assert D.in_split([1, 2, 3], "heldout") == [1, 2, 3]  # short lists are shared
    with pytest.raises(ValueError):
        D.in_split([1], "test")


def test_training_never_uses_held_out_verbs():
    rng = random.Random(0)
    detect = _verbs()["detect"]
    held = set(D.in_split(detect.listed, "heldout"))
    for verb in detect.listed:
        for _ in range(20):
            out = D.swap_verb(f"{verb} the {{object}}", detect, rng, "train")
            assert not any(out.startswith(h + " ") for h in held)


def _extras():
    """(list of parts, its train-only extras) for every list that has them."""
    yield D.FRAMES_IMPERATIVE + D.FRAMES_ANY, D.FRAMES_EXTRA_IMPERATIVE + D.FRAMES_EXTRA_ANY
    yield D.FRAMES_ANY, D.FRAMES_EXTRA_ANY
    yield D.PREFIXES, D.PREFIXES_EXTRA
    yield D.SUFFIXES, D.SUFFIXES_EXTRA
    yield D.DESCRIBE, D.DESCRIBE_EXTRA
    yield D.BACKGROUND, D.BACKGROUND_EXTRA
    for verbs in _verbs().values():
        yield list(verbs.listed), list(verbs.train)
    for c in D.CHAINS:
        yield c.requests, c.extra
    yield D.TEXT_TASKS, D.TEXT_TASKS_EXTRA
    for what, reqs, _ in D.UNSUPPORTED:
        yield reqs, D.UNSUPPORTED_EXTRA[what]


def test_train_only_parts_add_breadth_and_never_reach_the_held_out_split():
    total = 0
    for items, extra in _extras():
        held = D.parts(items, "heldout", extra)
        train = D.parts(items, "train", extra)
        assert held == D.in_split(items, "heldout")  # the held-out split is what it was
        assert not set(train) & set(held)
        for part in set(train) - set(D.in_split(items, "train")):
            words = f" {D._core_words(part)} "
            for h in held:  # no train-only part contains a held-out part (a verb, a frame)
                if D._core_words(h):
                    assert f" {D._core_words(h)} " not in words, (part, h)
        total += len(train) - len(D.in_split(items, "train"))
    assert total > 1000
    # a composed part that contains a held-out one is dropped
    verbs = list(_verbs()["segment"].listed)
    held_verb = D.in_split(verbs, "heldout")[0]
    assert D.train_only([f"{held_verb} around", "carve out"], verbs) == ["carve out"]


def test_unsupported_and_text_task_breadth_is_not_a_paraphrase_of_the_held_out_items():
    # a part that shares half its words with a held-out item is dropped, like expert phrasings
    tasks = D.TEXT_TASKS
    held = D.in_split(tasks, "heldout")[0]
    assert D.not_near([held + " now", "spot the vowels in 'kiwi'"], tasks) == ["spot the vowels in 'kiwi'"]
    assert D.not_near(D.TEXT_TASKS_EXTRA, tasks) == D.TEXT_TASKS_EXTRA
    for what, reqs, _ in D.UNSUPPORTED:
        assert D.not_near(D.UNSUPPORTED_EXTRA[what], reqs) == D.UNSUPPORTED_EXTRA[what]
    assert sum(map(len, D.UNSUPPORTED_EXTRA.values())) > 150
    # the train-only phrasings that name an object get one of the scene's shapes
    gen = D.Generator(split="train", seed=5, n_scenes=20)
    reqs = [D._make_unsupported(gen).messages[-1]["content"] for _ in range(400)]
    assert not any("{" in r for r in reqs)
    shapes = {o[0] for seed in gen.scenes for o in D.scene_info(seed).objects}
    assert any(any(s in r for s in shapes) for r in reqs if "3D model of" in r or "voxel" in r)


def test_compose_joins_every_combination_once():
    assert D.compose(["a", "b"], ["x", ""], ["y"]) == ["a x y", "a y", "b x y", "b y"]


def test_noun_phrase_verbs_only_before_an_object():
    rng = random.Random(1)
    for _ in range(200):
        out = D.swap_verb("generate an image of {prompt}", _verbs()["generate"], rng, "train", p=1.0)
        assert not any(out.startswith(v + " an image of") for v in _verbs()["generate"].train if v.endswith(" of"))


def test_generation_is_deterministic():
    a = [s.to_dict() for s in _gen(seed=3).generate(30)]
    b = [s.to_dict() for s in _gen(seed=3).generate(30)]
    assert a == b
    assert a != [s.to_dict() for s in _gen(seed=4).generate(30)]


def test_every_plan_is_a_valid_command_reply():
    gen = _gen()
    samples = gen.generate(300)
    kinds = Counter(s.kind for s in samples)
    assert set(kinds) == {"call", "chain", "none", "followup", "fusion"}
    for s in samples:
        parsed = parse(s.answer)
        assert not parsed.errors, s.answer
        if s.kind == "none" or s.kind == "fusion":
            assert not parsed.calls and not s.calls
            continue
        assert [c.expert for c in parsed.calls] == [c["expert"] for c in s.calls]
        text = render(s.messages)
        known = set(s.images)
        v = validate(parsed, gen.registry, artifact_exists=lambda a, t=text: a in t)
        assert not v.errors, (s.source, s.answer, v.errors)
        for c in parsed.calls:
            img = c.args.get("image")
            if img and not img.startswith("$"):
                assert img in text  # the id was shown to the model, so it can be copied
                assert img in known or s.kind == "followup"


def test_none_requests_cover_chat_description_unsupported_and_missing_images():
    samples = _gen(seed=1).generate(300, kind="none")
    sources = {s.source.split(":")[0] for s in samples}
    assert {"chat", "describe", "unsupported", "text_task", "arithmetic", "no_image"} <= sources
    for s in samples:
        assert not s.calls and not parse(s.answer).calls
        if s.source == "describe" and "shows" in s.answer:
            seed = s.images[s.messages[0]["images"][0]]
            assert D.scene_info(seed).caption in s.answer  # grounded in the scene, not invented
        if s.source.startswith("unsupported"):
            assert "no expert" in s.answer


def test_a_plugin_expert_enters_the_data_with_no_other_change():
    class BlurArgs(BaseModel):
        image: ImageRef
        strength: int = 3

    class BlurExpert(Expert):
        name = "blur"
        description = "Blur an image."
        Args = BlurArgs
        Result = ExpertResult
        examples = [Example(request="blur the picture", args={"image": "{image}"}),
                    Example(request="make it blurry, strength {text}", args={"image": "{image}", "strength": 5})]

    gen = _gen(_registry(BlurExpert), planned=False)
    samples = gen.generate(200)
    blur = [s for s in samples if any(c["expert"] == "blur" for c in s.calls)]
    assert blur, "the plugin's examples must produce requests"
    assert any("blur" in s.messages[-1]["content"].lower() for s in blur)
    for s in blur:
        v = validate(parse(s.answer), gen.registry)
        assert not v.errors
    # the plugin is listed where the core names its experts
    assert any("blur" in s.answer for s in samples if s.source.startswith(("chat:help", "unsupported")))


def test_a_plugins_phrasings_add_train_only_breadth_for_its_first_example():
    class BlurArgs(BaseModel):
        image: ImageRef
        strength: int = 3

    ex = [Example(request=r, args={"image": "{image}"}) for r in
          ["blur the picture", "soften it", "make it fuzzy", "defocus the photo", "smear it"]]
    ph = D.compose(["blur", "smudge", "haze"], ["the picture", "this", "the photo"])
    ph += ["please defocus the photo now", "defocus the photo", "defocus the photo a lot please"]

    class BlurExpert(Expert):
        name = "blur"
        description = "Blur an image."
        Args = BlurArgs
        Result = ExpertResult
        examples = ex
        phrasings = ph

    reg = _registry(BlurExpert)
    kept = [e.request for e in D.expert_phrasings(reg, "blur", "train")]
    # an example's own request, a phrasing that contains the held-out example ("defocus the photo"),
    # or one that shares half its words with it, is dropped
    assert {"blur this", "smudge the picture", "haze this"} <= set(kept)
    assert "blur the picture" not in kept and "please defocus the photo now" not in kept
    assert "defocus the photo a lot please" not in kept and "blur the photo" not in kept
    assert D.expert_phrasings(reg, "blur", "heldout") == []
    gen = _gen(reg, planned=False)
    sources = Counter(s.source for s in gen.generate(300) if s.kind == "call" and s.calls[0]["expert"] == "blur")
    assert {"blur:smudge this", "blur:haze this"} & set(sources), sources
    assert all(c["args"].keys() == {"image"} for s in gen.generate(50) for c in s.calls if c["expert"] == "blur")
    held = _gen(reg, split="heldout", planned=False).generate(300)
    only_phrasings = set(ph) - {e.request for e in ex}
    assert not any(s.source.split(":", 1)[1] in only_phrasings for s in held if s.source.startswith("blur:"))


class TintArgs(BaseModel):
    image: ImageRef
    hue: int | None = None


class TintExpert(Expert):
    """A plugin that declares every attribute the built-in experts get their breadth from."""

    name = "tint"
    description = "Tint an image."
    Args = TintArgs
    Result = ExpertResult
    examples = [Example(request="tint the picture", args={"image": "{image}"}),
                Example(request="tint it warm", args={"image": "{image}", "hue": 30})]
    verbs = ["tint", "colourise", "wash", "stain"]  # "stain" is held out
    train_verbs = ["put a tint on", "stain-wash"]  # the second contains the held-out verb: dropped
    named_values = [NamedValues(arg="hue", values={"red": 0, "green": 120, "blue": 240}, rate=0.6,
                                requests=["tint it {value}", "give it a {value} wash", "stain it {value}"],
                                args={"image": "{image}"})]

    @classmethod
    def simulate(cls, args, scene, rng):
        return Simulation(summary=f"tinted, hue {args.get('hue', 'auto')}", artifacts=[("image", "tinted")],
                          answer="Here is the tinted picture.", facts=["tinted"])


def test_a_plugin_gets_verbs_named_values_and_simulated_results_as_a_built_in_does():
    reg = _registry(TintExpert)
    train = [s for s in _gen(reg, planned=False, seed=1).generate(1500) if s.calls and s.calls[0]["expert"] == "tint"]
    texts = [s.messages[-1]["content"].lower() for s in train if s.kind == "call"]
    own = [s.messages[-1]["content"].lower() for s in train
           if s.kind == "call" and s.source in {"tint:tint the picture", "tint:tint it warm"}]
    # its verbs: swapped in training (train-only ones too), the held-out one never seen in training
    assert any("colourise" in t or "wash" in t for t in own)
    assert any("put a tint on" in t for t in own)
    assert not any("stain" in t for t in texts)
    # its named values: the words name the argument, in training only
    named = [s for s in train if s.kind == "call" and s.source in {"tint:tint it green", "tint:give it a green wash"}]
    assert named and all(s.calls[0]["args"]["hue"] == "120" for s in named)
    held = [s for s in _gen(reg, split="heldout", planned=False).generate(600)
            if s.kind == "call" and s.calls[0]["expert"] == "tint"]
    assert held and all(s.source in {"tint:tint the picture", "tint:tint it warm"} for s in held)
    assert sum("stain" in s.messages[-1]["content"].lower() for s in held) > len(held) // 2  # the held-out verb
    # its simulated results: the tool turn shows its summary, the answer says what it declared
    fusion = [s for s in _gen(reg, planned=False, seed=2).generate(300, kind="fusion")
              if s.kind == "fusion" and "tint" in s.messages[-1]["content"] and "failed" not in s.messages[-1]["content"]]
    assert fusion
    for s in fusion:
        assert "tinted, hue" in s.messages[-1]["content"] and "Here is the tinted picture." in s.answer
        assert "tinted" in s.facts


def test_the_generator_names_no_expert_to_phrase_broaden_or_simulate_it():
    from pathlib import Path

    src = Path(D.__file__).read_text()
    for name in ("crop", "detect", "segment", "generate", "edit"):
        assert f'== "{name}"' not in src and "name in SYNONYMS" not in src, name


def test_the_contract_checks_the_training_attributes():
    from switchboard.errors import ExpertDefinitionError

    with pytest.raises(ExpertDefinitionError, match="named_values"):
        type("BadNamed", (TintExpert,), {"named_values": [NamedValues(arg="strength", values={"a": 1},
                                                                      requests=["{value}"])]})
    with pytest.raises(ExpertDefinitionError, match="named_values"):
        type("BadTemplate", (TintExpert,), {"named_values": [NamedValues(arg="hue", values={"red": 0},
                                                                         requests=["tint it"])]})
    with pytest.raises(ExpertDefinitionError, match="does not validate"):
        type("BadValue", (TintExpert,), {"named_values": [NamedValues(arg="hue", values={"red": "crimson"},
                                                                      requests=["tint it {value}"])]})
    with pytest.raises(ExpertDefinitionError, match="verbs"):
        type("BadVerbs", (TintExpert,), {"verbs": ["tint", 3]})
    with pytest.raises(ExpertDefinitionError, match="train_verbs"):
        type("BadTrainVerbs", (TintExpert,), {"train_verbs": "tint"})


def test_named_regions_and_numeric_modifiers_are_read_from_the_request():
    from experts.generate import GenerateExpert

    reg = _registry(GenerateExpert)
    samples = [s for s in _gen(reg, planned=False).generate(600) if s.kind == "call"]
    crops = [s for s in samples if s.calls[0]["expert"] == "crop" and s.calls[0]["args"].get("region")]
    named = [s for s in crops if any(w in s.messages[-1]["content"].lower() for w in ("quarter", "half", "corner", "side"))]
    assert len({s.calls[0]["args"]["region"] for s in named}) >= 4
    for s in named:  # the region is the one the words name
        text, region = s.messages[-1]["content"].lower(), s.calls[0]["args"]["region"]
        if "bottom half" in text or "lower half" in text:
            assert region == "[0,500,1000,1000]", (text, region)
        if "left half" in text:
            assert region == "[0,0,500,1000]", (text, region)
    seeded = [s for s in samples if "seed" in s.calls[0]["args"]]
    assert len({s.calls[0]["args"]["seed"] for s in seeded}) >= 3
    for s in seeded:
        assert s.calls[0]["args"]["seed"] in s.messages[-1]["content"]
        assert not validate(parse(s.answer), reg).errors
    # never in the held-out split: its crops are the crop expert's own examples
    held = [s for s in _gen(reg, split="heldout", planned=False).generate(300) if s.kind == "call"]
    assert not any(s.source.startswith("crop:") and s.source[5:] not in {e.request for e in reg.get_class("crop").examples}
                   for s in held)


def test_named_positions_give_the_segment_point_the_words_name():
    from experts.segment import SegmentExpert

    nv = SegmentExpert.named_values[0]
    requests = {t.replace("{value}", p) for t in D.named_requests(SegmentExpert, nv) for p in nv.values}
    samples = [s for s in _gen(seed=5).generate(1500) if s.kind == "call" and s.calls[0]["expert"] == "segment"]
    composed = [s for s in samples if s.source.partition(":")[2] in requests]
    points = {s.calls[0]["args"]["points"] for s in composed}
    assert len(points) >= 6, points  # corners, centre and edges, not one point for every position
    expect = {"top right": "[[750,250]]", "upper right": "[[750,250]]", "bottom left": "[[250,750]]",
              "lower left": "[[250,750]]", "top left": "[[250,250]]", "upper left": "[[250,250]]",
              "bottom right": "[[750,750]]", "lower right": "[[750,750]]"}
    checked = 0
    for s in composed:
        text = s.source.lower().replace("-", " ")
        for words, pt in expect.items():
            if words in text:
                assert s.calls[0]["args"]["points"] == pt, (s.source, s.calls[0]["args"])
                checked += 1
    assert checked >= 10
    # the composed requests are train-only: none is a held-out segment example, none in the held-out split
    held_examples = {D._core_words(e.request) for cls in (SegmentExpert, D.planned_experts()["segment"])
                     for e in D.in_split(cls.examples, "heldout")}
    assert not held_examples & {D._core_words(r) for r in requests}
    held = [s for s in _gen(split="heldout").generate(600) if s.kind == "call"]
    assert not any(r in s.source for s in held for r in requests)


def test_chains_only_for_registered_experts():
    gen = _gen(planned=False)  # crop alone
    for s in gen.generate(150):
        assert {c["expert"] for c in s.calls} <= {"crop"}


def test_builtins_fill_missing_experts_and_real_ones_win():
    reg = D.data_registry(_registry())
    assert {"crop", "detect", "segment", "generate", "edit"} <= set(reg.names())
    assert reg.package_of("crop") == "switchboard"
    assert "filled in" in reg.package_of("detect")


def test_followups_refer_to_the_previous_turns_artifacts():
    samples = _gen(seed=2).generate(60, kind="followup")
    assert samples
    for s in samples:
        tool = next(m for m in s.messages if m["role"] == "tool")["content"]
        for c in s.calls:
            for k, v in c["args"].items():
                if k in ("mask", "boxes"):
                    assert v in tool


def test_fusion_answers_are_faithful_to_the_tool_turn():
    from training.core import faithful

    samples = _gen(seed=5).generate(80, kind="fusion")
    assert samples
    for s in samples:
        assert s.messages[-1]["role"] == "tool"
        assert faithful(s.answer, s.messages[-1]["content"], s.facts), (s.answer, s.messages[-1]["content"])


def test_held_out_split_uses_other_scenes_and_parts():
    assert not set(D.scene_seeds("train", 50)) & set(D.scene_seeds("heldout", 50))
    held = _gen(split="heldout").generate(60)
    train = _gen(split="train").generate(60)
    assert {s.split for s in held} == {"heldout"} and {s.split for s in train} == {"train"}
