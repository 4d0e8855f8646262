"""Editor evaluation: does the edit expert do what the instruction says, inside the mask only?

    switchboard eval editor --json            # edit_success, outside_mask_preserved (+ per action)

Held-out shapes-world scenes (dataset seed 999999). For each scene one object is the target and its
mask is the object's bounding box grown by 3 px (a box, so that a replacement of another shape fits
inside it). Actions cycle through replace ("replace it with a blue square": another colour and
shape), recolour ("make it green") and remove ("remove it"). The judge is the shipped detector on
the edited scene; a detection "is in the region" when its centre lies inside the mask's box:

- replace: a detection in the region has the requested shape and colour, none has the old label;
- recolour: a detection in the region has the old shape and the new colour, none has the old colour;
- remove: no detection in the region has the old label.

``outside_mask_preserved`` is the mean fraction of pixels outside the mask left exactly unchanged.
The edit expert uses the generator named by SWITCHBOARD_GENERATE_MODEL (default: the shipped one).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from training.shapes import COLOURS, SHAPES, make_scene, scene_seed

DEFAULT_EVAL_SEED = 999_999
ACTIONS = ("replace", "recolour", "remove")
GROW = 3


def edit_cases(n: int, seed: int = DEFAULT_EVAL_SEED) -> list[dict[str, Any]]:
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    cases = []
    for k in range(n):
        scene = make_scene(scene_seed(seed, k), size=256, min_objects=1, max_objects=4)
        target = max(range(len(scene.objects)), key=lambda i: scene.objects[i].area)
        obj = scene.objects[target]
        action = ACTIONS[k % len(ACTIONS)]
        x1, y1, x2, y2 = obj.box
        mask = np.zeros((256, 256), bool)
        mask[max(0, int(y1) - GROW):min(256, int(y2) + GROW), max(0, int(x1) - GROW):min(256, int(x2) + GROW)] = True
        new_colour = str(rng.choice([c for c in COLOURS if c != obj.colour]))
        new_shape = str(rng.choice([s for s in SHAPES if s != obj.shape]))
        if action == "replace":
            art = "an" if new_colour[0] in "aeiou" else "a"
            instruction = f"replace it with {art} {new_colour} {new_shape}"
        elif action == "recolour":
            instruction = f"make it {new_colour}"
            new_shape = obj.shape
        else:
            instruction = "remove it"
        cases.append({"scene": scene, "mask": mask, "action": action, "instruction": instruction,
                      "old": (obj.shape, obj.colour), "new": (new_shape, new_colour), "seed": k})
    return cases


def judge_case(case: dict[str, Any], dets: list[Any]) -> bool:
    ys, xs = np.nonzero(case["mask"])
    bx1, by1, bx2, by2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1

    def inside(d: Any) -> bool:
        cx, cy = (d.xyxy[0] + d.xyxy[2]) / 2, (d.xyxy[1] + d.xyxy[3]) / 2
        return bx1 <= cx <= bx2 and by1 <= cy <= by2

    there = [(d.cls, d.colour) for d in dets if inside(d)]
    old_shape, old_colour = case["old"]
    if case["action"] == "replace":
        return case["new"] in there and case["old"] not in there
    if case["action"] == "recolour":
        return case["new"] in there and all(c != old_colour for _, c in there)
    return case["old"] not in there


def main_eval(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="switchboard eval editor", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", type=Path, default=None, help="write before/after images here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image
    from tqdm import tqdm

    from experts.edit import EditExpert
    from switchboard.artifacts import ArtifactStore
    from switchboard.expert import RunContext
    from training.generator import Judge

    torch.set_num_threads(args.threads)
    expert = EditExpert()
    judge = Judge()
    cases = edit_cases(args.n, args.seed)
    per_action: dict[str, list[bool]] = {a: [] for a in ACTIONS}
    preserved: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = ArtifactStore(Path(tmp))
        for case in tqdm(cases, desc="editor eval", disable=args.json):
            img_id = store.put_image(case["scene"].image).id
            mask_id = store.put_image(Image.fromarray(case["mask"].astype(np.uint8) * 255, mode="L"), kind="mask").id
            res = expert({"image": img_id, "mask": mask_id, "instruction": case["instruction"],
                          "steps": args.steps, "seed": case["seed"]}, RunContext(store))
            edited = store.open_image(res.artifacts[0].id)
            before = np.asarray(case["scene"].image)
            after = np.asarray(edited)
            outside = ~case["mask"]
            preserved.append(float((before[outside] == after[outside]).all(axis=-1).mean()))
            ok = judge_case(case, judge.detector._predict([edited], 0.25)[0])
            per_action[case["action"]].append(ok)
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                tag = f"{case['seed']:03d}-{case['action']}-{'ok' if ok else 'miss'}"
                Image.fromarray(np.concatenate([before, after], axis=1)).save(args.save / f"{tag}.png")
    flat = [ok for oks in per_action.values() for ok in oks]
    result = {"edit_success": round(sum(flat) / max(len(flat), 1), 4),
              "outside_mask_preserved": round(float(np.mean(preserved)) if preserved else 0.0, 6),
              **{f"{a}_success": round(sum(v) / max(len(v), 1), 4) for a, v in per_action.items()},
              "n": len(flat), "steps": args.steps, "seed": args.seed}
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_eval())
