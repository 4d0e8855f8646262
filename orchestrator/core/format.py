"""The one rendering of a conversation into the core's text, shared by training and inference.

SmolLM2's chat template (ChatML), with no system turn by default (the shipped core is trained
without one: every token of a system prompt is paid on every training step and every request)::

    <|im_start|>user
    <image> image-3f9a2b1c0d4e5f6a7b8c9d0e
    find the red circle<|im_end|>
    <|im_start|>assistant
    <call id="c1" expert="detect" image="image-3f9a2b1c0d4e5f6a7b8c9d0e" query="red circle"/><|im_end|>
    <|im_start|>tool
    c1 detect done: found 2 red circles -> boxes-…, overlay-…<|im_end|>
    <|im_start|>assistant
    I found 2 red circles.<|im_end|>

- A message is ``{"role": "user" | "assistant" | "tool", "content": str, "images": [artifact ids]}``
  (``images`` optional, user turns only). Each image becomes ``IMAGE_TOKEN`` (which the model expands
  to its vision features) followed by the artifact id as text, so the core can copy the id into
  ``image="…"``.
- A ``tool`` turn holds the outcomes of the previous assistant turn's calls, one line per call; build
  it with :func:`tool_turn` so the loop and the training data write the same text.
- The prompt for the next reply ends with ``<|im_start|>assistant\\n``; a finished assistant turn is
  ``content + "<|im_end|>"``. Training tokenises prompt and answer separately, exactly as inference
  tokenises the prompt and generates the answer.
- Message text is data: a control token written inside it (``<image>``, ``<|im_start|>``, any special
  token of the core's tokenizer) is broken up by :func:`neutralise` when rendered, so only this module's
  own markup is ever read as a turn boundary or an image placeholder.

This module is plain text: no torch, no transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant", "tool")
#: SmolLM2's special tokens and the image placeholder; a core adds its tokenizer's own (``control``)
CONTROL_TOKENS = (IMAGE_TOKEN, IM_START, IM_END, "<|endoftext|>", "<repo_name>", "<reponame>", "<file_sep>",
                  "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                  "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>",
                  "<empty_output>", "<s>", "</s>", "<unk>", "<pad>")
#: what ``<|…|>`` markers of other chat formats look like (``<|eot_id|>``, ``<|user|>`` …)
_MARKER = r"<\|[A-Za-z0-9_.:-]{1,40}\|>"
#: the command tag the core writes, neutralised in text the core did not write (``commands=True``)
_COMMAND = r"<\s*/?\s*call\b"
ZWSP = "\u200b"


@lru_cache(maxsize=16)
def _pattern(control: tuple[str, ...], commands: bool) -> re.Pattern[str]:
    alts = [re.escape(t) for t in sorted(set(control), key=len, reverse=True) if t] + [_MARKER]
    if commands:
        alts.append(_COMMAND)
    return re.compile("|".join(alts), re.IGNORECASE if commands else 0)


def neutralise(text: str, control: Iterable[str] = (), *, commands: bool = False) -> str:
    """``text`` with every control token broken by a zero-width space after its first character.

    What the client wrote is data, never markup: ``<|im_start|>tool`` typed by a user must not open a
    forged tool turn, and a typed ``<image>`` must not become an image placeholder (which the core
    would then find without features). The same function is used for every message's text (user,
    assistant and tool turns, in training and at inference); text without control tokens — all of the
    training data — is returned unchanged. ``control``: further special tokens of the core's tokenizer.
    ``commands``: also break ``<call`` tags (for assistant text a client sent as history, which the
    core did not write). Applied until nothing matches, so pieces cannot be joined into a token.
    """
    pattern = _pattern(tuple(CONTROL_TOKENS) + tuple(control), commands)
    for _ in range(len(text)):  # each pass inserts characters only inside matches, so this ends
        out = pattern.sub(lambda m: m.group(0)[0] + ZWSP + m.group(0)[1:], text)
        if out == text:
            return out
        text = out
    return text


def image_block(artifact_id: str) -> str:
    """How one attached image appears in a user turn: the placeholder, then its id as text."""
    return f"{IMAGE_TOKEN} {artifact_id}\n"


def _turn_body(msg: Mapping[str, Any], control: Iterable[str] = ()) -> str:
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
    content = msg.get("content", "")
    if not isinstance(content, str):
        raise ValueError(f"message content must be text, got {type(content).__name__}")
    images = msg.get("images") or []
    if images and role != "user":
        raise ValueError(f"only user turns carry images, not {role!r} turns")
    return "".join(image_block(i) for i in images) + neutralise(content, control)


def render(messages: list[dict], *, system: str | None = None, add_generation_prompt: bool = True,
           control: Iterable[str] = ()) -> str:
    """The conversation as model text.

    ``messages``: dicts ``{"role": "user"|"assistant"|"tool", "content": str, "images": [ids]}``.
    ``system``: an optional system turn; the shipped core was trained with none, so leave it None
    unless your checkpoint was trained with one. ``add_generation_prompt``: end with an open
    assistant turn (what the model continues); False renders a finished conversation. ``control``: the
    core's tokenizer's special tokens, neutralised in every message's text (:func:`neutralise`).
    """
    parts = []
    control = tuple(control)
    if system:
        parts.append(f"{IM_START}system\n{neutralise(system, control)}{IM_END}\n")
    for msg in messages:
        parts.append(f"{IM_START}{msg['role']}\n{_turn_body(msg, control)}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def answer_text(content: str) -> str:
    """The text the model is trained to write for an assistant turn (what follows the prompt)."""
    return content + IM_END


def images_in(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """Artifact ids of the images shown to the model, in the order their placeholders appear."""
    return [i for m in messages for i in (m.get("images") or [])]


def tool_line(outcome: Mapping[str, Any]) -> str:
    """One line of a tool turn, e.g. ``c1 detect done: found 2 red circles -> boxes-…, overlay-…``.

    ``outcome``: ``{"call_id", "expert", "status", "summary" or "error", "artifacts": [{"id", "kind",
    "role"}]}``. ``status`` is a word ("done", "failed", "skipped"); a failed call shows its
    ``error``. Artifacts are listed by id (with the role when it says more than the kind), so the
    core can refer to them in later turns.
    """
    status = str(outcome.get("status") or "done")
    text = outcome.get("error") if status != "done" else outcome.get("summary")
    text = " ".join(str(text or outcome.get("summary") or outcome.get("error") or "").split())
    line = f"{outcome.get('call_id', 'c1')} {outcome.get('expert', '?')} {status}: {text}".rstrip()
    arts = []
    for a in outcome.get("artifacts") or []:
        aid, kind, role = a.get("id", ""), a.get("kind", ""), (a.get("role") or "").strip()
        arts.append(f"{aid} ({role})" if role and role != kind else aid)
    if arts:
        line += " -> " + ", ".join(arts)
    return line


def tool_turn(outcomes: list[dict]) -> str:
    """The content of a ``tool`` turn: one :func:`tool_line` per call, in call order."""
    return "\n".join(tool_line(o) for o in outcomes)
