"""What batching can win on this machine at most: one expert's ``run`` 16 times vs one ``run_batch`` of 16, in-process.

    python benchmarks/batch_ceiling.py [--json] [--experts detect,segment,generate] [--calls 16] [--rounds 3]
                                       [--threads 2] [--device cpu|cuda]

``benchmarks/batching.py`` measures the real thing (Celery workers, one at a time vs batched); this
script measures the same calls with no broker, no worker and no threads pool around them: what the
experts themselves gain from a batch on this hardware. The worker benchmark's ratio can be somewhat
higher (a batching worker overlaps per-call messaging and progress writes with the batch's compute,
which a one-at-a-time worker pays in series) but not by much when the model dominates. Rounds
alternate between the two modes on the same fresh inputs (a new shapes-world image, or prompt and
seed, per call and round), so a change in the machine's load hits both alike. It also prints each
expert's main model alone at batch 1 vs batch ``--calls`` (per item), which is what a batch can save
at best: on a CPU that per-item cost barely falls (or rises, once activations leave the cache), on a
GPU it falls many times over.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python benchmarks/batch_ceiling.py
    sys.path.insert(0, str(REPO_ROOT))

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
    os.environ.setdefault(_var, "1")


def model_forward(name: str, expert: Any, device: str) -> Callable[[int], None]:
    """A function running the expert's main model once on a batch of ``n`` dummy inputs."""
    import torch

    if name == "segment":
        enc = expert.runner.sam.image_encoder
        size = int(enc.img_size)
        return lambda n: enc(torch.randn(n, 3, size, size, device=device))
    if name == "detect":
        net = expert._model.model  # the ultralytics DetectionModel (nn.Module) behind YOLO(...)
        size = int(expert._imgsz)
        return lambda n: net(torch.rand(n, 3, size, size, device=device))
    if name == "generate":
        pipe = expert._pixel or expert._pipe  # the embedded pixel pipeline, or a diffusers one
        unet = pipe.unet
        cfg = unet.config
        size = int(cfg.sample_size)
        cross = int(cfg.cross_attention_dim)

        def step(n: int) -> None:
            x = torch.randn(n, int(cfg.in_channels), size, size, device=device)
            t = torch.full((n,), 500, device=device, dtype=torch.long)
            kw: dict[str, Any] = {"encoder_hidden_states": torch.randn(n, 8, cross, device=device)}
            if cfg.class_embed_type is not None or cfg.projection_class_embeddings_input_dim:
                dim = int(cfg.projection_class_embeddings_input_dim or cross)
                kw["class_labels"] = torch.randn(n, dim, device=device)
            unet(x, t, **kw)
        return step
    raise ValueError(f"no model forward for {name}")


def time_model(fwd: Callable[[int], None], n: int, device: str, reps: int = 3) -> dict[str, float]:
    """Per-item milliseconds of the model at batch 1 (n runs) and batch n (one run), best of reps."""
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        fwd(1), fwd(n)  # warm-up
        one, many = [], []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            for _ in range(n):
                fwd(1)
            sync()
            one.append((time.perf_counter() - t) / n)
            t = time.perf_counter()
            fwd(n)
            sync()
            many.append((time.perf_counter() - t) / n)
    return {"batch1_ms_per_item": round(1000 * min(one), 2), f"batch{n}_ms_per_item": round(1000 * min(many), 2),
            "ratio": round(min(one) / min(many), 3)}


def run(a: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from batching import availability, make_inputs

    from switchboard.artifacts import ArtifactStore
    from switchboard.expert import RunContext
    from switchboard.registry import get_registry

    torch.set_num_threads(a.threads)
    registry = get_registry()
    out: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
                           "device": a.device, "torch_threads": a.threads, "calls": a.calls, "rounds": a.rounds,
                           "load_average_start": [round(x, 2) for x in os.getloadavg()], "experts": {}}
    with tempfile.TemporaryDirectory(prefix="sb-ceiling-") as tmp:
        store = ArtifactStore(Path(tmp))
        for name in [n.strip() for n in a.experts.split(",") if n.strip()]:
            why = availability(name, registry)
            if why:
                log(f"{name}: {why}")
                out["experts"][name] = {"skipped": why}
                continue
            cls = registry.get_class(name)
            expert = registry.instance(name)
            expert.ensure_setup()

            def calls(seed: int, cls: Any = cls, name: str = name) -> list[tuple[Any, RunContext]]:
                return [(cls.Args.model_validate(x), RunContext(store, call_id=f"c{i}", registry=get_registry()))
                        for i, x in enumerate(make_inputs(name, store, seed, a.calls))]

            one = calls(900)
            for args, ctx in one[:2]:
                expert(args, ctx)
            expert.run_batch(calls(901))
            single_s, batch_s = [], []
            for r in range(a.rounds):
                for mode in (("single", "batch") if r % 2 == 0 else ("batch", "single")):
                    items = calls(100 + 2 * r + (mode == "batch"))
                    if hasattr(expert, "cache"):
                        expert.cache.clear()  # no embedding reuse between rounds
                    t = time.perf_counter()
                    if mode == "single":
                        for args, ctx in items:
                            expert(args, ctx)
                        single_s.append(time.perf_counter() - t)
                    else:
                        expert.run_batch(items)
                        batch_s.append(time.perf_counter() - t)
            s, b = statistics.median(single_s), statistics.median(batch_s)
            row: dict[str, Any] = {"single_calls_per_s": round(a.calls / s, 2), "batch_calls_per_s": round(a.calls / b, 2),
                                   "ceiling_ratio": round(s / b, 3)}
            try:
                row["model_only"] = time_model(model_forward(name, expert, a.device), a.calls, a.device)
            except (AttributeError, ValueError, TypeError, RuntimeError) as e:
                row["model_only"] = {"skipped": f"{type(e).__name__}: {e}"}
            log(f"{name}: run x{a.calls} {row['single_calls_per_s']} calls/s, run_batch({a.calls}) "
                f"{row['batch_calls_per_s']} calls/s -> ceiling x{row['ceiling_ratio']}; model alone {row['model_only']}")
            out["experts"][name] = row
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--experts", default="detect,segment,generate")
    p.add_argument("--calls", type=int, default=16, help="calls per batch (default 16, as batching.py)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per mode (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the dummy model-only inputs live (the experts pick their own device)")
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    figures = run(a, log)
    if a.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"batch ceiling: {a.calls} calls, {a.threads} torch thread(s), {figures['machine']}, device {a.device}")
        print(f"{'expert':<10} {'run x' + str(a.calls) + ' calls/s':>16} {'run_batch calls/s':>18} {'ceiling':>8}   "
              "model alone (ms/item)")
        for name, row in figures["experts"].items():
            if "skipped" in row:
                print(f"{name:<10} {row['skipped']}")
                continue
            m = row["model_only"]
            ms = ("skipped" if "skipped" in m else
                  f"batch 1 {m['batch1_ms_per_item']}, batch {a.calls} {m[f'batch{a.calls}_ms_per_item']} (x{m['ratio']})")
            print(f"{name:<10} {row['single_calls_per_s']:>16} {row['batch_calls_per_s']:>18} "
                  f"{'x' + str(row['ceiling_ratio']):>8}   {ms}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
