"""What the CLIs show and write: one printer of a turn's events and artifacts, one artifact exporter.

``switchboard run``, ``switchboard chat`` and the demo all print a turn the same way::

    [planning]
      [c1] detect: started
      [c1] detect: done — found 1 red circle
      artifact boxes-… from c1: out/c1-boxes.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.events import CallEvent, StageEvent

# File extensions of the media types experts write; anything else is copied as .bin.
EXTENSIONS = {"image/png": ".png", "application/json": ".json"}


def print_event(event: Any, *, indent: str = "") -> None:
    """One line per stage of the turn (``[planning]``) or of a call (``  [c1] detect: done — …``).

    Other events (the core's text, the result) print nothing: the caller shows the answer itself.
    """
    if isinstance(event, StageEvent):
        print(f"{indent}[{event.stage}]", flush=True)
    elif isinstance(event, CallEvent):
        extra = f" {event.progress:.0%}" if event.stage == "progress" and event.progress is not None else ""
        message = f" — {event.message}" if event.message else ""
        print(f"{indent}  [{event.call_id}] {event.expert}: {event.stage}{extra}{message}", flush=True)


def export_artifacts(store: Any, artifacts: list[dict[str, Any]], out: Path | None, *,
                     prefix: str = "") -> list[dict[str, Any]]:
    """The artifacts, each with the ``path`` of its file: in the store, or (with ``out``) a copy in
    ``out`` named ``<prefix><call id>-<role or kind>.<ext>``."""
    listed = []
    for a in artifacts:
        path = store.path(a["id"])
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            name = (a.get("role") or a["kind"]).replace(" ", "_")
            target = out / f"{prefix}{a['call_id']}-{name}{EXTENSIONS.get(store.get(a['id']).media_type, '.bin')}"
            target.write_bytes(path.read_bytes())
            path = target
        listed.append({**a, "path": str(path)})
    return listed


def print_artifacts(artifacts: list[dict[str, Any]], *, indent: str = "  ") -> None:
    """One line per exported artifact (see ``export_artifacts``)."""
    for a in artifacts:
        role = f" ({a['role']})" if a.get("role") else ""
        print(f"{indent}artifact {a['id']}{role} from {a['call_id']}: {a['path']}", flush=True)
