"""`make demo`: the main job on the embedded default, narrated.

It grows with the product: today it runs a scripted plan on the bundled image through the
in-process dispatcher, using the best experts that are installed (detect → crop when the detector
ships, else crop alone). When the core lands, the demo is a real conversation.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

from orchestrator.cli import run_commands


def bundled_image() -> Path:
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


def main(out: Path = Path("demo-out")) -> int:
    from experts.registry import get_registry

    names = get_registry().names()
    request, reply = scripted_plan(names)
    image = bundled_image()
    print(f"Experts available: {', '.join(names)}")
    print(f"Image: {image}")
    print(f"User: {request}")
    print("Assistant (scripted plan; the trained core replaces this script):")
    for line in reply.splitlines():
        print(f"  {line}")
    print("Running the plan in-process:")
    rc = run_commands(reply, [image], as_json=False, out=out)
    print(f"Artifacts copied to {out.resolve()}" if rc == 0 else "The plan had errors (see above).")
    return rc


if __name__ == "__main__":
    sys.exit(main())
