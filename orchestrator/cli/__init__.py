"""The ``switchboard`` command. Heavy libraries are imported inside commands, so ``--help`` is fast."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Subcommands implemented in other packages: name -> (module, function, help). Each takes argv.
DELEGATED: dict[str, tuple[str, str, str]] = {
    "shapes": ("training.shapes", "main", "write a shapes-world dataset (images, COCO annotations, refs)"),
    "worker": ("workers.cli", "main", "start a Celery worker for some experts' queues"),
    "serve": ("orchestrator.cli.serve", "main", "serve the OpenAI-compatible API and the web chat page"),
    "plan": ("orchestrator.cli.chat", "plan_main", "the core's reply and parsed calls, not executed"),
    "chat": ("orchestrator.cli.chat", "chat_main", "chat with the core: plan, run the calls, answer"),
    "gc": ("orchestrator.cli.gc", "main", "remove conversations older than the retention and their artifacts"),
}
# `switchboard train X` / `switchboard eval X` -> training.X.main_train / main_eval
RECIPES = ("detector", "segmenter", "generator", "editor", "core", "router", "conversations")


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
    from switchboard.registry import get_registry

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


def cmd_run(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    from orchestrator.cli.run import run_commands
    from switchboard.settings import get_settings

    return run_commands(text, args.image or [], settings=get_settings(), as_json=args.json, out=args.out)


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.cli.demo import main as demo_main

    return demo_main(out=args.out, scripted=args.scripted)


def cmd_artifacts(args: argparse.Namespace) -> int:
    from switchboard.artifacts import ArtifactStore
    from switchboard.errors import SwitchboardError
    from switchboard.settings import get_settings

    store = ArtifactStore.from_settings(get_settings())
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

