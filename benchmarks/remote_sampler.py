"""What a remote core's routed call costs on llama-cpp-python, and where the time goes (issue #30).

    .venv/bin/python benchmarks/remote_sampler.py [--json] [--threads 1,2] [--repeat 1]

The same chat requests (the remote core's real system prompt, rendered from the registry, and the turn's
grammar as GBNF, as ``RemoteCore`` sends them) on the SmolLM2-135M-Instruct GGUF, in this process, side by
side in one run:

- ``first``: llama-cpp-python's own sampler chain, the grammar over the whole vocabulary at every token;
- ``last``: ``orchestrator.core.llama_server``'s, which checks the sampled token against the grammar and
  applies it to the whole vocabulary only when that token is rejected (llama.cpp's server's order);
- ``free``: no grammar (what the model writes unconstrained: shorter, and not the call);

each with ``--threads`` llama.cpp threads. Printed: seconds per call (p50), tokens per call, ms per token,
the share of tokens the grammar rejected, the ratios first/last and threads, and whether the two grammar
orders wrote identical replies (they must: greedy decoding). The system prompt is prefilled once per model
before timing (the server keeps it as a cached prefix the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE = "image-" + "5e" * 12
REQUESTS = [("find the red circle", ("detect",)), ("cut out the dog", ("segment",)),
            ("crop the left half of the picture", ("crop",)), ("draw a cat on a sofa", ("generate",)),
            ("make the sky purple", ("segment", "edit")), ("find the dog and then crop to it", ("detect", "crop"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--threads", default="1,2", help="llama.cpp thread counts to compare (default 1,2)")
    p.add_argument("--repeat", type=int, default=1, help="timings per request and setting (the fastest is kept)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llama_cpp

    from orchestrator.core.grammar import CommandGrammar
    from orchestrator.core.llama_server import GrammarLastSampler, grammar_last_llama
    from orchestrator.core.loop import TOKENS_PER_CALL
    from orchestrator.core.model import smollm2_gguf
    from orchestrator.core.remote import RemoteCore
    from switchboard.registry import get_registry

    registry = get_registry()
    core = RemoteCore("http://127.0.0.1:9/v1", "m", registry=registry, send_images=False)
    threads = [int(t) for t in a.threads.split(",")]
    kw = {"n_ctx": 4096, "n_threads": threads[0], "n_threads_batch": threads[0], "verbose": False}
    models = {"first": llama_cpp.Llama(str(smollm2_gguf()), **kw), "last": grammar_last_llama()(str(smollm2_gguf()), **kw)}
    models["free"] = models["first"]
    cases = []
    for request, route in REQUESTS:
        g = CommandGrammar.from_registry(registry, {IMAGE: "image"}, canonical=True, route=route)
        msgs = core.chat_messages([{"role": "user", "content": request, "images": [IMAGE]}], {}, grammar=g)
        cases.append((request, g, msgs, TOKENS_PER_CALL * len(route)))
    for llm in {id(m): m for m in models.values()}.values():  # the system prompt, prefilled once per model
        llm.create_chat_completion(messages=cases[0][2], max_tokens=1, temperature=0.0)
    rejected = {"n": 0, "of": 0}
    original = GrammarLastSampler.sample

    def counting(self: GrammarLastSampler, ctx: Any, idx: int = -1) -> int:
        before = self.resampled
        token = original(self, ctx, idx)
        rejected["n"] += self.resampled - before
        rejected["of"] += 1
        return token

    GrammarLastSampler.sample = counting  # type: ignore[method-assign]
    rows: dict[str, dict[str, Any]] = {}
    texts: dict[tuple[str, int], list[str]] = {}
    for n in threads:
        for llm in {id(m): m for m in models.values()}.values():
            llama_cpp.llama_set_n_threads(llm._ctx.ctx, n, n)
        for mode, llm in models.items():
            secs, toks, out = [], [], []
            for _request, g, msgs, budget in cases:
                best, reply = float("inf"), None
                for _ in range(a.repeat):
                    grammar = None if mode == "free" else llama_cpp.LlamaGrammar.from_string(g.gbnf(), verbose=False)
                    t = time.perf_counter()
                    reply = llm.create_chat_completion(messages=msgs, max_tokens=budget, temperature=0.0, grammar=grammar)
                    best = min(best, time.perf_counter() - t)
                secs.append(best)
                toks.append(reply["usage"]["completion_tokens"])
                out.append(reply["choices"][0]["message"]["content"])
            texts[(mode, n)] = out
            rows[f"{mode}_t{n}"] = {"s_per_call_p50": round(statistics.median(secs), 3),
                                    "s_per_call_mean": round(statistics.mean(secs), 3),
                                    "tokens_per_call": round(statistics.mean(toks), 1),
                                    "ms_per_token": round(1000 * sum(secs) / max(1, sum(toks)), 1),
                                    "in_grammar": sum(g.complete(t) for (_, g, _, _), t in zip(cases, out, strict=True))}
            print(f"{mode}_t{n}: {json.dumps(rows[f'{mode}_t{n}'])}", file=sys.stderr, flush=True)
    GrammarLastSampler.sample = original  # type: ignore[method-assign]
    res: dict[str, Any] = {"calls": len(cases), "rows": rows, "load_average": os.getloadavg()[0],
                           "rejected_token_share": round(rejected["n"] / max(1, rejected["of"]), 3)}
    for n in threads:
        res[f"first_over_last_t{n}"] = round(rows[f"first_t{n}"]["s_per_call_mean"] / rows[f"last_t{n}"]["s_per_call_mean"], 2)
        res[f"identical_t{n}"] = texts[("first", n)] == texts[("last", n)]
    if len(threads) > 1:
        res[f"last_t{threads[-1]}_over_t{threads[0]}"] = round(
            rows[f"last_t{threads[-1]}"]["s_per_call_mean"] / rows[f"last_t{threads[0]}"]["s_per_call_mean"], 2)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{'setting':10s} {'s/call p50':>10s} {'tokens':>7s} {'ms/token':>9s} {'in grammar':>10s}")
        for k, r in rows.items():
            print(f"{k:10s} {r['s_per_call_p50']:10.2f} {r['tokens_per_call']:7.1f} {r['ms_per_token']:9.1f} "
                  f"{r['in_grammar']:>7d}/{len(cases)}")
        print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
