"""Conversations: their messages and the artifacts they may address, kept on disk between requests.

A conversation id is ``conv-<24 hex>``, chosen by us (random), checked against that pattern before
anything touches the filesystem. Each conversation only sees the artifacts that were attached to it
or made in it, so one conversation cannot address another's artifacts by guessing ids. A conversation
made through the API belongs to the key (``owner``) that started it: other keys get 404.

Where conversations live is a setting (``SWITCHBOARD_CONVERSATIONS_DIR``; default: ``conversations``
beside the artifact store). ``collect_garbage`` (``switchboard gc``) applies the retention
(``SWITCHBOARD_RETENTION_DAYS``): conversations not updated for that long go, and with them every
artifact that no remaining conversation references.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from switchboard.artifacts import ArtifactStore
from switchboard.errors import SwitchboardError

CONV_PATTERN = re.compile(r"^conv-[0-9a-f]{24}$")
#: the one owner when the server has no API keys (and of conversations made outside the API)
DEFAULT_OWNER = "local"


class ConversationNotFound(SwitchboardError):
    code = "conversation_not_found"
    status = 404


class Conversation(BaseModel):
    id: str
    messages: list[dict[str, Any]] = Field(default_factory=list)
    artifacts: dict[str, str] = Field(default_factory=dict, description="artifact id -> kind")
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)
    owner: str | None = Field(default=None, description="the tenant (API key) that started it; None: made "
                              "outside the API, read as the default owner")

    def add_artifact(self, artifact_id: str, kind: str) -> None:
        self.artifacts.setdefault(artifact_id, kind)


class ConversationStore:
    """Conversations as JSON files (atomic writes) under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> ConversationStore:
        """``settings.conversations_dir``, by default next to the artifact store (``switchboard.settings.Settings``)."""
        root = getattr(settings, "conversations_dir", None)
        return cls(root if root is not None else Path(settings.artifact_dir).parent / "conversations")

    def _path(self, conv_id: str) -> Path:
        if not isinstance(conv_id, str) or not CONV_PATTERN.match(conv_id):
            raise ConversationNotFound(f"no conversation {str(conv_id)[:60]!r}")
        return self.root / f"{conv_id}.json"

    def create(self, owner: str | None = None) -> Conversation:
        conv = Conversation(id=f"conv-{secrets.token_hex(12)}", owner=owner)
        self.save(conv)
        return conv

    def get(self, conv_id: str) -> Conversation:
        try:
            return Conversation.model_validate_json(self._path(conv_id).read_bytes())
        except FileNotFoundError:
            raise ConversationNotFound(f"no conversation {conv_id!r}") from None

    def get_owned(self, conv_id: str, owner: str) -> Conversation:
        """The conversation if ``owner`` started it; another owner's is simply not found (404)."""
        conv = self.get(conv_id)
        if (conv.owner or DEFAULT_OWNER) != owner:
            raise ConversationNotFound(f"no conversation {conv_id!r}")
        return conv

    def __iter__(self) -> Iterator[Conversation]:
        """Every stored conversation (files that vanish or do not parse are skipped)."""
        for path in sorted(self.root.glob("conv-*.json")):
            try:
                yield Conversation.model_validate_json(path.read_bytes())
            except (FileNotFoundError, ValueError):
                continue

    def delete(self, conv_id: str) -> None:
        self._path(conv_id).unlink(missing_ok=True)

    def save(self, conv: Conversation) -> None:
        conv.updated = time.time()
        path = self._path(conv.id)
        with self._lock:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                f.write(conv.model_dump_json())
            os.replace(tmp, path)


@dataclass
class GcReport:
    """What ``collect_garbage`` did."""

    conversations_removed: int
    conversations_kept: int
    artifacts_removed: int
    artifacts_kept: int


def collect_garbage(conversations: ConversationStore, store: ArtifactStore, retention_days: float,
                    now: float | None = None) -> GcReport:
    """Apply a retention of ``retention_days``: remove the conversations not updated since then, then
    every artifact older than that which no remaining conversation references (those only the removed
    conversations referenced, and orphans: a nested call's intermediate results, uploads of a refused
    request, ``switchboard run`` outputs). An artifact a live conversation references stays, and so
    does the full-resolution original of one (``extra.original``). Artifacts younger than the
    retention are never removed, so a turn in progress keeps what it just made.
    """
    cutoff = (time.time() if now is None else now) - retention_days * 86400
    live: set[str] = set()
    removed = kept = 0
    for conv in conversations:
        if conv.updated < cutoff:
            conversations.delete(conv.id)
            removed += 1
        else:
            kept += 1
            live.update(conv.artifacts)
    metas = store.list()
    by_id = {m.id: m for m in metas}
    for artifact_id in list(live):
        original = by_id[artifact_id].extra.get("original") if artifact_id in by_id else None
        if isinstance(original, str):
            live.add(original)
    doomed = {m.id for m in metas if m.id not in live and m.created < cutoff}
    gone = store.remove(doomed)
    return GcReport(conversations_removed=removed, conversations_kept=kept, artifacts_removed=gone,
                    artifacts_kept=len(metas) - gone)
