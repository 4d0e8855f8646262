"""Short handles: the core reads and writes ``img1``, ``mask2`` … instead of 24-hex-digit artifact ids.

An artifact id (``image-3f9a2b1c0d4e5f6a7b8c9d0e``) is ~20 tokens; every one of them is prefilled
wherever the id appears in the prompt and, in a plan, copied token by token (or fed by jump-forward).
A handle is a kind's short name and its number among the conversation's artifacts of that kind, in
order of appearance (the images and ids of the prompt first, then the conversation's other
artifacts): ``img1``, ``img2``, ``mask1``, ``boxes1`` … The loop renders the prompt with handles, the
grammar admits the handles of the conversation's artifacts, and the reply's handles are mapped back
to ids before it is parsed, so nothing downstream of the core ever sees a handle.

Handles are given per pass from the prompt in hand, so they are stable within a turn (the answer
pass's prompt extends the plan pass's: earlier handles keep their numbers and the prefix cache still
matches) and always consistent with what the core reads. This module is plain text: no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: the short name of each artifact kind
PREFIX = {"image": "img", "overlay": "overlay", "mask": "mask", "boxes": "boxes", "text": "text", "json": "json"}
ARTIFACT_ID = re.compile(r"\b(image|overlay|mask|boxes|text|json)-[0-9a-f]{24}\b")


@dataclass
class Handles:
    """A two-way map between a conversation's artifact ids and their handles."""

    to_handle: dict[str, str] = field(default_factory=dict)
    to_id: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_conversation(cls, messages: Iterable[Mapping[str, Any]],
                         artifacts: Mapping[str, str] | None = None) -> Handles:
        """Handles for the ids in ``messages`` (images and text, in order) and then for ``artifacts``
        (id -> kind) not mentioned there."""
        out = cls()
        kinds = dict(artifacts or {})
        for m in messages:
            for aid in m.get("images") or []:
                out._add(aid, kinds)
            for match in ARTIFACT_ID.finditer(str(m.get("content") or "")):
                out._add(match.group(0), kinds)
        for aid in kinds:
            out._add(aid, kinds)
        return out

    def _add(self, aid: str, kinds: Mapping[str, str]) -> None:
        if aid in self.to_handle:
            return
        kind = kinds.get(aid) or aid.split("-", 1)[0]
        prefix = PREFIX.get(kind, kind)
        n = sum(h.rstrip("0123456789") == prefix for h in self.to_id) + 1
        handle = f"{prefix}{n}"
        self.to_handle[aid], self.to_id[handle] = handle, aid

    # -- ids -> handles (what the core reads) -------------------------------------------------------
    def text(self, text: str) -> str:
        """``text`` with every known artifact id replaced by its handle."""
        return ARTIFACT_ID.sub(lambda m: self.to_handle.get(m.group(0), m.group(0)), text)

    def messages(self, messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The messages as the core reads them: image ids and ids in the text replaced by handles."""
        out = []
        for m in messages:
            m2 = dict(m)
            if m.get("images"):
                m2["images"] = [self.to_handle.get(i, i) for i in m["images"]]
            if isinstance(m.get("content"), str):
                m2["content"] = self.text(m["content"])
            out.append(m2)
        return out

    def artifacts(self, artifacts: Mapping[str, str]) -> dict[str, str]:
        """The grammar's artifacts (handle -> kind) for a conversation's artifacts (id -> kind)."""
        return {self.to_handle.get(i, i): k for i, k in artifacts.items()}

    def images(self, images: Mapping[str, Any]) -> dict[str, Any]:
        """Pixels keyed by handle instead of id."""
        return {self.to_handle.get(i, i): im for i, im in images.items()}

    # -- handles -> ids (what the loop parses) ------------------------------------------------------
    def _pattern(self) -> re.Pattern[str] | None:
        if not self.to_id:
            return None
        alts = "|".join(sorted((re.escape(h) for h in self.to_id), key=len, reverse=True))
        return re.compile(rf"(?<![\w$-])(?:{alts})(?![\w-])")

    def ids(self, text: str) -> str:
        """``text`` (a reply) with every known handle replaced by its artifact id."""
        pattern = self._pattern()
        return pattern.sub(lambda m: self.to_id[m.group(0)], text) if pattern is not None else text

    def stream(self, on_text: Callable[[str], None]) -> tuple[Callable[[str], None], Callable[[], None]]:
        """A streaming callback that maps handles back to ids before passing text on, and its flush.

        A handle may arrive split over increments (``img`` then ``1``), so a trailing word is held back
        until what follows it shows it is complete."""
        held = [""]

        def put(piece: str) -> None:
            text = held[0] + piece
            tail = re.search(r"[\w-]+$", text)
            cut = tail.start() if tail else len(text)
            held[0] = text[cut:]
            if cut:
                on_text(self.ids(text[:cut]))

        def flush() -> None:
            if held[0]:
                on_text(self.ids(held[0]))
                held[0] = ""

        return put, flush
