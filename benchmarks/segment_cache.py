"""How much the segment expert's embedding cache saves: first vs repeated prompt on the same image.

    python benchmarks/segment_cache.py            # a table
    python benchmarks/segment_cache.py --json     # one JSON object

Both cases are measured side by side in one run, on the shipped segmenter (or SWITCHBOARD_SEGMENT_WEIGHTS):

- ``prompt``: from a point prompt to masks, through the expert's ``embed`` (cache) and decoder —
  cold (cache cleared: image encoder + decoder) versus warm (embedding cached: decoder only).
- ``call``: a whole expert call (also reading the image and writing masks, RLE and overlay).

Each round uses a new shapes-world image; the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="images (default 15)")
    p.add_argument("--repeats", type=int, default=5, help="repeated prompts per image (default 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import numpy as np
    import torch

    from experts.segment import SegmentExpert
    from switchboard.artifacts import ArtifactStore
    from switchboard.expert import RunContext
    from switchboard.registry import get_registry
    from training.shapes import make_scene

    torch.set_num_threads(a.threads)
    expert = SegmentExpert()
    expert.ensure_setup()
    runner = expert.runner
    assert runner is not None
    pts, labels = np.array([[[128.0, 128.0]]], np.float32), np.ones((1, 1), np.int64)

    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(Path(tmp))
        ctx = RunContext(store, registry=get_registry())
        ids = [store.put_image(make_scene(1000 + i).image).id for i in range(a.rounds + 1)]

        def prompt(image_id: str) -> float:
            t0 = time.perf_counter()
            emb = expert.embed(ctx, [image_id])[image_id]
            runner.predict(emb, points=pts, labels=labels)
            return time.perf_counter() - t0

        def call(image_id: str, k: int) -> float:
            t0 = time.perf_counter()
            expert({"image": image_id, "points": [[500 + k, 500]]}, ctx)
            return time.perf_counter() - t0

        prompt(ids[-1]), call(ids[-1], 0)  # warm up allocators and lazy imports
        cold_p, warm_p, cold_c, warm_c = [], [], [], []
        for image_id in ids[:-1]:
            expert.cache.clear()
            cold_p.append(prompt(image_id))
            warm_p += [prompt(image_id) for _ in range(a.repeats)]
            expert.cache.clear()
            cold_c.append(call(image_id, 0))
            warm_c += [call(image_id, k + 1) for k in range(a.repeats)]

    med = statistics.median
    res = {
        "model": expert.model_name,
        "image_size": list(make_scene(0).image.size),
        "rounds": a.rounds,
        "prompt_first_ms": round(med(cold_p) * 1e3, 2),
        "prompt_repeat_ms": round(med(warm_p) * 1e3, 2),
        "prompt_ratio": round(med(cold_p) / med(warm_p), 2),
        "call_first_ms": round(med(cold_c) * 1e3, 2),
        "call_repeat_ms": round(med(warm_c) * 1e3, 2),
        "call_ratio": round(med(cold_c) / med(warm_c), 2),
        "threads": a.threads,
    }
    if a.json:
        print(json.dumps(res))
    else:
        print(f"segment embedding cache — {res['model']}, {a.rounds} images, median")
        print(f"  prompt -> masks   first {res['prompt_first_ms']:8.2f} ms   repeated {res['prompt_repeat_ms']:8.2f} ms"
              f"   ratio {res['prompt_ratio']:.2f}x")
        print(f"  whole call        first {res['call_first_ms']:8.2f} ms   repeated {res['call_repeat_ms']:8.2f} ms"
              f"   ratio {res['call_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
