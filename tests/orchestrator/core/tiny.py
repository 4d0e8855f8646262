"""A tiny random core with the shipped tokenizer and a tiny vision tower: fast, untrained, for the
tests of the decoding machinery (the same text and images give the same tokens as the shipped core)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = REPO / "models" / "core" / "tokenizer"


def tiny_core(tokenizer: Any = None) -> Any:
    """A ``CoreModel`` with random weights (seed 0); skips the test when the tokenizer is missing."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    from orchestrator.core import model as cm

    if tokenizer is None:
        if not (TOKENIZER / "tokenizer.json").exists():
            pytest.skip("models/core/tokenizer is not there (train the core first)")
        tokenizer = cm.load_tokenizer(TOKENIZER)
    cfg = cm.llava_config(cm.tiny_text_config(len(tokenizer)), cm.vision_config(tiny=True),
                          tokenizer.convert_tokens_to_ids(cm.IMAGE_TOKEN))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg.text_config).state_dict()
    return cm.CoreModel(cm.assemble(cfg, lm).eval(), tokenizer)
