"""Conversations: their messages and the artifacts they may address, kept on disk between requests.

A conversation id is ``conv-<24 hex>``, chosen by us (random), checked against that pattern before
anything touches the filesystem. Each conversation only sees the artifacts that were attached to it
or made in it, so one conversation cannot address another's artifacts by guessing ids.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from switchboard.errors import SwitchboardError

CONV_PATTERN = re.compile(r"^conv-[0-9a-f]{24}$")


class ConversationNotFound(SwitchboardError):
    code = "conversation_not_found"
    status = 404


class Conversation(BaseModel):
    id: str
    messages: list[dict[str, Any]] = Field(default_factory=list)
    artifacts: dict[str, str] = Field(default_factory=dict, description="artifact id -> kind")
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)

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
        """Conversations next to the artifact store (``switchboard.settings.Settings``)."""
        return cls(Path(settings.artifact_dir).parent / "conversations")

    def _path(self, conv_id: str) -> Path:
        if not isinstance(conv_id, str) or not CONV_PATTERN.match(conv_id):
            raise ConversationNotFound(f"no conversation {str(conv_id)[:60]!r}")
        return self.root / f"{conv_id}.json"

    def create(self) -> Conversation:
        conv = Conversation(id=f"conv-{secrets.token_hex(12)}")
        self.save(conv)
        return conv

    def get(self, conv_id: str) -> Conversation:
        try:
            return Conversation.model_validate_json(self._path(conv_id).read_bytes())
        except FileNotFoundError:
            raise ConversationNotFound(f"no conversation {conv_id!r}") from None

    def save(self, conv: Conversation) -> None:
        conv.updated = time.time()
        path = self._path(conv.id)
        with self._lock:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                f.write(conv.model_dump_json())
            os.replace(tmp, path)
