"""Whole turns with the core's answer drafts on vs off: the loop's plan and answer passes.

    python benchmarks/core_answers.py            # a table
    python benchmarks/core_answers.py --json     # one JSON object
    python benchmarks/core_answers.py --quick    # 3 conversations (what the test runs)

Whole turns run through the real loop (``Assistant.run``: router, plan pass, the shipped experts in
process, answer pass) on the shipped core (or SWITCHBOARD_CORE_MODEL), each conversation twice, side by
side in one run, alternating which goes first:

- on: what the loop does now: an answer is drafted from the core's answer sentences
  (``models/core/phrases.txt``, orchestrator.core.phrases) and, after calls, from the results in the
  tool turn (prompt lookup), each draft checked in one pass;
- off: the same loop with neither (an argument copied from the request is still drafted, the expert
  list after "I can use:" still written by the grammar).

Printed: turn p50 both ways (``turn_p50_speedup``), the core's forward passes over all turns (plan and
answer passes, ``pass_ratio``) and ``identical_answers`` (greedy: drafts never change a reply). Each
conversation is a new shapes-world scene with a request about one of its objects (find, segment,
recolour …) or one no expert serves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REQUESTS = ["find {}", "segment {}", "where is {}?", "make {} blue", "outline {}", "draw a box around {}",
            "translate this into french", "mask {}", "find similar images online"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=12, help="conversations (default 12)")
    p.add_argument("--quick", action="store_true", help="3 conversations (the test's run)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
        os.environ.setdefault(var, "1")
    import torch

    from orchestrator.core import decode as dec
    from orchestrator.core.loop import Assistant
    from orchestrator.core.model import CoreModel
    from orchestrator.dispatch import LocalDispatcher
    from orchestrator.session import ConversationStore
    from switchboard.artifacts import ArtifactStore
    from switchboard.registry import get_registry
    from switchboard.settings import get_settings
    from training.shapes import make_scene

    core = CoreModel.load(get_settings().core_model)
    if core.phrases is None:
        print("the core has no phrases.txt: `switchboard train core --phrases-only` writes it", file=sys.stderr)
    phrases, draft = core.phrases, dec._draft
    passes: list[int] = []
    decode = core.decode

    def counted(*args: Any, **kw: Any) -> Any:
        out = decode(*args, **kw)
        passes.append(out.passes)
        return out

    core.decode = counted  # type: ignore[method-assign]

    def answer_drafts(on: bool) -> None:
        core.phrases = phrases if on else None
        # off: no prompt lookup in an answer after calls (``results``) either
        dec._draft = draft if on else (lambda *x, **kw: draft(*x, **{**kw, "results": False}))

    n = 3 if a.quick else a.conversations
    registry = get_registry()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = ArtifactStore(Path(tmp) / "artifacts")
            assistant = Assistant(core, registry, store, LocalDispatcher(registry, store),
                                  ConversationStore(Path(tmp) / "conversations"))
            work = []
            for i in range(n + 1):  # the first one warms up (expert setup, allocators)
                scene = make_scene(5000 + i)
                name = scene.referring[0][0] if scene.referring else f"the {scene.objects[0].colour} shape"
                work.append((REQUESTS[i % len(REQUESTS)].format(name), store.put_image(scene.image).id))
            for i, (request, image) in enumerate(work):
                row: dict[str, Any] = {"request": request}
                for mode in (("on", "off") if i % 2 else ("off", "on")):
                    answer_drafts(mode == "on")
                    passes.clear()
                    t0 = time.perf_counter()
                    result = assistant.run(request, images=[image])
                    row[mode] = {"s": time.perf_counter() - t0, "passes": sum(passes), "answer": result.answer}
                if i:
                    rows.append(row)
                if not a.json:
                    print(f"{i}/{n} {request}: on {row['on']['s']:.2f} s / {row['on']['passes']} passes, off "
                          f"{row['off']['s']:.2f} s / {row['off']['passes']} passes", file=sys.stderr, flush=True)
    finally:
        answer_drafts(True)
        core.decode = decode  # type: ignore[method-assign]
    p50 = {k: statistics.median(r[k]["s"] for r in rows) for k in ("on", "off")}
    total = {k: sum(r[k]["passes"] for r in rows) for k in ("on", "off")}
    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
        "conversations": len(rows),
        "phrases": phrases.sentences if phrases is not None else 0,
        "turn_p50_s": {k: round(v, 3) for k, v in p50.items()},
        "turn_p50_speedup": round(p50["off"] / p50["on"], 2),
        "core_passes": total,
        "pass_ratio": round(total["off"] / max(1, total["on"]), 2),
        "identical_answers": sum(r["on"]["answer"] == r["off"]["answer"] for r in rows),
    }
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:20s} {v}")
    return out


if __name__ == "__main__":
    main()
