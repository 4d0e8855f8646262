"""A remote core: any OpenAI-compatible chat endpoint as the planner (vLLM, Ollama, llama.cpp, …).

``SWITCHBOARD_CORE=openai:<base_url>#<model>`` (``SWITCHBOARD_CORE_API_KEY`` optional) makes the loop
plan and answer through ``POST <base_url>/chat/completions`` instead of the embedded core. Everything
around the core stays as it is: the router, the grammar derived from the registry, validation, dispatch,
fusion and the events. :class:`RemoteCore` offers the duck-typed interface the loop codes against
(``decode``, ``count_tokens``; no ``new_prefix_cache``, no ``generate``):

- The embedded core learnt the experts from training; a remote model learns them from a system prompt
  rendered from the registry (``prompts/remote_system.md``: the command language from
  ``prompts/commands.md``, then each expert's name, description, arguments and an example), plus one
  line for the turn (the routed calls, or "answer in plain text").
- Images go as ``data:`` URIs in ``image_url`` parts, after a text line naming their artifact id (the
  id is what a call's ``image="…"`` copies). ``send_images=False`` (``SWITCHBOARD_CORE_IMAGES=false``)
  sends only the id, for a text-only model.
- The reply's commands are constrained where the server can: the turn's ``CommandGrammar`` as GBNF
  (``orchestrator.core.grammar.gbnf``) in the request body's ``grammar`` field (llama.cpp's server and
  llama-cpp-python's), or in ``structured_outputs``/``guided_grammar`` (vLLM; see :func:`grammar_body`).
  Where it cannot (``SWITCHBOARD_CORE_GRAMMAR=none``: OpenAI, Ollama), the reply is validated as always.
- A reply that fails validation (``orchestrator.commands``), calls other than the routed ones, or
  calls where the turn allows none, is repaired once: the problems are shown to the model in a
  follow-up message and it writes the reply again. What it writes then goes to the loop, which runs
  the valid calls and reports the rest plainly, as for any reply.
- Text streams (``stream: true``): ``on_text`` gets the reply as it arrives; ``should_stop`` is asked
  at every chunk and closes the stream (``finish_reason="cancelled"``).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.commands import Call, format_call, format_value, parse, validate
from orchestrator.core.format import neutralise
from orchestrator.core.grammar import CommandGrammar, specs_from_registry
from switchboard.errors import SwitchboardError

if TYPE_CHECKING:
    from PIL import Image

SPEC_PREFIX = "openai:"
#: how a request asks the server to constrain its reply (see :func:`grammar_body`)
GRAMMAR_MODES = ("gbnf", "vllm", "guided_grammar", "none")
#: the prompt length estimate (a remote tokenizer is not at hand): characters per token, tokens per image
CHARS_PER_TOKEN = 4
TOKENS_PER_IMAGE = 256
#: the id examples show for the attached image
EXAMPLE_IMAGE = "image-3f9a2b1c0d4e5f6a7b8c9d0e"
TOOL_PREFIX = "Results of your calls (one line per call):\n"
REPAIR_REQUEST = ("Your reply could not be used:\n{problems}\nWrite your whole reply again, corrected, in the same "
                  "form (only the calls, or only the answer, as asked).")
#: what ``on_text`` gets between a reply that failed validation and its repair
REPAIR_NOTE = "\n[the reply did not validate; asked the model once more]\n"


class RemoteCoreError(SwitchboardError):
    """The remote core could not be reached, or refused or broke off a request."""

    code = "core_unavailable"
    status = 503


@dataclass(frozen=True)
class CoreSpec:
    """Where a remote core is: the API's base URL (up to ``/v1``) and the model name (None: the
    server's first model, from ``GET /models``)."""

    base_url: str
    model: str | None


def parse_core_spec(spec: str) -> CoreSpec:
    """``openai:<base_url>#<model>`` (the ``#<model>`` part optional) as a :class:`CoreSpec`."""
    if not spec.startswith(SPEC_PREFIX):
        raise ValueError(f"a remote core is written openai:<base_url>#<model>, got {spec!r}")
    url, _, model = spec[len(SPEC_PREFIX):].partition("#")
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the remote core's base URL must start with http:// or https://, got {url!r} "
                         "(e.g. openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-VL-7B-Instruct)")
    return CoreSpec(url, model.strip() or None)


def is_remote_spec(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(SPEC_PREFIX)


@dataclass
class RemoteReply:
    """One reply of the remote core, as ``decode`` returns it (the loop reads ``text`` and
    ``finish_reason``): ``attempts`` is 2 when it was repaired, ``problems`` what the first attempt
    had wrong, ``drafts`` the text of every attempt; ``prompt_tokens``/``tokens`` as the server
    reported them (0 when it did not)."""

    text: str
    finish_reason: str = "stop"
    attempts: int = 1
    problems: list[str] = field(default_factory=list)
    drafts: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    tokens: int = 0
    passes: int = 0
    forced_tokens: int = 0


# -- the system prompt ------------------------------------------------------------------------------
def _prompt(name: str) -> str:
    from prompts import read

    return read(name)


def command_language() -> str:
    """The "Canonical form" and "Values" sections of prompts/commands.md: what a model must know to
    write calls (the error table and the tool-call mapping are for people)."""
    text = _prompt("commands.md")
    keep, out = False, []
    for line in text.splitlines():
        if line.startswith("## "):
            keep = line[3:].strip() in ("Canonical form", "Values")
        if keep:
            out.append(line)
    return "\n".join(out).strip()


def _type_words(spec: Any) -> str:
    if spec.kind == "artifact":
        return f"{spec.artifact_kind} artifact id or $<call id>"
    if spec.kind == "enum":
        return "one of " + ", ".join(spec.choices)
    return {"string": "text", "bool": "true or false", "json": "JSON"}.get(spec.kind, spec.kind)


def describe_expert(cls: Any, spec: Any, *, examples: int = 1) -> str:
    """One expert for the system prompt: name, description, each argument (type, required or default,
    description) and ``examples`` of its example requests with the call they should produce."""
    schema = cls.Args.model_json_schema()
    lines = [f"### {cls.name}", " ".join(str(cls.description).split())]
    for name, prop in schema.get("properties", {}).items():
        arg = spec.args.get(name)
        if arg is None:
            continue
        need = "required" if arg.required else (
            f"default {format_value(prop['default'])}" if prop.get("default") is not None else "optional")
        desc = prop.get("description") or next((a.get("description") for a in prop.get("anyOf", [])
                                                 if a.get("description")), "")
        if arg.kind == "artifact" and desc.startswith(("An ", "A ")) and "artifact id" in desc:
            desc = ""  # the generic "An image artifact id, or $<call id> …": the type says it
        lines.append(f"- {name} ({_type_words(arg)}, {need}): {desc}".rstrip(": "))
    for ex in list(cls.examples)[:examples]:
        request, args = ex.fill(image=EXAMPLE_IMAGE)
        call = Call("c1", cls.name, {k: format_value(v) for k, v in args.items()})
        lines.append(f'Example: "{request}" -> {format_call(call)}')
    return "\n".join(lines)


def system_prompt(registry: Any, *, turn: str = "", examples: int = 1, template: str | None = None) -> str:
    """prompts/remote_system.md rendered from the registry (``{{experts}}``, ``{{command_language}}``),
    with ``turn`` (what this reply must be) at ``{{turn}}``."""
    specs = specs_from_registry(registry)
    experts = "\n\n".join(describe_expert(registry.get_class(n), specs[n], examples=examples)
                          for n in registry.names())
    text = template if template is not None else _prompt("remote_system.md")
    text = text.replace("{{command_language}}", command_language()).replace("{{experts}}", experts)
    return text.replace("{{turn}}", turn).strip() + "\n"


def turn_instruction(grammar: CommandGrammar) -> str:
    """The line that tells the model what this reply must be (the grammar enforces it where it can)."""
    if grammar.route:
        calls = " then ".join(grammar.route)
        return (f"\nThis reply: write exactly {len(grammar.route)} call(s), in this order: {calls}. Write "
                "nothing else.")
    if grammar.route is not None or not grammar.allow_calls:
        return "\nThis reply: answer in plain text. Write no <call> tag."
    return ""


# -- the request --------------------------------------------------------------------------------------
def grammar_body(mode: str, grammar_text: str) -> dict[str, Any]:
    """The request body fields that ask a server to keep its reply inside ``grammar_text`` (GBNF).

    - ``gbnf``: ``{"grammar": …}`` — llama.cpp's ``llama-server`` and llama-cpp-python's server
      (with the openai client: ``extra_body={"grammar": …}``).
    - ``vllm``: ``{"structured_outputs": {"grammar": …}}`` — vLLM's structured outputs (xgrammar reads
      GBNF; ``extra_body={"structured_outputs": {"grammar": …}}``).
    - ``guided_grammar``: ``{"guided_grammar": …}`` — older vLLM releases.
    - ``none``: nothing (OpenAI, Ollama): the reply is only validated.
    """
    if mode == "gbnf":
        return {"grammar": grammar_text}
    if mode == "vllm":
        return {"structured_outputs": {"grammar": grammar_text}}
    if mode == "guided_grammar":
        return {"guided_grammar": grammar_text}
    if mode == "none":
        return {}
    raise ValueError(f"grammar mode must be one of {', '.join(GRAMMAR_MODES)}, got {mode!r}")


def data_uri(image: Image.Image, max_side: int = 1024) -> str:
    """A PNG ``data:`` URI of the image, scaled down to ``max_side`` (what a VLM resizes to anyway)."""
    im = image.convert("RGB") if image.mode not in ("RGB", "RGBA", "L") else image
    if max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def problems(text: str, grammar: CommandGrammar, registry: Any) -> list[str]:
    """What is wrong with a reply, as the loop would find it: validation errors (``orchestrator.commands``
    against the registry and the conversation's artifacts), calls other than the routed ones, calls
    where the turn allows none. Empty: the reply can be used as it is."""
    parsed = parse(text)
    out: list[str] = []
    if grammar.route is not None or not grammar.allow_calls:
        want = list(grammar.route or [])
        got = [c.expert for c in parsed.calls]
        if not want and (got or parsed.errors):
            out.append("this reply must be a plain-text answer: write no <call> tag")
            return out
        if want and got != want:
            out.append(f"this reply must be exactly these calls, in this order: {', '.join(want)} "
                       f"(it had: {', '.join(got) or 'no call'})")
    checked = validate(parsed, registry, max_calls=grammar.max_calls,
                       artifact_exists=lambda i: i in grammar.artifacts)
    out += [str(e) for e in checked.errors]
    return out


class RemoteCore:
    """The core as an OpenAI-compatible chat endpoint (see the module doc)."""

    #: the loop decodes a core without ``generate`` through ``decode`` (there are no logits to mask here)
    remote = True

    def __init__(self, base_url: str, model: str | None, *, registry: Any, api_key: str | None = None,
                 grammar: str = "gbnf", send_images: bool = True, timeout_s: float = 120.0,
                 temperature: float = 0.0, max_image_side: int = 1024, examples: int = 1,
                 repair: bool = True, transport: Any = None) -> None:
        if grammar not in GRAMMAR_MODES:
            raise ValueError(f"grammar mode must be one of {', '.join(GRAMMAR_MODES)}, got {grammar!r}")
        self.base_url = base_url.rstrip("/")
        self._model = model
        self.registry = registry
        self.api_key = api_key
        self.grammar_mode = grammar
        self.send_images = send_images
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_image_side = max_image_side
        self.examples = examples
        self.repair = repair
        self._transport = transport  # an httpx transport (tests); None: the network
        self._client: Any = None
        self._base_prompt: str | None = None

    @classmethod
    def from_spec(cls, spec: str, **kw: Any) -> RemoteCore:
        s = parse_core_spec(spec)
        return cls(s.base_url, s.model, **kw)

    @classmethod
    def from_settings(cls, settings: Any, registry: Any) -> RemoteCore:
        return cls.from_spec(settings.core, registry=registry, api_key=settings.core_api_key,
                             grammar=settings.core_grammar, send_images=settings.core_images,
                             timeout_s=settings.core_timeout_s)

    @property
    def info(self) -> dict[str, Any]:
        return {"base": f"{SPEC_PREFIX}{self.base_url}#{self._model or ''}", "remote": True,
                "grammar": self.grammar_mode, "images": self.send_images}

    # -- HTTP ------------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            import httpx

            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.Client(base_url=self.base_url, headers=headers, transport=self._transport,
                                        timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _fail(self, what: str, e: Exception) -> RemoteCoreError:
        return RemoteCoreError(f"the remote core at {self.base_url} {what} ({type(e).__name__}: {e})")

    @property
    def model(self) -> str:
        """The model name; asked of the server (its first model) when the spec named none."""
        if self._model is None:
            import httpx

            try:
                r = self.client.get("/models")
                r.raise_for_status()
                self._model = str(r.json()["data"][0]["id"])
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise self._fail("did not say which model it serves (name one: openai:<base_url>#<model>)",
                                 e) from None
        return self._model

    def _stream(self, body: dict[str, Any], on_text: Callable[[str], None] | None,
                should_stop: Callable[[], bool] | None) -> tuple[str, str, dict[str, Any]]:
        """POST /chat/completions with ``stream: true``: the text, the finish reason, the usage."""
        import httpx

        pieces: list[str] = []
        finish, usage = "stop", {}
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise RemoteCoreError(f"the remote core at {self.base_url} refused the request "
                                          f"(HTTP {r.status_code}): {_error_text(r)}")
                for chunk in _sse(r.iter_lines()):
                    if should_stop is not None and should_stop():
                        finish = "cancelled"
                        break
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            pieces.append(piece)
                            if on_text is not None:
                                on_text(piece)
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
        except httpx.HTTPError as e:
            raise self._fail("cannot be reached", e) from None
        return "".join(pieces), finish, usage

    # -- the interface the loop codes against ----------------------------------------------------------
    def system(self, grammar: CommandGrammar | None = None) -> str:
        if self._base_prompt is None:
            self._base_prompt = system_prompt(self.registry, examples=self.examples)
        turn = turn_instruction(grammar) if grammar is not None else ""
        return self._base_prompt + turn.lstrip("\n") + ("\n" if turn else "")

    def chat_messages(self, messages: list[dict], images: dict[str, Image.Image] | None = None, *,
                      grammar: CommandGrammar | None = None, system: str | None = None) -> list[dict[str, Any]]:
        """The conversation in OpenAI's form: the system prompt, user turns with their images (a line
        with the artifact id, then the image as a data URI), assistant turns, and each tool turn as a
        user message with the calls' results. Message text is data: chat-template markers written in it
        (``<|im_start|>`` and the like) are broken up (``format.neutralise``), as for the embedded core."""
        images = images or {}
        out: list[dict[str, Any]] = [{"role": "system", "content": system or self.system(grammar)}]
        for m in messages:
            role, content = m["role"], neutralise(str(m.get("content") or ""))
            if role == "tool":
                out.append({"role": "user", "content": TOOL_PREFIX + content})
            elif role == "user" and m.get("images"):
                parts: list[dict[str, Any]] = []
                for aid in m["images"]:
                    parts.append({"type": "text", "text": f"[image {aid}]\n"})
                    if self.send_images:
                        if aid not in images:
                            raise ValueError(f"core: no pixels for image {aid} mentioned in the conversation")
                        parts.append({"type": "image_url",
                                      "image_url": {"url": data_uri(images[aid], self.max_image_side)}})
                if self.send_images:
                    out.append({"role": "user", "content": [*parts, {"type": "text", "text": content}]})
                else:
                    out.append({"role": "user", "content": "".join(p["text"] for p in parts) + content})
            else:
                out.append({"role": role, "content": content})
        return out

    def count_tokens(self, messages: list[dict], *, system: str | None = None) -> int:
        """An estimate of the prompt's length in tokens (system prompt included): the remote tokenizer
        is not at hand, so ``CHARS_PER_TOKEN`` characters a token and ``TOKENS_PER_IMAGE`` an image."""
        chars = len(system or self.system()) + sum(len(str(m.get("content") or "")) + 16 for m in messages)
        n_images = sum(len(m.get("images") or []) for m in messages)
        return -(-chars // CHARS_PER_TOKEN) + (TOKENS_PER_IMAGE if self.send_images else 12) * n_images

    def decode(self, messages: list[dict], images: dict[str, Image.Image] | None = None, *,
               grammar: CommandGrammar, max_new_tokens: int = 160, on_text: Callable[[str], None] | None = None,
               should_stop: Callable[[], bool] | None = None, system: str | None = None,
               constrain: bool = True, repair: bool | None = None, sampling: Any = None,
               **_: Any) -> RemoteReply:
        """The next assistant turn, constrained by ``grammar`` where the server can (``constrain``) and
        repaired once when it does not validate (``repair``, default the core's). ``sampling`` (an
        ``orchestrator.core.sampling.Sampling``) goes to the server as OpenAI's own parameters. Other
        keywords the embedded core takes (``prefix_cache``, ``jump_forward``) mean nothing here."""
        chat = self.chat_messages(messages, images, grammar=grammar, system=system)
        body: dict[str, Any] = {"model": self.model, "messages": chat, "max_tokens": max_new_tokens,
                                "temperature": self.temperature, "stream": True}
        if sampling is not None:
            body.update(temperature=sampling.temperature, top_p=sampling.top_p,
                        presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty)
            if sampling.seed is not None:
                body["seed"] = sampling.seed
        if constrain and self.grammar_mode != "none":
            try:
                body.update(grammar_body(self.grammar_mode, grammar.gbnf()))
            except ValueError:  # a routed call that cannot be written here: validation will say so
                pass
        text, finish, usage = self._stream(body, on_text, should_stop)
        reply = RemoteReply(text, finish, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                            tokens=int(usage.get("completion_tokens") or 0), passes=1, drafts=[text])
        if finish == "cancelled" or not (self.repair if repair is None else repair):
            return reply
        found = problems(text, grammar, self.registry)
        if not found:
            return reply
        if on_text is not None:
            on_text(REPAIR_NOTE)
        ask = REPAIR_REQUEST.format(problems="\n".join(f"- {p}" for p in found))
        body["messages"] = [*chat, {"role": "assistant", "content": text}, {"role": "user", "content": ask}]
        text, finish, usage = self._stream(body, on_text, should_stop)
        return RemoteReply(text, finish, attempts=2, problems=found, drafts=[reply.text, text],
                           prompt_tokens=int(usage.get("prompt_tokens") or 0),
                           tokens=reply.tokens + int(usage.get("completion_tokens") or 0), passes=2)


def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream (``data: {…}`` lines; ``[DONE]`` ends it)."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # comments (": ping"), event names, blank lines
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "error" in event:
            err = event["error"]
            raise RemoteCoreError(f"the remote core broke off its reply: {err.get('message', err) if isinstance(err, dict) else err}")
        if isinstance(event, dict):
            yield event


def _error_text(r: Any) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:500]
    return str(err)[:500]
