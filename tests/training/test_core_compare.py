"""``switchboard eval core --core openai:… --compare embedded``'s pieces that need no model: the table, the
flags, and what evaluate_wild asks a remote core for (a server that answers by script, over httpx's mock
transport; the real llama.cpp server runs the whole command in tests/api/test_remote_core.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from orchestrator.core.loop import TOKENS_PER_CALL
from orchestrator.core.remote import RemoteCore
from training.core import NO_CALL_BUDGET, evaluate_wild, main_eval, side_by_side
from training.wild import WildItem

CALL = '<call id="c1" expert="generate" prompt="a cat on a sofa"/>'


def test_side_by_side_is_one_table_with_a_column_per_core() -> None:
    remote = {"expert_accuracy": 0.5, "none_accuracy": None, "per_expert": {"detect": 0.25},
              "per_category": {"detect": 0.25}, "n": 4,
              "counts": {"detect": 4}, "core": "openai:http://h/v1#m"}
    embedded = {"expert_accuracy": 1.0, "none_accuracy": 1.0, "per_expert": {"detect": 1.0, "crop": 0.5}, "n": 4}
    lines = side_by_side({"remote": remote, "embedded": embedded}).splitlines()
    assert lines[0].split() == ["remote", "embedded"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["expert_accuracy"] == ["0.5", "1.0"]
    assert rows["none_accuracy"] == ["-", "1.0"]  # a figure with nothing to score is shown as such
    assert rows["per_expert.detect"] == ["0.25", "1.0"] and rows["per_expert.crop"] == ["-", "0.5"]
    assert rows["n"] == ["4", "4"] and rows["core"] == ["openai:http://h/v1#m", "-"]
    assert not any(k.startswith(("counts", "per_category")) for k in rows)  # per_expert says it once
    assert list(rows)[:2] == ["expert_accuracy", "none_accuracy"]  # the headline figures first
    assert len({len(line.rstrip()) for line in lines}) == 1  # the columns line up


@pytest.mark.parametrize("argv", [["--compare", "embedded"],
                                  ["--core", "openai:http://127.0.0.1:9/v1#m", "--compare", "embedded",
                                   "--errors", "/tmp/x.json"]])
def test_compare_needs_a_remote_core_and_no_errors_file(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main_eval(argv)
    assert e.value.code == 2
    assert "--compare" in capsys.readouterr().err


@dataclass
class Route:
    experts: tuple[str, ...]


class ScriptedRouter:
    """Routes "draw …" to generate and everything else to no expert."""

    def route_batch(self, texts: list[str], has_image: list[bool], registry: Any) -> list[Route]:
        return [Route(("generate",) if t.startswith("draw") else ()) for t in texts]


def scripted_core(grammar: str) -> tuple[RemoteCore, list[dict[str, Any]]]:
    from training.core_data import data_registry

    bodies: list[dict[str, Any]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        routed = "generate" in str(body.get("grammar", "")) or "in this order: generate" in body["messages"][0]["content"]
        text = CALL if routed else "Fine, thanks."
        frames = [{"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]}]
        sse = "".join(f"data: {json.dumps(f)}\n\n" for f in frames) + "data: [DONE]\n\n"
        return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})

    core = RemoteCore("http://127.0.0.1:9/v1", "m", registry=data_registry(), grammar=grammar, send_images=False,
                      transport=httpx.MockTransport(handle))
    return core, bodies


ITEMS = [WildItem("a", "draw a cat on a sofa", None, ("generate",), category="generate"),
         WildItem("b", "hello there", None, (), category="none"),
         WildItem("c", "what is two plus two?", None, (), category="none")]


def test_a_reply_routed_to_no_call_gets_a_short_budget_where_the_grammar_holds() -> None:
    core, bodies = scripted_core("gbnf")
    res = evaluate_wild(core, router=ScriptedRouter(), items=ITEMS)
    assert res["expert_accuracy"] == 1.0 and res["n"] == 3 and res["routed"] == 3
    budgets = {b["messages"][-1]["content"]: b["max_tokens"] for b in bodies}
    assert budgets == {"draw a cat on a sofa": max(120, TOKENS_PER_CALL), "hello there": NO_CALL_BUDGET,
                       "what is two plus two?": NO_CALL_BUDGET}
    assert all(b["grammar"] for b in bodies)  # ... because every one of them was sent its grammar
    assert res["seconds_per_request"] is not None


def test_without_a_grammar_the_server_keeps_the_whole_budget() -> None:
    """A server that is not sent the grammar (SWITCHBOARD_CORE_GRAMMAR=none) could write a call in any
    reply: every reply then gets the whole budget, so the figures mean the same."""
    core, bodies = scripted_core("none")
    res = evaluate_wild(core, router=ScriptedRouter(), items=ITEMS)
    assert res["n"] == 3
    assert sorted(b["max_tokens"] for b in bodies) == [120, 120, max(120, TOKENS_PER_CALL)]
    assert not any("grammar" in b for b in bodies)


def test_the_dev_set_reads_as_the_router_reads_it() -> None:
    """``--set dev`` scores the same items ``switchboard eval router --set dev`` does (read twice: the router
    recipe imports training.core, so training.core cannot import it back)."""
    from training.core import _dev_items
    from training.router import load_dev

    assert _dev_items() == load_dev() and len(load_dev()) > 100
