"""Bring your own core: a real llama.cpp server (llama-cpp-python's OpenAI-compatible server, serving the
SmolLM2-135M-Instruct GGUF the project installs) as the planner, through the loop and through the API.

The 135M model is weak; these tests are about the plumbing and the grammar. The router picks the
first turn's expert, the grammar (sent as GBNF in the request's ``grammar`` field) makes the call
well formed, the real detect expert runs it, and the model answers from its result. Every reply the
server wrote — plan, repair if any, answer — is checked to be in the turn's command grammar.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from orchestrator.core.grammar import CommandGrammar
from orchestrator.core.loop import CallEvent, ChatResult, StageEvent
from orchestrator.core.remote import RemoteCore, RemoteReply
from tests.api.conftest import API_KEY, LiveServer, free_port, image_message, make_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: the `remote` extra (`make install` adds it; "
    "by hand: pip install -e '.[remote]')")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's server on a free loopback port, through ``orchestrator.core.llama_server`` (the
    grammar checked on the sampled token first, as llama.cpp's own server does; one thread: on a shared
    CPU, llama.cpp's threads wait on each other); yields its OpenAI base URL."""
    from orchestrator.core.model import smollm2_gguf

    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.core.llama_server", "--model", str(smollm2_gguf()),
                                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1",
                                 "--n_threads_batch", "1", "--verbose", "False"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the llama.cpp server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the llama.cpp server did not start in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RecordingCore(RemoteCore):
    """The remote core, keeping each reply with the grammar it was asked to follow."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.replies: list[tuple[CommandGrammar, RemoteReply]] = []

    def decode(self, messages: list[dict], images: Any = None, *, grammar: CommandGrammar, **kw: Any) -> RemoteReply:
        out = super().decode(messages, images, grammar=grammar, **kw)
        self.replies.append((grammar, out))
        return out


def scene() -> Image.Image:
    """A shapes-world picture: a red circle and a blue square on grey."""
    im = Image.new("RGB", (256, 256), (128, 128, 128))
    d = ImageDraw.Draw(im)
    d.ellipse((40, 60, 120, 140), fill=(220, 30, 30))
    d.rectangle((150, 120, 220, 190), fill=(30, 60, 220))
    return im


def assert_in_grammar(core: RecordingCore) -> None:
    """Every attempt at every reply is a complete sentence of the grammar the loop asked for."""
    assert core.replies
    for grammar, reply in core.replies:
        for draft in reply.drafts:
            assert grammar.complete(draft), f"a reply outside its grammar: {draft!r}"


@pytest.fixture(scope="module")
def router() -> Any:
    from orchestrator.core.router import Router

    return Router.load()


def test_a_two_turn_chat_through_the_loop(llama_server, router, registry, store, tmp_path) -> None:
    from orchestrator.core.loop import Assistant
    from orchestrator.dispatch import LocalDispatcher
    from orchestrator.session import ConversationStore

    core = RecordingCore.from_spec(f"openai:{llama_server}", registry=registry, send_images=False)
    # short answers: the 135M model rambles to its budget inside a plain-text answer
    assistant = Assistant(core, registry, store, LocalDispatcher(registry, store),
                          ConversationStore(tmp_path / "conv"), router=router, max_new_tokens=40)
    img = store.put_image(scene()).id
    events: list[Any] = []
    first = assistant.run("find the red circle", images=[img], on_event=events.append)

    # the router chose the expert, the grammar made the model write its call, and the call ran
    assert first.route and [c.expert for c in first.calls] == first.route, first.plan
    assert first.calls[0].status == "done", (first.plan, first.calls)
    assert first.calls[0].args["image"] == img
    # ... then the model answered from the results (a second request, with the tool turn in it)
    answer_grammar, answer = core.replies[-1]
    assert not answer_grammar.allow_calls and first.answer
    conv = assistant.conversations.get(first.conversation_id)
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    stages = [e.stage for e in events if isinstance(e, StageEvent)]
    assert stages == ["planning", "executing", "answering", "done"]
    assert {e.stage for e in events if isinstance(e, CallEvent)} >= {"started", "done"}
    assert isinstance(events[-1], ChatResult)

    # a follow-up that points back is planned by the model alone, under the whole registry's grammar (one
    # that names its own object, "now find the blue square", would be routed like a first request)
    second = assistant.run("now segment it", conversation_id=first.conversation_id)
    assert second.route is None
    assert_in_grammar(core)
    assert all(grammar.canonical for grammar, _ in core.replies)  # the loop's grammar, sent as GBNF
    print(json.dumps({"first_plan": first.plan, "first_answer": first.answer, "second_plan": second.plan,
                      "second_answer": second.answer,
                      "attempts": [r.attempts for _, r in core.replies]}, indent=1))


def test_without_the_grammar_the_same_model_does_not_write_the_call(llama_server, registry) -> None:
    """What the grammar is for: asked the same routed plan without it, the 135M model's reply is not the
    routed call (so the test above passes because of the grammar, not by luck)."""
    core = RemoteCore.from_spec(f"openai:{llama_server}", registry=registry, send_images=False, repair=False)
    img = "image-" + "5e" * 12
    grammar = CommandGrammar.from_registry(registry, {img: "image"}, route=("detect",), canonical=True)
    messages = [{"role": "user", "content": "find the red circle", "images": [img]}]
    free = core.decode(messages, {}, grammar=grammar, max_new_tokens=80, constrain=False)
    bound = core.decode(messages, {}, grammar=grammar, max_new_tokens=80)
    assert grammar.complete(bound.text), bound.text
    assert not grammar.complete(free.text), free.text


def test_the_api_streams_a_turn_of_the_remote_core(llama_server, registry, tmp_path, monkeypatch) -> None:
    """The composition root builds the remote core from settings; the API streams its stages, the call
    and the answer as for the embedded core."""
    from openai import OpenAI

    from orchestrator.api.app import create_app
    from orchestrator.runtime import build_assistant

    settings = make_settings(tmp_path, core=f"openai:{llama_server}#smollm2", core_images=False)
    assistant = build_assistant(settings, registry=registry)
    assert isinstance(assistant.core, RemoteCore) and assistant.router is not None
    assistant.max_new_tokens = 40  # a short answer (see above)
    buf = Path(tmp_path / "scene.png")
    scene().save(buf)
    with LiveServer(create_app(settings, assistant=assistant)) as live:
        client = OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        stream = client.chat.completions.create(model="switchboard", stream=True,
                                                messages=[image_message("find the red circle", buf.read_bytes())])
        stages, calls, text = [], [], ""
        for chunk in stream:
            event = (chunk.model_extra or {}).get("event")
            if event and event.get("type") == "stage":
                stages.append(event["stage"])
            for choice in chunk.choices:
                text += choice.delta.content or ""
                calls += choice.delta.tool_calls or []
        client.close()
    assistant.dispatcher.close()
    assert stages == ["planning", "executing", "answering", "done"]
    assert [c.function.name for c in calls] == ["detect"]
    assert text.strip()


def test_eval_core_prints_the_remote_core_beside_the_embedded_one(llama_server, monkeypatch, capsys) -> None:
    """``switchboard eval core --core openai:… --compare embedded``: both cores on the same requests (the
    first of the dev set), one table, and --json with both results."""
    from switchboard.settings import get_settings
    from training.core import main_eval

    monkeypatch.setenv("SWITCHBOARD_CORE_IMAGES", "false")  # the SmolLM2 GGUF reads no image
    get_settings.cache_clear()
    try:
        argv = ["--set", "dev", "--limit", "4", "--core", f"openai:{llama_server}#smollm2", "--compare", "embedded"]
        assert main_eval([*argv, "--json"]) == 0
        both = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert main_eval(argv) == 0
        table = capsys.readouterr().out
    finally:
        get_settings.cache_clear()
    assert both["set"] == "dev" and set(both) == {"set", "remote", "embedded"}
    remote, embedded = both["remote"], both["embedded"]
    assert remote["n"] == embedded["n"] == 4 and remote["routed"] == embedded["routed"]
    assert remote["core"].endswith("#smollm2") and remote["core_grammar"] == "gbnf" and "core" not in embedded
    for r in (remote, embedded):
        assert 0.0 <= r["expert_accuracy"] <= 1.0 and r["per_category"]
    header, *rows = table.strip().splitlines()[1:]
    assert header.split() == ["remote", "embedded"]
    figures = {row.split()[0]: row.split()[1:] for row in rows}
    assert len(figures["expert_accuracy"]) == 2 and figures["n"] == ["4", "4"]
    assert any(k.startswith("per_expert.") for k in figures)
