"""Jump-forward decoding: greedy, grammar-constrained, with forced text appended without forward passes.

``decode(core, …)`` decodes the next assistant turn of a ``CoreModel``: one forward pass per token the
model chooses; where the grammar admits exactly one continuation (``grammar.forced``: a tag's syntax, a
routed expert's name, the only image's id …) that text is fed in the next pass together with the last
chosen token (SGLang's jump-forward), the reply re-tokenised and the KV cache rolled back to the common
prefix. ``CoreModel.decode`` is this function.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.core.format import images_in

if TYPE_CHECKING:
    from PIL import Image



@dataclass
class DecodeResult:
    """One decoded reply and what it cost: forward ``passes``, reply ``tokens`` (``forced_tokens`` of
    them appended by jump-forward, ``accepted_tokens`` checked in a pass with the token before them),
    ``prompt_tokens``; ``finish_reason`` is "stop", "length" or
    "cancelled"."""

    text: str
    finish_reason: str = "stop"
    passes: int = 0
    tokens: int = 0
    forced_tokens: int = 0
    prompt_tokens: int = 0
    #: prompt lookup: tokens drafted, and of those the ones the model chose (each saved a pass)
    drafted_tokens: int = 0
    accepted_tokens: int = 0


def decode(core: Any, messages: list[dict], images: dict[str, Image.Image] | None = None, *, grammar: Any,
           max_new_tokens: int = 160, jump_forward: bool = True,
           on_text: Callable[[str], None] | None = None, system: str | None = None,
           prefix_cache: Any = None,
           should_stop: Callable[[], bool] | None = None, batched: bool = True,
           sampling: Any = None, draft_tokens: int | None = None) -> DecodeResult:
    """Greedy grammar-constrained decoding of the next assistant turn, with jump-forward.

    One forward pass per token the model chooses. Where the grammar admits exactly one continuation
    (``grammar.forced``: a tag's syntax, a routed expert's name, the only image's id …) it is appended
    without asking the model, and its tokens go into the next pass together with the last chosen
    token (a prefill of several tokens extends the KV cache in one pass). The reply is re-tokenised
    after each jump, as the model saw replies in training (prompt and reply tokenised apart), and the
    cache is rolled back to the longest common token prefix (SGLang's jump-forward does the same).
    ``jump_forward=False`` is plain token-by-token constrained decoding by the same loop (the
    reference the jump-forward replies are checked against). ``should_stop`` is asked before every
    pass: True ends the reply (``finish_reason="cancelled"``). ``max_new_tokens`` counts reply
    tokens, forced ones included (``finish_reason="length"`` when reached). ``prefix_cache`` as
    for :meth:`generate`. ``batched``: run the forward passes through the core's ``batcher`` (a
    :class:`~orchestrator.core.batching.StepBatcher`, shared by the turns decoding at the same time)
    when it has one; False calls the model directly. ``sampling`` (an
    ``orchestrator.core.sampling.Sampling``): the tokens the model chooses are drawn with its
    temperature, nucleus, seed and penalties instead of greedily.

    Drafts (greedy only): inside a tag, where the reply's last words occur earlier in the prompt or the
    reply (an argument copied from the request: ``prompt="a red star on a blue background"``), the tokens
    that followed them there (prompt lookup); in an answer, what the core's own answer sentences continue
    with (``core.phrases``, :mod:`orchestrator.core.phrases`: "Sorry, I can't help with …: I have no
    expert for it."), or after calls, where those know nothing, what followed the answer's last words in
    the tool turn (the results it reports). As far as the grammar admits them (at most ``draft_tokens``, default
    ``DRAFT_TOKENS``; ``jump_forward=False``: none) they are fed in the same pass as the last chosen token;
    the model's choice at each of their positions is read from that one pass, the draft is taken as far
    as it agrees, and the rest leaves the cache. The reply is the one greedy decoding gives; a draft that
    is right saves a pass per token. Drafts are made only while no other turn decodes beside this one:
    batched turns run in lockstep, as many passes as the longest of them needs, so a draft shortens a
    turn that seldom sets that count while its rows make every shared pass dearer (16 held-out turns
    batched: 4.7 s with drafts, 4.2 s without; with the answer phrases, drafting at most 32 tokens per
    batched pass among the turns cut the passes from 24 to 17 but not the time; benchmarks/README.md).
    """
    import torch

    from orchestrator.core.grammar import _eos_ids, token_texts

    texts = token_texts(core.tokenizer)
    eos = set(_eos_ids(core.tokenizer)) | {core.end_id}
    item = core.encode(messages, images or {}, system=system)
    prompt = item["input_ids"]
    image_ids = images_in(messages)
    reused, fed_images = 0, item["images"]
    if prefix_cache is not None:
        reused = prefix_cache.take(prompt, image_ids, core.image_token_id, core.image_seq_length)
        skip = sum(t == core.image_token_id for t in prompt[:reused]) // core.image_seq_length
        fed_images = fed_images[skip:]
    kv = prefix_cache.kv if prefix_cache is not None and reused else None
    if kv is None:
        from transformers import DynamicCache

        kv = DynamicCache(config=core.model.config.get_text_config())
    pixels = core.pixel_values(fed_images).to(core.device, core.model.dtype) if fed_images else None
    state = grammar.start()
    reply: list[int] = []  # the reply's tokens so far
    cached = reused  # how many tokens of prompt + reply the cache holds
    passes, forced_tokens, finish = 0, 0, "stop"
    drafted_tokens = accepted_tokens = 0
    if draft_tokens is None:
        draft_tokens = DRAFT_TOKENS if jump_forward else 0
    sent = ""
    sampler = sampling.sampler() if sampling is not None else None

    def stream() -> None:
        nonlocal sent
        if on_text is None:
            return
        text = core.tokenizer.decode(reply, skip_special_tokens=True)
        if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
            on_text(text[len(sent):])
            sent = text

    batcher = getattr(core, "batcher", None) if batched else None
    phrases = getattr(core, "phrases", None)  # drafts for answers (orchestrator.core.phrases)
    results = any(m.get("role") == "tool" for m in messages)  # an answer after calls copies their results
    with torch.inference_mode(), (batcher.session() if batcher is not None else nullcontext()):
        while True:
            jump = grammar.forced(state) if jump_forward else ""
            if jump:
                done = core.tokenizer.decode(reply, skip_special_tokens=False)
                canonical = core.tokenizer(done + jump, add_special_tokens=False)["input_ids"]
                # The last token of the jump is left to the model when a longer token could take its
                # place (`"` before `"/>`, a space before ` image`): the core only ever saw the
                # tokenizer's own split of whole replies, never a lone `"` where `"/>` belongs.
                if canonical and _may_merge(core, grammar, canonical, texts):
                    canonical = canonical[:-1]
                text = core.tokenizer.decode(canonical, skip_special_tokens=False)
                if len(text) > len(done):
                    common = 0
                    while common < min(len(reply), len(canonical)) and reply[common] == canonical[common]:
                        common += 1
                    forced_tokens += len(canonical) - common
                    if cached > len(prompt) + common:  # re-tokenised inside the cache: roll back
                        kv.crop(-(cached - len(prompt) - common))
                        cached = len(prompt) + common
                    reply = canonical
                    state = grammar.start()
                    grammar.feed(state, text)
                    stream()
            if len(reply) >= max_new_tokens:
                finish = "length"
                break
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
            feed = (prompt + reply)[cached:]
            if not feed:  # everything is cached already: recompute the last token for its logits
                kv.crop(-1)
                cached -= 1
                feed = (prompt + reply)[cached:]
            # drafts (prompt lookup, the core's answer phrases), checked in this pass; only while this turn
            # decodes alone (see the docstring)
            alone = batcher is None or batcher.decoding <= 1
            draft = _draft(grammar, state, prompt + reply, len(reply), texts, eos,
                           min(draft_tokens, max_new_tokens - len(reply) - 1), phrases=phrases, results=results) \
                if draft_tokens and sampler is None and alone else []
            feed = feed + draft
            step_pixels = pixels if passes == 0 else None
            if batcher is not None:  # with whatever other turns are decoding now (orchestrator.core.batching)
                logits = batcher.step(feed, kv, step_pixels, keep=len(draft) + 1)
            else:
                kwargs: dict[str, Any] = {"input_ids": torch.tensor([feed], device=core.device),
                                          "cache": kv, "use_cache": True, "logits_to_keep": len(draft) + 1}
                if step_pixels is not None:
                    kwargs["pixel_values"] = step_pixels
                out = _forward(core, kwargs)
                kv, logits = out.cache, out.logits[0, -1] if not draft else out.logits[0]
            passes += 1
            cached += len(feed)
            per_position = logits[None] if not draft else logits  # the last chosen token's, then each draft token's
            ended, accepted, fresh = False, 0, False  # fresh: the reply's last token is not in the cache yet
            for j in range(len(draft) + 1):
                scores, tid = per_position[j].float(), None
                if sampler is not None:
                    scores = sampler.adjust(scores, reply)
                    tid = sampler.pick(scores, lambda t, st=state: _allowed(grammar, st, t, texts, eos))
                if tid is None:
                    tid = _best_token(grammar, state, scores, texts, eos)
                if tid is None or tid in eos:
                    ended = True
                    break
                reply.append(tid)
                grammar.feed(state, texts[tid])
                if j == len(draft) or tid != draft[j]:
                    fresh = True
                    break
                accepted += 1
                if len(reply) >= max_new_tokens:
                    break
            drafted_tokens += len(draft)
            accepted_tokens += accepted
            held = len(prompt) + len(reply) - fresh
            if cached > held:  # the rejected part of the draft leaves the cache
                kv.crop(held - cached)  # transformers 5: a negative count removes that many
                cached = held
            stream()
            if ended:
                break
    total = prompt + reply
    if prefix_cache is not None:
        prefix_cache.keep(total, image_ids, kv, prompt=len(prompt), reused=reused)
    text = core.tokenizer.decode(reply, skip_special_tokens=True)
    return DecodeResult(text=text, finish_reason=finish, passes=passes, tokens=len(reply),
                        forced_tokens=forced_tokens, prompt_tokens=len(prompt), drafted_tokens=drafted_tokens,
                        accepted_tokens=accepted_tokens)


#: tokens drafted at most per pass by prompt lookup (``_draft``)
DRAFT_TOKENS = 10
#: the longest run of the reply's last tokens looked up (then shorter ones)
DRAFT_NGRAM = 3

_KEYS: dict[int, list[str]] = {}  # per token_texts list: each token's text as prompt lookup compares it


def _draft(grammar: Any, state: Any, sequence: list[int], reply: int, texts: list[str], eos: set[int],
           limit: int, phrases: Any = None, results: bool = False) -> list[int]:
    """Inside a call's tag (an argument's value), prompt lookup (Saxena's prompt-lookup decoding, as
    transformers' ``prompt_lookup_num_tokens``): the tokens that followed the latest earlier occurrence
    of the last ``DRAFT_NGRAM`` (then fewer) tokens of ``sequence`` (prompt + reply; ``reply``: how many
    of its tokens are the reply's), compared by text without case or surrounding spaces (the request's
    " Blue" drafts after the reply's "blue"). In plain text (an answer) ``phrases`` (a
    :class:`~orchestrator.core.phrases.PhraseDrafter`, the core's own answer sentences) drafts, when the
    core has them; where they have nothing, prompt lookup only in an answer after calls (``results``: the
    prompt holds tool turns, whose results the answer reports: "I found 1 purple square:
    (539,486,771,723)."). Before any call the request's words were almost never right in an answer (none
    of the 54 tokens drafted so in the answers of the benchmark's 33 held-out replies). Cut where the
    grammar stops admitting them; [] when there is nothing to draft.
    """
    from orchestrator.core.grammar import TEXT

    if limit <= 0 or reply == 0:
        return []
    if state.mode == TEXT:
        draft = _admitted(grammar, state, phrases.draft(sequence[-reply:], limit), texts, eos) if phrases else []
        if draft or not results:
            return draft
    keys = _KEYS.get(id(texts))
    if keys is None:
        keys = _KEYS[id(texts)] = [t.strip().lower() for t in texts]
    n_seq = len(sequence)
    for n in range(min(DRAFT_NGRAM, reply), 0, -1):
        tail = [keys[t] for t in sequence[-n:]]
        if n == 1 and not any(c.isalnum() for c in tail[0]):  # a lone space or quote is no anchor
            return []
        for i in range(n_seq - n - 1, -1, -1):
            if keys[sequence[i + n - 1]] == tail[-1] and [keys[t] for t in sequence[i:i + n]] == tail:
                draft = _admitted(grammar, state, sequence[i + n:i + n + limit], texts, eos)
                if draft:
                    return draft
    return []


def _admitted(grammar: Any, state: Any, tokens: list[int], texts: list[str], eos: set[int]) -> list[int]:
    """The longest prefix of ``tokens`` the grammar admits after ``state``."""
    state = state.copy()
    out: list[int] = []
    for t in tokens:
        if t in eos or not _allowed(grammar, state, t, texts, eos):
            break
        grammar.feed(state, texts[t])
        out.append(t)
    return out


def _forward(core: Any, kwargs: dict[str, Any]) -> Any:
    """One pass of its own, on the core's compute thread where it has one (``CoreModel.run``)."""
    import torch

    def run() -> Any:
        with torch.inference_mode():
            return core.model(**kwargs)

    return core.run(run) if hasattr(core, "run") else run()


def _may_merge(core: Any, grammar: Any, ids: list[int], texts: list[str]) -> bool:
    """Whether a longer token that starts with the last token's text could follow the rest: some
    token extends it by a character the grammar allows there (a superset of the exact test, which
    only costs a pass where it holds back needlessly)."""
    index = _EXTENSIONS.get(id(core.tokenizer))
    if index is None:
        index = _EXTENSIONS[id(core.tokenizer)] = _extensions(texts)
    following = index.get(texts[ids[-1]])
    if not following:
        return False
    state = grammar.start()
    if not grammar.feed(state, core.tokenizer.decode(ids, skip_special_tokens=False)):
        return False
    return any(grammar.feed(state.copy(), c) for c in following)

def _best_token(grammar: Any, state: Any, scores: Any, texts: list[str], eos: set[int]) -> int | None:
    """The highest-scoring token that keeps the reply viable (None: none among the first 4,096)."""
    import torch

    for k in (16, 4096):
        order = torch.topk(scores, min(k, scores.shape[0])).indices.tolist()
        for tid in order[16 if k > 16 else 0:]:
            if _allowed(grammar, state, tid, texts, eos):
                return tid
    return None


def _allowed(grammar: Any, state: Any, tid: int, texts: list[str], eos: set[int]) -> bool:
    """Whether token ``tid`` keeps the reply viable."""
    if tid in eos:
        return grammar.can_end(state)
    return grammar.free_text(state, texts[tid]) or grammar.feed(state.copy(), texts[tid])


_EXTENSIONS: dict[int, dict[str, set[str]]] = {}  # per tokenizer: see _extensions


def _extensions(texts: list[str]) -> dict[str, set[str]]:
    """For each token text that begins a longer token: the characters that follow it there."""
    known = set(texts)
    out: dict[str, set[str]] = {}
    for t in texts:
        for k in range(1, len(t)):
            if t[:k] in known:
                out.setdefault(t[:k], set()).add(t[k])
    return out
