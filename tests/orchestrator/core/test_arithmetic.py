"""Arithmetic in a plain answer is recomputed (orchestrator.core.arithmetic), in the loop too."""

from __future__ import annotations

import pytest

from orchestrator.core.arithmetic import checked_arithmetic
from orchestrator.dispatch import LocalDispatcher
from orchestrator.session import ConversationStore
from tests.orchestrator.core.test_loop import ScriptedCore, reg  # noqa: F401 (the fixture)


@pytest.mark.parametrize(("answer", "fixed"), [
    ("12 * 7 = 88.", "12 * 7 = 84."),
    ("17 + 25 = 41", "17 + 25 = 42"),
    ("5 - 9 = 4.", "5 - 9 = -4."),
    ("3 × 4 = 13, and 2 x 2 = 5", "3 × 4 = 12, and 2 x 2 = 4"),
    ("7 / 2 = 3", "7 / 2 = 3.5"),
    ("10 ÷ 3 = 3.3", "10 ÷ 3 = 3.3333"),
])
def test_wrong_results_are_replaced(answer, fixed):
    out, corrections = checked_arithmetic(answer)
    assert out == fixed
    assert corrections and all(" is " in c for c in corrections)


@pytest.mark.parametrize("answer", [
    "12 * 7 = 84.", "10 / 4 = 2.5", "1 / 3 = 0.3333", "I found 3 red circles.", "x = 5", "v2.1 = 3",
    "call c1 at 12:30 = lunch", "5 / 0 = 1",
])
def test_right_or_unreadable_ones_are_left_alone(answer):
    assert checked_arithmetic(answer) == (answer, [])


def test_the_loop_corrects_a_plain_answer(reg, store, tmp_path):  # noqa: F811
    from orchestrator.core.loop import Assistant

    core = ScriptedCore(lambda m: "12 * 7 = 88.")
    assistant = Assistant(core, reg, store, LocalDispatcher(reg, store), ConversationStore(tmp_path / "c"))
    result = assistant.run("what's 12 times 7?")
    assert result.answer == "12 * 7 = 84."
    assert result.corrections == ["12 * 7 = 88 is 84"]
    # the conversation keeps what was said, not the core's guess
    conv = assistant.conversations.get(result.conversation_id)
    assert conv.messages[-1]["content"] == "12 * 7 = 84."
