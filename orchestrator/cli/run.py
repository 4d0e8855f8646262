"""`switchboard run`: validate and execute commands written by hand (no core involved)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def run_commands(text: str, images: list[Path], *, settings: Any, as_json: bool, out: Path | None,
                 conversation_id: str | None = None) -> int:
    """Validate and execute the commands in ``text``; ``{image}``/``{image2}``… stand for ``--image`` files."""
    from orchestrator.cli.output import export_artifacts, print_artifacts, print_event
    from orchestrator.plan import Plan
    from orchestrator.runtime import make_dispatcher
    from switchboard.artifacts import ArtifactStore
    from switchboard.errors import SwitchboardError
    from switchboard.registry import get_registry

    store = ArtifactStore.from_settings(settings)
    registry = get_registry()
    slots: dict[str, str] = {}
    for i, path in enumerate(images):
        try:
            meta = store.import_image(Path(path).read_bytes(), conversation_id=conversation_id)
        except (OSError, SwitchboardError) as e:
            print(f"switchboard: cannot use {path}: {e}", file=sys.stderr)
            return 2
        slots["image" if i == 0 else f"image{i + 1}"] = meta.id
    for key, value in slots.items():
        text = text.replace("{" + key + "}", value)
    plan = Plan.from_text(text, registry, artifact_exists=store.exists, max_calls=settings.max_calls_per_reply)
    for err in plan.errors:
        print(f"  error: {err}", file=sys.stderr)
    dispatcher = make_dispatcher(registry, store, settings)
    try:
        result = dispatcher.run_plan(plan, conversation_id=conversation_id,
                                     on_event=None if as_json else print_event)
    finally:
        dispatcher.close()
    artifacts = export_artifacts(store, result.artifacts(), out)
    if as_json:
        print(json.dumps({
            "inputs": slots,
            "calls": [o.model_dump(mode="json") for o in result.outcomes],
            "errors": [e.to_dict() for e in plan.errors],
            "artifacts": artifacts,
        }, indent=2))
    else:
        for o in result.outcomes:
            line = o.summary if o.status == "done" else o.error
            print(f"{o.call_id} {o.expert:<8} {o.status:<7} {o.seconds * 1000:7.0f} ms  {line}")
        print_artifacts(artifacts)
    return 0 if result.ok and not plan.errors else 1
