"""`switchboard plan` and `switchboard chat`: the core from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from switchboard.errors import SwitchboardError


def _import_image(store: Any, path: Path, conversation_id: str | None = None) -> str:
    return store.import_image(Path(path).read_bytes(), conversation_id=conversation_id).id


def plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="switchboard plan", description="The core's reply and parsed calls, not executed.")
    p.add_argument("message", nargs="?", help="the request")
    p.add_argument("--image", type=Path, action="append", help="attach an image (repeatable)")
    p.add_argument("--json", action="store_true", help="print {text, calls, errors} as JSON")
    p.add_argument("--jsonl", type=Path, help='read lines {"request": str, "image": optional path}; print one JSON line each')
    p.add_argument("--raw", action="store_true", help="also print the core's raw reply")
    args = p.parse_args(argv)
    if not args.message and not args.jsonl:
        p.error("give a MESSAGE or --jsonl FILE")

    from orchestrator.commands import parse, validate
    from orchestrator.runtime import build_assistant
    from orchestrator.session import Conversation
    from switchboard.settings import get_settings

    assistant = build_assistant(get_settings())
    store = assistant.store

    def one(request: str, images: list[Path]) -> dict[str, Any]:
        conv = Conversation(id="conv-" + "0" * 24)
        ids = []
        for path in images:
            image_id = _import_image(store, path)
            ids.append(image_id)
            conv.add_artifact(image_id, "image")
        conv.messages.append({"role": "user", "content": request, "images": ids})
        reply = assistant.plan(conv)
        parsed = parse(reply)
        v = validate(parsed, assistant.registry, artifact_exists=lambda i: i in conv.artifacts)
        valid = {c.id: c for c in v.calls}
        calls = []
        for c in parsed.calls:
            typed = valid[c.id].args.model_dump(mode="json", exclude_unset=True) if c.id in valid else dict(c.args)
            calls.append({"id": c.id, "expert": c.expert, "args": typed})
        out = {"text": parsed.text, "calls": calls, "errors": [e.to_dict() for e in v.errors]}
        if args.raw:
            out["reply"] = reply
        return out

    try:
        if args.jsonl:
            for line in args.jsonl.read_text().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                image = [Path(item["image"])] if item.get("image") else []
                print(json.dumps(one(item["request"], image)), flush=True)
            return 0
        out = one(args.message, args.image or [])
    except (OSError, SwitchboardError, json.JSONDecodeError, KeyError) as e:
        print(f"switchboard plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(out["text"] or "(no text)")
        for c in out["calls"]:
            print(f"  {c['id']}: {c['expert']} {json.dumps(c['args'])}")
        for e in out["errors"]:
            print(f"  error: {e['message']}")
    return 0


def chat_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="switchboard chat", description="One turn of a conversation with the core: "
                                "plan, run the calls, answer.")
    p.add_argument("message")
    p.add_argument("--image", type=Path, action="append", help="attach an image (repeatable)")
    p.add_argument("--conversation", help="continue this conversation id (printed by an earlier chat)")
    p.add_argument("--json", action="store_true", help="print {answer, calls, errors, artifacts} as JSON")
    p.add_argument("--out", type=Path, help="copy the artifacts made into this folder")
    args = p.parse_args(argv)

    from orchestrator.cli.output import export_artifacts, print_artifacts, print_event
    from orchestrator.core.loop import ChatResult
    from orchestrator.runtime import build_assistant
    from switchboard.settings import get_settings

    assistant = build_assistant(get_settings())
    store = assistant.store
    try:
        images = [_import_image(store, path) for path in args.image or []]
        result: ChatResult | None = None
        for ev in assistant.stream(args.message, images=images, conversation_id=args.conversation):
            if isinstance(ev, ChatResult):
                result = ev
            elif not args.json:
                print_event(ev)
    except (OSError, SwitchboardError) as e:
        print(f"switchboard chat: {e}", file=sys.stderr)
        return 2
    assert result is not None
    artifacts = export_artifacts(store, result.artifacts, args.out)
    if args.json:
        print(json.dumps({"answer": result.answer, "calls": [c.model_dump(mode="json") for c in result.calls],
                          "errors": result.errors, "artifacts": artifacts,
                          "conversation_id": result.conversation_id}, indent=2))
    else:
        print(result.answer)
        print_artifacts(artifacts)
        print(f"(conversation {result.conversation_id}; continue with --conversation {result.conversation_id})")
    return 0
