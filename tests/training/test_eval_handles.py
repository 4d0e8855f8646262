"""``switchboard eval core`` shows the core what the loop shows it: short handles (img1, mask1 …) for a
core made for them, artifact ids otherwise; replies are mapped back to ids before they are scored."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.format import render
from training import core as recipe
from training.wild import WildItem

TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "core" / "tokenizer"
ID = re.compile(r"\b(?:image|mask|boxes|overlay)-[0-9a-f]{24}\b")


class EchoCore:
    """Answers every image request with an OCR call on the first image it can name (a handle or an id),
    and records the prompts and grammars it was given."""

    info: dict[str, Any] = {}

    def __init__(self, short_handles: bool) -> None:
        from orchestrator.core.model import load_tokenizer

        self.short_handles = short_handles
        self.tokenizer = load_tokenizer(TOKENIZER)
        self.prompts: list[str] = []
        self.names: list[set[str]] = []

    def _reply(self, messages: list[dict], names: set[str]) -> str:
        self.prompts.append(render(messages))
        self.names.append(names)
        images = sorted(n for n, kind in names.items() if kind == "image") if isinstance(names, dict) else []
        return f'<call id="c1" expert="ocr" image="{images[0]}"/>' if images else "No image here."

    def decode(self, messages: list[dict], images: dict, *, grammar: Any, max_new_tokens: int = 120, **kw: Any):
        class Out:
            text = self._reply(messages, dict(grammar.artifacts))

        return Out()

    def generate_batch(self, convs: list, *, max_new_tokens: int = 120, logits_processor: Any = None) -> list[str]:
        arts = dict(logits_processor[0].grammar.artifacts) if logits_processor else {}
        return [self._reply(m, {k: v for k, v in arts.items() if k in render(m)}) for m, _ in convs]


@pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(), reason="models/core/tokenizer missing")
@pytest.mark.parametrize("short_handles", [True, False])
def test_heldout_eval_reads_and_scores_as_the_loop_does(short_handles: bool) -> None:
    core = EchoCore(short_handles)
    res = recipe.evaluate(core, n=12, human=False, grammar=True, kind="call", log=lambda *a, **k: None)
    assert core.prompts
    with_ids = [p for p in core.prompts if ID.search(p)]
    with_handles = [p for p in core.prompts if re.search(r"\bimg1\b", p)]
    if short_handles:
        assert not with_ids and with_handles and all("img1" in n for n in core.names if n)
    else:
        assert with_ids and not with_handles
    # what is scored holds ids again: an OCR call on the attached image is right wherever OCR was asked
    got = [e["got"] for e in res["errors"]]
    assert not any("img1" in g for g in got)
    assert res["n"] > 0


@pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(), reason="models/core/tokenizer missing")
def test_wild_eval_shows_the_attached_image_as_a_handle() -> None:
    core = EchoCore(True)
    items = [WildItem("a", "read the sign", "attached", ("ocr",), category="ocr"),
             WildItem("b", "hello there", None, (), category="none")]
    res = recipe.evaluate_wild(core, items=items, grammar=True, batch=2)
    assert any("img1" in p for p in core.prompts) and not any(ID.search(p) for p in core.prompts)
    assert res["expert_accuracy"] == 1.0
    core = EchoCore(False)
    res = recipe.evaluate_wild(core, items=items, grammar=True, batch=2)
    assert any(ID.search(p) for p in core.prompts) and res["expert_accuracy"] == 1.0
