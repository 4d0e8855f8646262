"""`make demo`: the main job on the embedded default, narrated.

With the shipped core (models/core/) it is a short real conversation on the bundled image: the core
plans, the experts run in-process, the core answers, and a second turn uses the first turn's
artifacts. Without a core it falls back to a scripted plan through the same dispatcher. Either way
it ends on a real photograph (ultralytics' bundled bus.jpg): the embedded detector knows only the
shapes world, and the demo shows it saying so instead of inventing shapes.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

from orchestrator.cli.run import run_commands

TURNS = ("find the red circle", "now segment it")


def bundled_image() -> Path:
    """A shapes-world scene (seed 1025): a red square, a purple and an orange triangle, a red circle."""
    return Path(str(files("orchestrator") / "assets" / "demo.png"))


def bundled_photo() -> Path | None:
    """A real photograph that ships with ultralytics (a bus in a street), if it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "assets" / "bus.jpg"
    return path if path.is_file() else None


PHOTO_PLAN = '<call id="p1" expert="detect" image="{image}" query="everything"/>'


def photo_check(out: Path, settings: Any, names: list[str]) -> int:
    """detect on a real photograph: the embedded detector says it only knows the shapes world."""
    photo = bundled_photo()
    if "detect" not in names or photo is None:
        return 0
    print(f"\nA real photograph: {photo}")
    print("The embedded models only know the shapes world; on a photo they say so instead of inventing shapes:")
    return run_commands(PHOTO_PLAN, [photo], settings=settings, as_json=False, out=out)


def scripted_plan(names: list[str]) -> tuple[str, str]:
    if "detect" in names and "segment" in names:
        return ("Find the red circle, outline it and crop it.",
                'I will find the red circle, segment it and cut it out.\n'
                '<call id="c1" expert="detect" image="{image}" query="red circle"/>\n'
                '<call id="c2" expert="segment" image="{image}" boxes="$c1"/>\n'
                '<call id="c3" expert="crop" image="{image}" boxes="$c1" margin="20"/>')
    if "detect" in names:
        return ("Find the red circle and crop it.",
                'I will find the red circle and cut it out.\n'
                '<call id="c1" expert="detect" image="{image}" query="red circle"/>\n'
                '<call id="c2" expert="crop" image="{image}" boxes="$c1" margin="20"/>')
    return ("Show me the top-left quarter and the middle of the picture.",
            'Here are the two regions.\n'
            '<call id="c1" expert="crop" image="{image}" region="[0,0,500,500]"/>\n'
            '<call id="c2" expert="crop" image="{image}" region="[250,250,750,750]"/>')


def conversation(out: Path, settings: Any) -> int:
    """Two turns with the shipped core on the bundled image, every stage printed as it happens."""
    from orchestrator.cli.output import export_artifacts, print_artifacts, print_event
    from orchestrator.core.loop import ChatResult
    from orchestrator.runtime import build_assistant

    print("Loading the core (SmolLM2-135M + vision tower + LoRA; the first run converts the base model)…",
          flush=True)
    assistant = build_assistant(settings)
    image_id = assistant.store.import_image(bundled_image().read_bytes()).id
    out.mkdir(parents=True, exist_ok=True)
    conv_id = None
    for i, text in enumerate(TURNS):
        print(f"\nUser: {text}" + (f"   [image {image_id}]" if i == 0 else ""), flush=True)
        result = None
        for ev in assistant.stream(text, images=[image_id] if i == 0 else [], conversation_id=conv_id):
            if isinstance(ev, ChatResult):
                result = ev
            else:
                print_event(ev, indent="  ")
        assert result is not None
        conv_id = result.conversation_id
        if result.plan != result.answer:
            print("  plan: " + result.plan.replace("\n", "\n        "))
        print(f"Assistant: {result.answer}")
        print_artifacts(export_artifacts(assistant.store, result.artifacts, out, prefix=f"turn{i + 1}-"))
    assistant.dispatcher.close()
    from switchboard.registry import get_registry

    photo_check(out, settings, get_registry().names())
    print(f"\nArtifacts copied to {out.resolve()}")
    return 0


def main(out: Path = Path("demo-out"), scripted: bool = False) -> int:
    from switchboard.registry import get_registry
    from switchboard.settings import get_settings

    names = get_registry().names()
    image = bundled_image()
    print(f"Experts available: {', '.join(names)}")
    print(f"Image: {image}")
    s = get_settings()
    if not scripted and (s.core_model or (s.models_dir / "core" / "config.json").exists()):
        return conversation(out, s)
    request, reply = scripted_plan(names)
    print(f"User: {request}")
    print("Assistant (scripted plan: no trained core is installed):")
    for line in reply.splitlines():
        print(f"  {line}")
    print("Running the plan in-process:")
    rc = run_commands(reply, [image], settings=s, as_json=False, out=out)
    rc = max(rc, photo_check(out, s, names))
    print(f"Artifacts copied to {out.resolve()}" if rc == 0 else "The plan had errors (see above).")
    return rc


if __name__ == "__main__":
    sys.exit(main())
