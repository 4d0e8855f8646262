"""The ``switchboard`` command. Heavy libraries are imported inside commands, so ``--help`` is fast."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

# Subcommands implemented in other packages: name -> (module, function, help). Each takes argv.
DELEGATED: dict[str, tuple[str, str, str]] = {
    "shapes": ("training.shapes", "main", "write a shapes-world dataset (images, COCO annotations, refs)"),
    "worker": ("workers.cli", "main", "start a Celery worker for some experts' queues"),
    "serve": ("orchestrator.api.cli", "main", "serve the OpenAI-compatible API and the web chat page"),
    "plan": ("orchestrator.core.cli", "plan_main", "the core's reply and parsed calls, not executed"),
    "chat": ("orchestrator.core.cli", "chat_main", "chat with the core: plan, run the calls, answer"),
}
# `switchboard train X` / `switchboard eval X` -> training.X.main_train / main_eval
RECIPES = ("detector", "segmenter", "generator", "editor", "core")


def _delegate(module: str, func: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            print(f"switchboard: this command is not available in this version ({module} is missing)",
                  file=sys.stderr)
            return 2
        raise
    fn = getattr(mod, func, None)
    if fn is None:
        print(f"switchboard: {module} has no {func}()", file=sys.stderr)
        return 2
    return int(fn(argv) or 0)


def cmd_experts(args: argparse.Namespace) -> int:
    from experts.registry import get_registry

    items = get_registry().describe()
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    width = max((len(i["name"]) for i in items), default=4)
    for item in items:
        props = item["args_schema"].get("properties", {})
        required = set(item["args_schema"].get("required", []))
        sig = ", ".join(p if p in required else f"[{p}]" for p in props)
        print(f"{item['name']:<{width}}  {item['description']}")
        print(f"{'':<{width}}  args: {sig}   (package {item['package']}, queue {item['queue']})")
    return 0


def _print_event(ev: Any) -> None:
    extra = f" {ev.progress:.0%}" if ev.stage == "progress" and ev.progress is not None else ""
    msg = f" — {ev.message}" if ev.message else ""
    print(f"  [{ev.call_id}] {ev.expert}: {ev.stage}{extra}{msg}", flush=True)


def run_commands(text: str, images: list[Path], *, as_json: bool, out: Path | None,
                 conversation_id: str | None = None) -> int:
    """Validate and execute the commands in ``text``; ``{image}``/``{image2}``… stand for ``--image`` files."""
    from experts.registry import get_registry
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.dispatch import make_dispatcher
    from orchestrator.errors import SwitchboardError
    from orchestrator.plan import Plan
    from orchestrator.settings import get_settings

    settings = get_settings()
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
                                     on_event=None if as_json else _print_event)
    finally:
        dispatcher.close()
    artifacts = []
    for a in result.artifacts():
        path = store.path(a["id"])
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            ext = {"image/png": ".png", "application/json": ".json"}.get(store.get(a["id"]).media_type, ".bin")
            target = out / f"{a['call_id']}-{a['role'].replace(' ', '_') or a['kind']}{ext}"
            target.write_bytes(path.read_bytes())
            path = target
        artifacts.append({**a, "path": str(path)})
    if as_json:
        print(json.dumps({
            "inputs": slots,
            "calls": [o.to_dict() for o in result.outcomes],
            "errors": [e.to_dict() for e in plan.errors],
            "artifacts": artifacts,
        }, indent=2))
    else:
        for o in result.outcomes:
            line = (o.result or {}).get("summary") if o.status == "done" else o.error
            print(f"{o.call_id} {o.expert:<8} {o.status:<7} {o.seconds * 1000:7.0f} ms  {line}")
        for a in artifacts:
            print(f"  artifact {a['id']} ({a['role']}) from {a['call_id']}: {a['path']}")
    return 0 if result.ok and not plan.errors else 1


def cmd_run(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    return run_commands(text, args.image or [], as_json=args.json, out=args.out)


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import main as demo_main

    return demo_main(out=args.out, scripted=args.scripted)


def cmd_artifacts(args: argparse.Namespace) -> int:
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.errors import SwitchboardError

    store = ArtifactStore.from_settings()
    if args.id:
        try:
            meta = store.get(args.id)
        except SwitchboardError as e:
            print(f"switchboard: {e}", file=sys.stderr)
            return 1
        print(json.dumps({**meta.model_dump(), "path": str(store.path(args.id))}, indent=2))
        return 0
    for meta in store.list():
        print(f"{meta.id}  {meta.media_type:<18} {meta.size:>9} B  call={meta.call_id or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchboard", description="Tool-routing multimodal assistant.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("experts", help="list registered experts (built-in and plugins)")
    e.add_argument("--json", action="store_true", help="print JSON: name, description, args schema, package")
    e.set_defaults(func=cmd_experts)

    r = sub.add_parser("run", help="validate and execute the commands written in TEXT (no core involved)")
    r.add_argument("text", help='text with <call …/> commands, or - for stdin; {image} = the first --image')
    r.add_argument("--image", action="append", type=Path, help="attach an image (repeatable)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--out", type=Path, help="copy the artifacts made into this folder")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="run the main job on the embedded default and show what it did")
    d.add_argument("--out", type=Path, default=Path("demo-out"), help="where to write the artifacts")
    d.add_argument("--scripted", action="store_true", help="run the scripted plan, not the core")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("artifacts", help="list the artifact store, or show one artifact")
    a.add_argument("id", nargs="?")
    a.set_defaults(func=cmd_artifacts)

    for name, (_, _, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    for verb in ("train", "eval"):
        sub.add_parser(verb, help=f"{verb} a model: {', '.join(RECIPES)}", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module, func, _ = DELEGATED[argv[0]]
        return _delegate(module, func, argv[1:])
    if argv and argv[0] in ("train", "eval"):
        verb = argv[0]
        if len(argv) < 2 or argv[1] not in RECIPES:
            print(f"usage: switchboard {verb} {{{','.join(RECIPES)}}} [options]", file=sys.stderr)
            return 2
        return _delegate(f"training.{argv[1]}", f"main_{verb}", argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
