"""The core's answers drafted from its own answer sentences (orchestrator.core.phrases) and the expert
list its answers name, written by the grammar from the registry: the same replies in fewer passes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from orchestrator.core.grammar import CommandGrammar, GrammarLogitsProcessor
from orchestrator.core.phrases import PHRASES_FILE, PhraseDrafter, write_phrases
from switchboard.expert import Example, Expert, ExpertResult, ImageRef

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = REPO / "models" / "core" / "tokenizer"
ANSWERS = ["Sorry, I can't help with web search: I have no expert for it.",
           "Sorry, I can't help with 3D: I have no expert for it.",
           "I need an image for that: please attach one."]


@pytest.fixture(scope="module")
def tokenizer():
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip("models/core/tokenizer is not there")
    from orchestrator.core.model import load_tokenizer

    return load_tokenizer(TOKENIZER)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_draft_follows_the_answers_while_one_continuation_leads(tokenizer) -> None:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    d = PhraseDrafter.from_texts(ANSWERS, tokenizer, end)
    assert d.sentences == 3
    said = _ids(tokenizer, "Sorry")
    # both refusals go on alike up to the topic, where neither leads (one time in two each): the draft stops
    assert tokenizer.decode(d.draft(said, 20)) == ", I can't help with"
    # a topic the answers never named: its ":" goes on as two of the three answers' do
    topic = _ids(tokenizer, "Sorry, I can't help with upscaling:")
    assert tokenizer.decode(d.draft(topic, 20)) == " I have no expert for it."  # and not the end token
    assert len(d.draft(topic, 3)) == 3  # the limit
    assert d.draft(_ids(tokenizer, "The zebra"), 10) == []  # nothing known: no draft
    # the last 3 tokens decide where they are known: "that:" goes on as the image request does
    assert tokenizer.decode(d.draft(_ids(tokenizer, "I need an image for that:"), 20)) == " please attach one."


def test_phrases_are_written_and_read_with_their_newlines(tmp_path, tokenizer) -> None:
    assert PhraseDrafter.load(tmp_path, tokenizer) is None  # a core folder without phrases: no drafts
    path = write_phrases(tmp_path, ["Here is the mask.\nDone: I edited the image.", "  ", "Goodbye!"])
    assert path.name == PHRASES_FILE and path.read_text().count("\n") == 2  # one line each, the blank dropped
    d = PhraseDrafter.load(tmp_path, tokenizer)
    assert d is not None and d.sentences == 2
    assert tokenizer.decode(d.draft(_ids(tokenizer, "Here is the mask."), 5)).startswith("\nDone")


class _CaptionArgs(BaseModel):
    image: ImageRef


class _Caption(Expert):
    """A plugin installed after the core was trained."""

    name = "caption"
    description = "describe a photo in one sentence"
    Args = _CaptionArgs
    Result = ExpertResult
    examples = [Example(request="what does this photo show?", args={"image": "{image}"})]


def _registry(plugin: bool = False):
    from training.core_data import data_registry

    reg = data_registry()
    if plugin:
        reg.register(_Caption, "switchboard-caption")
    return reg


def test_the_grammar_writes_the_experts_an_answer_lists(tokenizer) -> None:
    reg = _registry(plugin=True)
    g = CommandGrammar.from_registry(reg, {})
    listing = f" {', '.join(reg.names())}."  # caption, crop, detect, edit, generate, [ocr,] segment
    assert listing.startswith(" caption, crop, detect, edit, generate,") and listing.endswith(" segment.")
    for cue in ("Sorry, I can't help with 3D: I have no expert for it. I can use:",
                "Hello! I can use these experts:"):
        s = g.start()
        assert g.feed(s, cue)
        assert g.forced(s) == listing  # jump-forward writes it without a pass
        assert g.complete(cue + listing) and g.complete(cue + listing + " Attach an image.")
        assert not g.viable(cue + " crop, detect, edit, generate, ocr, segment.")  # the list of the training days
    assert g.complete("I can use a hand: here it is.")  # no cue, no list
    free = CommandGrammar.from_registry(_registry(), {}, lists_experts=False)
    assert free.complete("I can use: crop, paint.")
    # token by token too: the model's own list of the training days is masked, the registry's comes
    import torch

    proc = GrammarLogitsProcessor(g, tokenizer, prompt_length=0)
    said = _ids(tokenizer, "I can use:")
    crop, caption = _ids(tokenizer, " crop")[0], _ids(tokenizer, " caption")[0]
    scores = torch.zeros((1, len(tokenizer)))
    scores[0, crop], scores[0, caption] = 5.0, 3.0
    out = proc(torch.tensor([said]), scores)
    assert out[0].argmax().item() == caption and out[0, crop] == float("-inf")


@pytest.fixture(scope="module")
def shipped():
    if not (REPO / "models" / "core" / "core.json").exists():
        pytest.skip("no shipped core")
    from orchestrator.core.model import CoreModel

    core = CoreModel.load(device="cpu")
    if core.phrases is None:
        pytest.skip("the shipped core has no phrases.txt")
    return core


def test_the_shipped_core_writes_a_refusal_in_a_few_passes(shipped) -> None:
    """A refusal of ~34 tokens: the same reply drafted from the core's phrases, token by token, and
    without phrases — in a fraction of the passes."""
    reg = _registry()
    g = CommandGrammar.from_registry(reg, {}, canonical=True)
    msgs = [{"role": "user", "content": "please translate this sentence into german"}]
    slow = shipped.decode(msgs, grammar=g, max_new_tokens=80, jump_forward=False)
    phrases, shipped.phrases = shipped.phrases, None
    try:
        plain = shipped.decode(msgs, grammar=g, max_new_tokens=80)
    finally:
        shipped.phrases = phrases
    fast = shipped.decode(msgs, grammar=g, max_new_tokens=80)
    assert fast.text == plain.text == slow.text
    assert f"I can use: {', '.join(reg.names())}." in fast.text
    assert slow.passes >= 25 and fast.passes * 3 <= slow.passes and fast.passes < plain.passes
    assert fast.accepted_tokens >= 10


def test_a_plugin_installed_after_training_is_listed(shipped) -> None:
    """The core learnt the list of its training days; the grammar writes the registry's."""
    reg = _registry(plugin=True)
    g = CommandGrammar.from_registry(reg, {}, canonical=True)
    msgs = [{"role": "user", "content": "please translate this sentence into german"}]
    out = shipped.decode(msgs, grammar=g, max_new_tokens=80)
    assert "caption" in reg.names() and f"I can use: {', '.join(reg.names())}." in out.text


def test_an_answer_after_calls_copies_their_results_in_few_passes(shipped) -> None:
    """After a tool turn an answer reports its results ("(539,486,771,723)"): prompt lookup drafts them
    from the tool turn where the phrases know nothing; the answer is the token-by-token one."""
    from training.shapes import make_scene

    g = CommandGrammar.from_registry(_registry(), {"img1": "image", "boxes1": "boxes", "overlay1": "image"},
                                     canonical=True, allow_calls=False)
    msgs = [{"role": "user", "content": "where is the purple square?", "images": ["img1"]},
            {"role": "assistant", "content": '<call id="c1" expert="detect" image="img1" query="purple square"/>'},
            {"role": "tool", "content": "c1 detect done: 1 purple square: (539,486,771,723) [x1,y1,x2,y2 on a "
                                        "0-1000 scale] -> boxes1, overlay1"}]
    images = {"img1": make_scene(5003).image}
    slow = shipped.decode(msgs, images, grammar=g, max_new_tokens=60, jump_forward=False)
    fast = shipped.decode(msgs, images, grammar=g, max_new_tokens=60)
    assert fast.text == slow.text and "(539,486,771,723)" in fast.text
    assert fast.passes * 2 <= slow.passes
