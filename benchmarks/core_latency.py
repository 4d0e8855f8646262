"""Planning latency of the core: transformers' generate (one pass per token) vs jump-forward decoding.

    python benchmarks/core_latency.py            # a table
    python benchmarks/core_latency.py --json     # one JSON object
    python benchmarks/core_latency.py --quick    # a few requests (what the test runs)

The same held-out requests (training/core_data.py's held-out templates, as ``switchboard eval core``
draws them; fusion samples left out) are planned on the shipped core (or SWITCHBOARD_CORE_MODEL) by
both paths, side by side in one run, alternating which goes first:

- old: ``CoreModel.generate`` + ``GrammarLogitsProcessor`` (the free grammar), one forward pass per
  reply token;
- new: ``CoreModel.decode`` with jump-forward over the canonical grammar (call ids c1, c2 …), one pass
  per token the model chooses.

With ``--repeat R`` each request is timed R times per path (alternating) and the fastest kept.
Printed: ``plan_p50_speedup`` (one-call requests), ``forward_pass_ratio`` (passes per one-call plan,
old / new), routing metrics of both paths (``routing_delta``: the largest difference), and
``jump_forward_identical``: the share of plans unchanged by jump-forward, against token-by-token
decoding by the same loop, model and grammar (greedy). ``concurrent_throughput_ratio``: plans per
second with ``--concurrent`` requests in threads at once, new / old (no batching across requests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _artifacts(messages: list[dict]) -> dict[str, str]:
    from orchestrator.core.format import render
    from switchboard.artifacts import ID_PATTERN

    out = {}
    for tok in re.findall(r"[a-z]+-[0-9a-f]{24}", render(messages)):
        m = ID_PATTERN.match(tok)
        if m:
            out[tok] = m.group("kind")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40, help="held-out requests (default 40)")
    p.add_argument("--quick", action="store_true", help="3 one-call requests, 2 concurrent (the test's run)")
    p.add_argument("--concurrent", type=int, default=4, help="requests at once for the throughput figure")
    p.add_argument("--repeat", type=int, default=1, help="time each request this many times per path, "
                   "alternating, and keep the fastest (robust to other jobs on a shared machine)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
        os.environ.setdefault(var, "1")
    import torch

    from orchestrator.commands import parse
    from orchestrator.core.grammar import CommandGrammar, GrammarLogitsProcessor
    from orchestrator.core.model import CoreModel
    from training.core import _Images, routing_metrics
    from training.core_data import Generator, data_registry

    if a.threads:
        torch.set_num_threads(a.threads)
    core = CoreModel.load(device="cpu")
    registry = data_registry()
    gen = Generator(split="heldout", seed=10_000, n_scenes=min(400, max(16, a.n)))
    if a.quick:
        samples = gen.generate(3, "call")
        a.concurrent = min(a.concurrent, 2)
    else:
        samples = [s for s in gen.generate(a.n) if s.kind != "fusion"]
    images = _Images()
    budget = a.max_new_tokens

    def old(msgs: list[dict], ims: dict[str, Any]) -> tuple[str, int]:
        proc = GrammarLogitsProcessor(CommandGrammar.from_registry(registry, _artifacts(msgs)), core.tokenizer)
        text = core.generate(msgs, ims, max_new_tokens=budget, logits_processor=[proc])
        passes = len(core.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the end token's
        return text, min(passes, budget)

    def new(msgs: list[dict], ims: dict[str, Any], jump: bool = True) -> tuple[str, int]:
        grammar = CommandGrammar.from_registry(registry, _artifacts(msgs), canonical=True)
        out = core.decode(msgs, ims, grammar=grammar, max_new_tokens=budget, jump_forward=jump)
        return out.text, out.passes

    rows: list[dict[str, Any]] = []
    for i, s in enumerate(samples):
        msgs = s.messages
        ims = {aid: images(seed) for aid, seed in s.images.items()}
        row: dict[str, Any] = {"kind": s.kind, "gold_calls": len(s.calls)}
        for r in range(max(1, a.repeat)):
            for name in (("old", "new") if (i + r) % 2 == 0 else ("new", "old")):
                t0 = time.perf_counter()
                text, passes = (old if name == "old" else new)(msgs, ims)
                took = time.perf_counter() - t0
                if name not in row or took < row[name]["s"]:
                    row[name] = {"s": took, "passes": passes, "text": text}
        row["token_by_token"] = new(msgs, ims, jump=False)[0]
        rows.append(row)
        if not a.json:
            print(f"{i + 1}/{len(samples)} {s.kind}: old {row['old']['s']:.2f} s / {row['old']['passes']} passes, "
                  f"new {row['new']['s']:.2f} s / {row['new']['passes']} passes", file=sys.stderr, flush=True)

    one = [r for r in rows if r["gold_calls"] == 1] or rows
    p50 = {k: statistics.median(r[k]["s"] for r in one) for k in ("old", "new")}
    passes = {k: statistics.mean(r[k]["passes"] for r in one) for k in ("old", "new")}
    golds = [s.calls for s in samples]
    metrics = {k: routing_metrics(golds, [parse(r[k]["text"]).calls for r in rows]) for k in ("old", "new")}
    deltas = [abs(metrics["old"][m] - metrics["new"][m]) for m in metrics["old"]
              if isinstance(metrics["old"][m], float) and isinstance(metrics["new"].get(m), float)]

    def throughput(fn: Any) -> float:
        work = [(s.messages, {aid: images(seed) for aid, seed in s.images.items()}) for s in samples[:a.concurrent]]
        threads = [threading.Thread(target=fn, args=w) for w in work]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(work) / (time.perf_counter() - t0)

    rps_old, rps_new = throughput(old), throughput(new)
    out = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch threads "
                   f"{torch.get_num_threads()}".replace("  ", " "),
        "requests": len(rows), "one_call_requests": len(one), "repeat": max(1, a.repeat),
        "plan_p50_s": {k: round(v, 3) for k, v in p50.items()},
        "plan_p50_speedup": round(p50["old"] / p50["new"], 2),
        "passes_per_one_call_plan": {k: round(v, 1) for k, v in passes.items()},
        "forward_pass_ratio": round(passes["old"] / passes["new"], 2),
        "routing": {k: {m: v for m, v in metrics[k].items() if not isinstance(v, list)} for k in metrics},
        "routing_delta": round(max(deltas), 4) if deltas else 0.0,
        "jump_forward_identical": round(sum(r["new"]["text"] == r["token_by_token"] for r in rows) / len(rows), 4),
        "same_plan_as_old": round(sum(r["new"]["text"] == r["old"]["text"] for r in rows) / len(rows), 4),
        "concurrent": a.concurrent,
        "concurrent_rps": {"old": round(rps_old, 3), "new": round(rps_new, 3)},
        "concurrent_throughput_ratio": round(rps_new / rps_old, 2),
    }
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k:28s} {v}")
    return out


if __name__ == "__main__":
    main()
