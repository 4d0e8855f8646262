"""How much the fusion pass saves by starting from the plan pass's KV cache.

    python benchmarks/core_prefix.py            # a table
    python benchmarks/core_prefix.py --json     # one JSON object

Whole turns run through the real loop (``Assistant.run``: plan pass, the shipped experts in process,
fusion pass) on the shipped core (or SWITCHBOARD_CORE_MODEL), twice per conversation, side by side
in one run: once with ``reuse_prefix`` on and once off (alternating which goes first). Only the
fusion pass differs between the two; the benchmark times it (whole pass, and time to its first
text) and reads how many prompt tokens came from the plan pass's cache and how many were prefilled.
Answers must be identical with and without reuse (greedy); the count of identical ones is printed.

Each conversation is a new shapes-world scene with a request about one of its objects; a
conversation whose plan makes no call has no fusion pass and is left out of the figures.
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

VERBS = ["find {}", "segment {}", "outline {}", "where is {}?", "draw a box around {}", "mask {}"]


class TimedCore:
    """The core, with each ``generate`` call timed (whole call and first text) and its token counts kept."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def generate(self, messages: list[dict], images: dict[str, Any], *, on_text: Any = None,
                 prefix_cache: Any = None, **kw: Any) -> str:
        first: list[float] = []

        def text(t: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if on_text is not None:
                on_text(t)

        t0 = time.perf_counter()
        out = self.core.generate(messages, images, on_text=text, prefix_cache=prefix_cache, **kw)
        t1 = time.perf_counter()
        if prefix_cache is not None:
            tokens = dict(prefix_cache.last)
        else:
            n = len(self.core.encode(messages, images)["input_ids"])
            tokens = {"prompt": n, "reused": 0, "prefilled": n}
        answer = len(self.core.tokenizer(out, add_special_tokens=False)["input_ids"])
        self.calls.append({"s": t1 - t0, "first_text_s": (first[0] if first else t1) - t0, "answer_tokens": answer,
                           **tokens})
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=6, help="conversations (default 6)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
        os.environ.setdefault(var, "1")
    import torch

    from orchestrator.core.loop import Assistant
    from orchestrator.core.model import CoreModel
    from orchestrator.dispatch import LocalDispatcher
    from orchestrator.session import ConversationStore
    from switchboard.artifacts import ArtifactStore
    from switchboard.registry import get_registry
    from switchboard.settings import get_settings
    from training.shapes import make_scene

    if a.threads:
        torch.set_num_threads(a.threads)
    t_load = time.perf_counter()
    core = TimedCore(CoreModel.load(get_settings().core_model))
    load_s = time.perf_counter() - t_load
    registry = get_registry()

    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(Path(tmp) / "artifacts")
        dispatcher = LocalDispatcher(registry, store)
        on, off = (Assistant(core, registry, store, dispatcher, ConversationStore(Path(tmp) / f"conv-{k}"),
                             reuse_prefix=k == "on") for k in ("on", "off"))

        def turn(assistant: Assistant, request: str, image: str) -> tuple[Any, dict[str, Any] | None]:
            core.calls.clear()
            result = assistant.run(request, images=[image])
            calls = list(core.calls)
            if len(calls) == 2:
                calls[1]["plan_s"] = calls[0]["s"]
            return result, (calls[1] if len(calls) == 2 else None)

        requests = []
        for i in range(a.conversations + 1):  # the first one warms up (expert setup, allocators)
            scene = make_scene(4000 + i)
            expression = scene.referring[0][0] if scene.referring else f"the {scene.objects[0].colour} shape"
            requests.append((VERBS[i % len(VERBS)].format(expression), store.put_image(scene.image).id))
        turn(on, *requests[0]), turn(off, *requests[0])

        rows, skipped, identical = [], 0, 0
        for i, (request, image) in enumerate(requests[1:]):
            order = (on, off) if i % 2 == 0 else (off, on)
            runs = {id(x): turn(x, request, image) for x in order}
            (r_on, f_on), (r_off, f_off) = runs[id(on)], runs[id(off)]
            if f_on is None or f_off is None:
                skipped += 1
                continue
            identical += r_on.answer == r_off.answer and r_on.plan == r_off.plan
            rows.append({"request": request, "on": f_on, "off": f_off, "answer": r_on.answer})

    if not rows:
        print("no conversation reached a fusion pass (every plan answered directly)", file=sys.stderr)
        return 1
    med = statistics.median

    def p50(side: str, key: str) -> float:
        return med(r[side][key] for r in rows)

    res = {
        "core": core.info.get("base", "models/core") if isinstance(core.info, dict) else "models/core",
        "conversations": len(rows),
        "skipped_no_calls": skipped,
        "identical_answers": identical,
        "fusion_with_reuse_ms": round(p50("on", "s") * 1e3, 1),
        "fusion_without_reuse_ms": round(p50("off", "s") * 1e3, 1),
        "fusion_ratio": round(p50("off", "s") / p50("on", "s"), 2),
        "first_text_with_reuse_ms": round(p50("on", "first_text_s") * 1e3, 1),
        "first_text_without_reuse_ms": round(p50("off", "first_text_s") * 1e3, 1),
        "first_text_ratio": round(p50("off", "first_text_s") / p50("on", "first_text_s"), 2),
        "prompt_tokens_p50": p50("on", "prompt"),
        "prefix_tokens_reused_p50": p50("on", "reused"),
        "suffix_tokens_prefilled_p50": p50("on", "prefilled"),
        "answer_tokens_p50": p50("on", "answer_tokens"),
        "plan_pass_ms_p50": round(p50("on", "plan_s") * 1e3, 1),
        "core_load_s": round(load_s, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{'cuda' if torch.cuda.is_available() else 'no GPU'}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "per_conversation": [{"request": r["request"], "with_reuse_ms": round(r["on"]["s"] * 1e3, 1),
                              "without_reuse_ms": round(r["off"]["s"] * 1e3, 1), "prompt": r["on"]["prompt"],
                              "reused": r["on"]["reused"], "prefilled": r["on"]["prefilled"],
                              "answer_tokens": r["on"]["answer_tokens"]} for r in rows],
    }
    if a.json:
        print(json.dumps(res))
    else:
        print(f"fusion pass, plan-pass KV cache reused vs not — {len(rows)} conversations "
              f"({skipped} without calls left out), p50")
        print(f"  whole fusion pass   reuse {res['fusion_with_reuse_ms']:8.1f} ms   no reuse "
              f"{res['fusion_without_reuse_ms']:8.1f} ms   ratio {res['fusion_ratio']:.2f}x")
        print(f"  time to first text  reuse {res['first_text_with_reuse_ms']:8.1f} ms   no reuse "
              f"{res['first_text_without_reuse_ms']:8.1f} ms   ratio {res['first_text_ratio']:.2f}x")
        for r in res["per_conversation"]:
            print(f"    {r['request'][:40]:40s} {r['with_reuse_ms']:8.1f} vs {r['without_reuse_ms']:8.1f} ms, "
                  f"prompt {r['prompt']} = {r['reused']} reused + {r['prefilled']} prefilled")
        print(f"  plan pass p50 {res['plan_pass_ms_p50']:.1f} ms (the same in both)")
        print(f"  tokens: prompt {res['prompt_tokens_p50']}, reused prefix {res['prefix_tokens_reused_p50']}, "
              f"prefilled suffix {res['suffix_tokens_prefilled_p50']}, answer {res['answer_tokens_p50']}")
        print(f"  identical answers: {identical}/{len(rows)}; {res['machine']}, torch threads "
              f"{res['torch_threads']}, load average {res['load_average']}")
    return 0 if identical == len(rows) else 2


if __name__ == "__main__":
    raise SystemExit(main())
