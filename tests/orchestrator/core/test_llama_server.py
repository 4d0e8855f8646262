"""The grammar-last sampler (orchestrator/core/llama_server.py) against llama-cpp-python's own grammar-first
chain, on the real SmolLM2-135M GGUF: greedy replies must be identical, token for token, while the
grammar runs over the whole vocabulary only for the tokens it rejects."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.core.grammar import CommandGrammar

pytestmark = [pytest.mark.integration, pytest.mark.slow]
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: the `remote` extra")

IMAGE = "image-" + "5e" * 12
#: a short system prompt keeps the test's prefill small; the property does not depend on the prompt
SYSTEM = ('You plan tool calls. Write calls as <call id="c1" expert="NAME" arg="value"/> and nothing else, '
          "or answer in plain text when no tool is needed.")
CASES = [("find the red circle", ("detect",)), ("cut out the dog", ("segment",)),
         ("crop the left half of the picture", ("crop",)), ("draw a cat on a sofa", ("generate",)),
         ("find the dog and then crop to it", ("detect", "crop")), ("hello, how are you?", ())]


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    from orchestrator.core.llama_server import grammar_last_llama
    from orchestrator.core.model import smollm2_gguf

    kw = {"n_ctx": 1024, "n_threads": 1, "n_threads_batch": 1, "verbose": False, "seed": 0}
    return {"first": llama_cpp.Llama(str(smollm2_gguf()), **kw),
            "last": grammar_last_llama()(str(smollm2_gguf()), **kw)}


def complete(llm: Any, request: str, gbnf: str, *, max_tokens: int = 60, **kw: Any) -> tuple[str, str]:
    """A plain completion (the chat template written out, so nothing but the sampler differs): text, finish."""
    prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n[image {IMAGE}]\n{request}<|im_end|>\n"
              "<|im_start|>assistant\n")
    out = llm.create_completion(prompt, max_tokens=max_tokens,
                                grammar=llama_cpp.LlamaGrammar.from_string(gbnf, verbose=False), **kw)
    return out["choices"][0]["text"], out["choices"][0]["finish_reason"]


@pytest.mark.parametrize(("request_", "route"), CASES, ids=[c[0] for c in CASES])
def test_greedy_replies_are_identical_in_either_order(models, registry, request_, route) -> None:
    from orchestrator.core.llama_server import GrammarLastSampler

    kw: dict[str, Any] = {"route": route} if route else {"allow_calls": False}
    grammar = CommandGrammar.from_registry(registry, {IMAGE: "image"}, canonical=True, **kw)
    first, finish = complete(models["first"], request_, grammar.gbnf(), temperature=0.0)
    seen: list[GrammarLastSampler] = []
    original = GrammarLastSampler.sample

    def spy(self: GrammarLastSampler, ctx: Any, idx: int = -1) -> int:
        seen.append(self)
        return original(self, ctx, idx)

    GrammarLastSampler.sample = spy  # type: ignore[method-assign]
    try:
        last, _ = complete(models["last"], request_, grammar.gbnf(), temperature=0.0)
    finally:
        GrammarLastSampler.sample = original  # type: ignore[method-assign]
    assert last == first
    assert seen, "the grammar-last sampler was not used"
    sampler = seen[-1]
    # the grammar let most of the model's own choices through without a pass over the whole vocabulary,
    # and rejected some where it forces the call's text (a plain answer may need no rejection at all)
    assert sampler.resampled < sampler.sampled, (sampler.resampled, sampler.sampled)
    if route:
        assert sampler.resampled > 0, sampler.sampled
    if finish == "stop":
        assert grammar.complete(last), last


def test_penalties_keep_the_orders_identical(models, registry) -> None:
    """Penalties run before the grammar in both chains (they change logits, the grammar only masks)."""
    grammar = CommandGrammar.from_registry(registry, {IMAGE: "image"}, canonical=True, route=("detect",))
    kw = {"temperature": 0.0, "repeat_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.5}
    assert complete(models["last"], "find every blue square", grammar.gbnf(), **kw)[0] == \
        complete(models["first"], "find every blue square", grammar.gbnf(), **kw)[0]


def test_sampled_replies_stay_inside_the_grammar(models, registry) -> None:
    """With temperature the draws may differ from grammar-first's (as in llama.cpp's server), but a
    rejected draw is resampled under the grammar, so every reply is still a sentence of it."""
    grammar = CommandGrammar.from_registry(registry, {IMAGE: "image"}, canonical=True, route=("segment",))
    for seed in range(3):
        text, finish = complete(models["last"], "outline the cat", grammar.gbnf(), temperature=1.0, seed=seed,
                                max_tokens=80)
        assert grammar.complete(text) if finish == "stop" else grammar.viable(text), (finish, text)


def test_a_sampler_without_grammar_is_left_as_it_was(models) -> None:
    from orchestrator.core.llama_server import GrammarLastSampler

    chain = models["last"]._init_sampler(temp=0.0)
    assert not isinstance(chain, GrammarLastSampler)
    chain.close()
