"""Prompt lookup in the core's decoding: drafted tokens are checked in one pass and kept only as far as
the model agrees, so the reply is the greedy one whatever the draft; a right draft saves passes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")

from orchestrator.core import decode as dec  # noqa: E402
from orchestrator.core.grammar import CommandGrammar, token_texts  # noqa: E402
from tests.orchestrator.core.tiny import tiny_core  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
MSGS = [{"role": "user", "content": "tell me a story about a red star"}]


def varied_core():
    """The tiny random core with its layers' weights scaled up: its greedy replies are varied tokens
    (the plain one repeats a newline), so a draft of them means something."""
    import torch

    core = tiny_core()
    with torch.no_grad():
        for name, p in core.model.named_parameters():
            if "layers" in name and p.dim() == 2:
                p.mul_(8)
    return core


@pytest.fixture(scope="module")
def tiny():
    return varied_core()


@pytest.fixture(scope="module")
def grammar():
    from training.core_data import data_registry

    return CommandGrammar.from_registry(data_registry(), {"image-" + "ab" * 12: "image"}, canonical=True)


def _ids(core, text: str) -> list[int]:
    return core.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_draft_is_what_followed_the_last_words_as_far_as_the_grammar_admits(tiny, grammar) -> None:
    texts = token_texts(tiny.tokenizer)
    eos = {tiny.end_id}
    prompt = _ids(tiny, "please draw a purple star on a beige background, thanks")
    head = '<call id="c1" expert="generate" prompt="a purple'
    reply = _ids(tiny, head)
    state = grammar.start()
    assert grammar.feed(state, head)
    draft = dec._draft(grammar, state, prompt + reply, len(reply), texts, eos, 20)
    # what followed "a purple" in the request (the comma too: a value may hold one)
    assert tiny.tokenizer.decode(draft).startswith(" star on a beige background")
    assert len(dec._draft(grammar, state, prompt + reply, len(reply), texts, eos, 2)) == 2  # the limit
    # in a JSON list the draft stops where the grammar does: after the closing bracket comes the quote
    img = "image-" + "ab" * 12
    head2 = f'<call id="c1" expert="crop" image="{img}" region="[0,0,5'
    reply2 = _ids(tiny, head2)
    s2 = grammar.start()
    assert grammar.feed(s2, head2)
    prompt2 = _ids(tiny, "crop [0,0,500,700] please")
    got = tiny.tokenizer.decode(dec._draft(grammar, s2, prompt2 + reply2, len(reply2), texts, eos, 20))
    assert got == "00,700]"  # not " please": a quote must follow the list
    # plain text (an answer) is not drafted, even where it repeats the request
    text_state = grammar.start()
    said = _ids(tiny, "I drew a red")
    assert grammar.feed(text_state, "I drew a red")
    assert dec._draft(grammar, text_state, _ids(tiny, "draw a red star now") + said, len(said), texts, eos, 10) == []
    assert dec._draft(grammar, state, prompt + reply, 0, texts, eos, 10) == []  # nothing of the reply yet: no anchor


def _reference(core, grammar) -> tuple[object, list[int]]:
    """The reply decoded without drafts, and its tokens (all but the last, which the cache never holds)."""
    cache = core.new_prefix_cache()
    out = core.decode(MSGS, grammar=grammar, max_new_tokens=24, draft_tokens=0, prefix_cache=cache)
    return out, cache.ids[out.prompt_tokens:]


def _oracle(truth: list[int], prompt: int, wrong: int | None = None):
    """A stand-in for ``_draft`` that drafts the reference reply's next tokens (or, with ``wrong``, that
    token id instead)."""

    def draft(grammar, state, sequence, reply, texts, eos, limit, phrases=None, results=False):
        nxt = truth[reply:reply + max(limit, 0)]
        return [wrong] * len(nxt) if wrong is not None else nxt

    return draft


def test_a_right_draft_saves_passes_and_a_wrong_one_changes_nothing(tiny, grammar, monkeypatch) -> None:
    ref, truth = _reference(tiny, grammar)
    assert ref.tokens >= 8 and len(set(truth)) >= 8 and ref.passes == ref.tokens + (ref.finish_reason == "stop")
    monkeypatch.setattr(dec, "_draft", _oracle(truth, ref.prompt_tokens))
    cache = tiny.new_prefix_cache()
    right = tiny.decode(MSGS, grammar=grammar, max_new_tokens=24, draft_tokens=4, prefix_cache=cache)
    assert right.text == ref.text and right.finish_reason == ref.finish_reason
    assert right.accepted_tokens == right.drafted_tokens > 0
    assert right.passes <= ref.passes // 4 + 2  # 4 drafted + 1 chosen per pass
    # the cache holds the reply, not a token of a draft beyond it: the next turn's prefix is sound
    assert cache.ids[right.prompt_tokens:] == truth and cache.kv.get_seq_length() == len(cache.ids)
    wrong_id = _ids(tiny, " zebra")[0]
    assert wrong_id not in truth
    monkeypatch.setattr(dec, "_draft", _oracle(truth, ref.prompt_tokens, wrong=wrong_id))
    cache = tiny.new_prefix_cache()
    wrong = tiny.decode(MSGS, grammar=grammar, max_new_tokens=24, draft_tokens=4, prefix_cache=cache)
    assert wrong.text == ref.text and wrong.passes == ref.passes and wrong.accepted_tokens == 0
    assert cache.ids[wrong.prompt_tokens:] == truth and cache.kv.get_seq_length() == len(cache.ids)
    # max_new_tokens still counts every token, drafted ones too
    short = tiny.decode(MSGS, grammar=grammar, max_new_tokens=6, draft_tokens=4)
    assert short.tokens == 6 and short.finish_reason == "length" and ref.text.startswith(short.text)


def test_a_drafted_row_in_a_batched_pass_gets_the_logits_of_its_pass_alone() -> None:
    """run_batch with a row that keeps the logits of its last K tokens (a draft being checked) beside
    one-token rows: every row gets what its pass alone gives."""
    import torch
    from transformers import DynamicCache

    from orchestrator.core.batching import run_batch

    core = varied_core()
    cfg = core.model.config.get_text_config()
    pasts = [_ids(core, t) for t in ("a red star on a blue", "hello there", "count the circles")]
    feeds = [_ids(core, " background, then a green circle"), _ids(core, " friend"), _ids(core, " please")]
    keeps = [len(feeds[0]), 1, 1]

    def caches() -> list:
        out = []
        for p in pasts:
            kv = DynamicCache(config=cfg)
            run_batch(core, [(p, kv, None)])
            out.append(kv)
        return out

    alone = [run_batch(core, [(f, kv, None, k)])[0] for f, kv, k in zip(feeds, caches(), keeps, strict=True)]
    batched = run_batch(core, [(f, kv, None, k) for f, kv, k in zip(feeds, caches(), keeps, strict=True)])
    assert alone[0].shape == (keeps[0], alone[1].shape[0]) and batched[0].shape == alone[0].shape
    for x, y in zip(alone, batched, strict=True):
        assert torch.allclose(x, y, atol=1e-4)


def test_no_drafts_while_other_turns_decode(grammar, monkeypatch) -> None:
    """Batched turns run as many passes as the longest needs: a turn drafts only while it decodes alone,
    and its reply is the same either way."""
    core = varied_core().enable_batching()
    ref, truth = _reference(core, grammar)
    monkeypatch.setattr(dec, "_draft", _oracle(truth, ref.prompt_tokens))
    got: list = []
    with core.batcher.session():  # another turn is decoding
        t = threading.Thread(target=lambda: got.append(core.decode(MSGS, grammar=grammar, max_new_tokens=24)))
        t.start()
        t.join(timeout=120)
    assert got[0].text == ref.text and got[0].drafted_tokens == 0 and got[0].passes == ref.passes
    alone = core.decode(MSGS, grammar=grammar, max_new_tokens=24)  # through the batcher, alone
    assert alone.text == ref.text and alone.accepted_tokens > 0 and alone.passes < ref.passes


def test_the_shipped_core_copies_an_argument_in_few_passes() -> None:
    """On the shipped core a generate plan's prompt is copied from the request: prompt lookup gives the
    token-by-token plan in fewer passes."""
    if not (REPO / "models" / "core" / "core.json").exists():
        pytest.skip("no shipped core")
    from orchestrator.core.model import CoreModel
    from training.core_data import data_registry

    core = CoreModel.load(device="cpu")
    g = CommandGrammar.from_registry(data_registry(), {}, canonical=True, route=("generate",))
    msgs = [{"role": "user", "content": "please draw three purple stars and a green circle on a beige background"}]
    plain = core.decode(msgs, grammar=g, max_new_tokens=60, draft_tokens=0)
    drafted = core.decode(msgs, grammar=g, max_new_tokens=60)
    assert drafted.text == plain.text and "purple stars and a green circle" in plain.text
    assert drafted.accepted_tokens >= 5 and drafted.passes <= plain.passes - 5
