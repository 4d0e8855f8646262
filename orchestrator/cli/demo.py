"""`make demo`: the main job on the embedded default, narrated.

With the shipped core (models/core/) it is a short real conversation on the bundled image: the core
plans, the experts run in-process, the core answers, and a second turn uses the first turn's
artifacts. Without a core it falls back to a scripted plan through the same dispatcher.
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
    print(f"Artifacts copied to {out.resolve()}" if rc == 0 else "The plan had errors (see above).")
    return rc


if __name__ == "__main__":
    sys.exit(main())
