"""Prompt material as data: ``commands.md`` is the reference of the command language the core writes;
``remote_system.md`` is the system prompt a remote core (``SWITCHBOARD_CORE=openai:…``,
orchestrator/core/remote.py) gets, rendered from the registry.

The embedded core has no system prompt: the shipped core was trained, and runs, without a system turn
(orchestrator/core/format.py renders none by default), so what it knows of the experts comes from
its training data (training/core_data.py, generated from the registry) and from the command grammar
(orchestrator/core/grammar.py, built from the registry at every turn).
"""

from __future__ import annotations

from importlib.resources import files


def read(name: str) -> str:
    """The text of a file in this package (e.g. ``"commands.md"``)."""
    return (files(__name__) / name).read_text(encoding="utf-8")
