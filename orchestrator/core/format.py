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

This module is plain text: no torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ROLES = ("system", "user", "assistant", "tool")


def image_block(artifact_id: str) -> str:
    """How one attached image appears in a user turn: the placeholder, then its id as text."""
    return f"{IMAGE_TOKEN} {artifact_id}\n"


def _turn_body(msg: Mapping[str, Any]) -> str:
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
    content = msg.get("content", "")
    if not isinstance(content, str):
        raise ValueError(f"message content must be text, got {type(content).__name__}")
    images = msg.get("images") or []
    if images and role != "user":
        raise ValueError(f"only user turns carry images, not {role!r} turns")
    return "".join(image_block(i) for i in images) + content


def render(messages: list[dict], *, system: str | None = None, add_generation_prompt: bool = True) -> str:
    """The conversation as model text.

    ``messages``: dicts ``{"role": "user"|"assistant"|"tool", "content": str, "images": [ids]}``.
    ``system``: an optional system turn; the shipped core was trained with none, so leave it None
    unless your checkpoint was trained with one. ``add_generation_prompt``: end with an open
    assistant turn (what the model continues); False renders a finished conversation.
    """
    parts = []
    if system:
        parts.append(f"{IM_START}system\n{system}{IM_END}\n")
    for msg in messages:
        parts.append(f"{IM_START}{msg['role']}\n{_turn_body(msg)}{IM_END}\n")
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
