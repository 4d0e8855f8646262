"""Memory budget benchmark: every expert served in one process, without a budget and under one
smaller than their models' sum.

    python benchmarks/memory.py [--json] [--budget-fraction 0.6] [--rounds 3]

Each configuration runs in a fresh child process (so its peak RSS is its own): calls go round-robin
over every expert that can run here (detect, segment, generate, edit, ocr, crop …), ``--rounds``
times, so under the budget each expert is unloaded and loaded again as the others are called.

Printed: each expert's footprint (parameter/buffer bytes of its torch modules; the RSS growth during
setup() for one without torch modules), their sum, the budget, the most model bytes resident at
once, the process's peak RSS with and without the budget, how many unloads happened, and the reload
cost (setup() time of a reload, and the extra time of a call that had to reload over a warm call).
Models that an expert reaches through a shared, process-wide cache rather than its own attributes
(MiniLM, which detect and generate share) are neither counted nor unloaded.
The process's RSS also holds torch, the libraries and the allocator's free lists, which no budget on
models can release; the budget bounds the model bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python benchmarks/memory.py
    sys.path.insert(0, str(REPO_ROOT))

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
    os.environ.setdefault(_var, "1")

MB = 1024 * 1024
# Built-ins that may not be in the installed entry points yet (added since the last install).
BUILTINS = {"generate": "experts.generate:GenerateExpert", "edit": "experts.edit:EditExpert"}


def registry_with_builtins() -> Any:
    from switchboard.registry import get_registry, load_extra_experts

    reg = get_registry()
    for name, spec in BUILTINS.items():
        if name not in reg and importlib.util.find_spec(spec.split(":")[0]) is not None:
            load_extra_experts(reg, spec)
    return reg


def sample_calls(store: Any) -> dict[str, dict[str, Any]]:
    """One representative call per expert that has a model."""
    import numpy as np
    from PIL import Image

    from training.shapes import make_scene

    scene = make_scene(7)
    image = store.put_image(scene.image).id
    mask = np.zeros((scene.image.height, scene.image.width), np.uint8)
    x1, y1, x2, y2 = (int(v) for v in scene.objects[0].box)
    mask[y1:y2, x1:x2] = 255
    mask_id = store.put_image(Image.fromarray(mask, mode="L"), kind="mask").id
    return {
        "detect": {"image": image, "query": "everything"},
        "segment": {"image": image, "points": [[500, 500]]},
        "generate": {"prompt": "a red circle on a grey background", "seed": 1, "steps": 10},
        "edit": {"image": image, "mask": mask_id, "instruction": "make it blue", "steps": 10, "seed": 1},
        "_image": image,
    }


def child(budget_mb: float | None, rounds: int) -> dict[str, Any]:
    """Serve every expert round-robin in this process; report what the budget saw."""
    from switchboard.artifacts import ArtifactStore
    from switchboard.expert import RunContext
    from switchboard.memory import MemoryBudget, peak_rss_bytes, rss_bytes, set_budget

    budget = MemoryBudget(int(budget_mb * MB) if budget_mb else None)
    set_budget(budget)
    reg = registry_with_builtins()
    out: dict[str, Any] = {"budget_mb": budget_mb, "skipped": {}, "calls": []}
    with tempfile.TemporaryDirectory(prefix="sb-memory-") as tmp:
        store = ArtifactStore(Path(tmp))
        calls = sample_calls(store)
        experts = []
        for name in reg.names():
            args = calls.get(name)
            if args is None:
                examples = reg.get_class(name).examples
                if not examples:
                    out["skipped"][name] = "no sample call"
                    continue
                args = examples[0].fill(image=calls["_image"])[1]
            experts.append((name, args))
        out["rss_before_mb"] = rss_bytes() / MB
        for r in range(rounds):
            for name, args in list(experts):
                inst = reg.instance(name)
                loads_before = budget.loads.get(name, 0)
                t0 = time.perf_counter()
                try:
                    inst(args, RunContext(store, registry=reg))
                except Exception as e:  # a model that is missing here: reported, not fatal
                    out["skipped"][name] = f"{type(e).__name__}: {e}"[:200]
                    experts.remove((name, args))
                    continue
                out["calls"].append({"expert": name, "round": r, "seconds": time.perf_counter() - t0,
                                     "loaded": budget.loads.get(name, 0) > loads_before})
    out["footprints_mb"] = {n: (budget.footprint(n) or 0) / MB for n, _ in experts}
    out["footprint_kind"] = {e.name: e.how for e in budget._loaded.values()}
    out["peak_model_mb"] = budget.peak_bytes / MB
    out["peak_settled_mb"] = budget.peak_settled_bytes / MB
    out["resident_end_mb"] = budget.used_bytes / MB
    out["peak_rss_mb"] = peak_rss_bytes() / MB
    out["evictions"] = [[n, b / MB, how] for n, b, how in budget.evictions]
    out["load_seconds"] = budget.load_seconds
    return out


def run_child(budget_mb: float | None, rounds: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--rounds", str(rounds)]
    if budget_mb:
        cmd += ["--budget-mb", str(budget_mb)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(free: dict[str, Any], capped: dict[str, Any], budget_mb: float) -> dict[str, Any]:
    def median(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    experts = {}
    for name, fp in free["footprints_mb"].items():
        warm = [c["seconds"] for c in free["calls"] if c["expert"] == name and not c["loaded"]]
        reload_calls = [c["seconds"] for c in capped["calls"] if c["expert"] == name and c["loaded"] and c["round"] > 0]
        reload_setup = capped["load_seconds"].get(name, [])[1:]  # the first load is not a reload
        w, rc = median(warm), median(reload_calls)
        experts[name] = {
            "footprint_mb": round(fp, 2), "measured_by": free["footprint_kind"].get(name, "modules"),
            "warm_call_ms": round(1000 * w, 1) if w is not None else None,
            "reloads": len(reload_setup),
            "reload_setup_ms": round(1000 * median(reload_setup), 1) if reload_setup else None,
            "reload_call_extra_ms": round(1000 * (rc - w), 1) if rc is not None and w is not None else None,
        }
    total = sum(free["footprints_mb"].values())
    return {
        "experts": experts, "models_sum_mb": round(total, 2), "budget_mb": round(budget_mb, 2),
        "peak_model_mb": {"no_budget": round(free["peak_model_mb"], 2), "budget": round(capped["peak_model_mb"], 2)},
        # what the budget bounds: resident model bytes once each load has unloaded what it must
        "peak_settled_model_mb": round(capped["peak_settled_mb"], 2),
        "resident_after_mb": {"no_budget": round(free["resident_end_mb"], 2),
                              "budget": round(capped["resident_end_mb"], 2)},
        "peak_rss_mb": {"no_budget": round(free["peak_rss_mb"], 1), "budget": round(capped["peak_rss_mb"], 1)},
        "rss_before_models_mb": round(free["rss_before_mb"], 1),
        "unloads": len(capped["evictions"]),
        "skipped": {**free["skipped"], **capped["skipped"]},
        "within_budget_after_each_load": capped["peak_settled_mb"] <= budget_mb,
    }


def print_table(f: dict[str, Any]) -> None:
    print(f"memory: every expert in one process, {f['rounds']} round-robin rounds; {f['machine']}; "
          f"load average {f['load_average_start'][0]} -> {f['load_average_end'][0]}")
    print(f"{'expert':<10} {'footprint MB':>13} {'by':>8} {'warm call ms':>13} {'reloads':>8} {'reload setup ms':>16} "
          f"{'reload call +ms':>16}")
    for name, e in f["experts"].items():
        def show(v: Any) -> str:
            return "-" if v is None else f"{v:g}"
        print(f"{name:<10} {e['footprint_mb']:>13.2f} {e['measured_by']:>8} {show(e['warm_call_ms']):>13} "
              f"{e['reloads']:>8} {show(e['reload_setup_ms']):>16} {show(e['reload_call_extra_ms']):>16}")
    for name, why in f["skipped"].items():
        print(f"{name:<10} skipped: {why}")
    print(f"models' sum {f['models_sum_mb']:.2f} MB; budget {f['budget_mb']:.2f} MB; model bytes resident once each "
          f"load made room: at most {f['peak_settled_model_mb']:.2f} MB; at any moment: {f['peak_model_mb']['budget']:.2f} "
          f"MB (a first load is measured only after it happened), {f['peak_model_mb']['no_budget']:.2f} MB without a "
          f"budget; {f['unloads']} unloads")
    print(f"process peak RSS: {f['peak_rss_mb']['budget']:.1f} MB under the budget vs {f['peak_rss_mb']['no_budget']:.1f} MB "
          f"without (the process held {f['rss_before_models_mb']:.1f} MB before any model loaded)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the experts (default 3)")
    p.add_argument("--budget-fraction", type=float, default=0.6,
                   help="budget as a fraction of the models' sum (default 0.6; at least the largest model)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS; default 1)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget-mb", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.budget_mb, a.rounds)))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load0 = os.getloadavg()
    log("memory: no budget (measures each expert's footprint)")
    free = run_child(None, a.rounds, a.threads)
    fps = free["footprints_mb"]
    if not fps:
        raise SystemExit(f"no expert could run here: {free['skipped']}")
    budget_mb = max(a.budget_fraction * sum(fps.values()), 1.05 * max(fps.values()))
    log(f"memory: budget {budget_mb:.2f} MB (models' sum {sum(fps.values()):.2f} MB)")
    capped = run_child(budget_mb, a.rounds, a.threads)
    figures = summarise(free, capped, budget_mb)
    figures.update({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
                    "rounds": a.rounds, "load_average_start": [round(x, 2) for x in load0],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]})
    if a.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
