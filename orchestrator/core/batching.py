"""Batched decoding steps: concurrent turns share the core's forward passes.

Every turn decodes on its own thread (the API server runs turns in threads), one forward pass per
token the model chooses (``orchestrator.core.decode``). On a CPU a pass over one sequence leaves the
matrix units mostly idle, so the passes of concurrent turns are worth running together, as the
workers batch expert calls. :class:`StepBatcher` waits until every turn that is decoding has asked for
its next step (at most a short window), runs the steps as one forward pass and hands each turn its
own last-token logits.

Each turn keeps its own KV cache (a transformers ``DynamicCache``, so jump-forward's roll-back and the
prefix cache work as before). A batched pass packs the rows into one sequence, without padding: the
keys are every row's past followed by every row's new tokens (one chosen token, or a jump-forward
insertion, or a whole prompt), a 4-D additive mask lets each new token see only its own row's past
and, causally, its own row's new tokens, and explicit position ids give every token its own
sequence's position; the logits kept are each row's last. Afterwards each row's new keys and values
are appended to its own cache. Packing rather than padding matters on a CPU: a batch that mixes a
prefill (~40 tokens) or a jump (~10) with one-token steps would otherwise pay for every row at the
longest row's length. A step that runs alone is the plain unbatched call, so a single turn decodes
exactly as without the batcher; batched rows see the same tokens at the same positions (only the
floating-point order of the sums differs), and the greedy plans are the same
(tests/orchestrator/core/test_batching.py).

Batches run in lockstep: the serving thread waits (up to ``window_s``, 30 ms by default) until every
turn that is decoding has its next step waiting. A turn's own work between two passes (grammar
checks, re-tokenising after a jump) takes a few milliseconds, far less than a pass, so waiting for the
stragglers costs little, while a pass started without them costs a whole extra pass for them alone
(on a CPU a pass of a few rows costs about what a pass of one row costs: the weights are read once
either way). A turn that finishes leaves its session, and a batch waiting for it runs at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: how long the first step of a batch waits, at most, for the other decoding turns' steps (seconds)
DEFAULT_WINDOW_S = 0.03
DEFAULT_MAX_BATCH = 32


@dataclass
class _Step:
    feed: list[int]
    kv: Any
    pixels: Any
    done: threading.Event = field(default_factory=threading.Event)
    logits: Any = None
    error: BaseException | None = None


class StepBatcher:
    """Runs the decoding steps of concurrent turns of one core as batched forward passes.

    A decoding turn wraps its loop in :meth:`session` (so the batcher knows how many steps to wait
    for) and calls :meth:`step` for each forward pass. A batch runs as soon as every open session has
    a step waiting, or ``window_s`` after its first step arrived, whichever is first; at most
    ``max_batch`` rows at once. One thread (started on first use) runs the passes.
    """

    def __init__(self, core: Any, *, window_s: float = DEFAULT_WINDOW_S, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.core = core
        self.window_s = window_s
        self.max_batch = max(1, max_batch)
        self._cond = threading.Condition()
        self._pending: list[_Step] = []
        self._active = 0
        self._thread: threading.Thread | None = None
        #: what ran: passes, rows (their sum), and the largest batch (benchmarks read it)
        self.stats = {"passes": 0, "rows": 0, "largest": 0}

    @contextmanager
    def session(self) -> Iterator[None]:
        """One turn's decoding: while open, a batch may wait (up to the window) for this turn's step."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()  # a batch waiting for this turn need not wait any longer

    def step(self, feed: list[int], kv: Any, pixels: Any = None) -> Any:
        """One forward pass of ``feed`` (token ids) after the tokens ``kv`` holds (``pixels``: the image
        features' input for the image tokens in ``feed``). ``kv`` is extended in place; returns the
        logits (vocabulary,) of the last token."""
        item = _Step(list(feed), kv, pixels)
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="core-step-batcher", daemon=True)
                self._thread.start()
            self._pending.append(item)
            self._cond.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.logits

    # -- the serving thread ---------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                deadline = time.monotonic() + self.window_s
                while len(self._pending) < min(max(self._active, 1), self.max_batch):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            try:
                logits = run_batch(self.core, [(s.feed, s.kv, s.pixels) for s in batch])
                for s, row in zip(batch, logits, strict=True):
                    s.logits = row
            except BaseException as e:  # noqa: BLE001 - handed to every waiting turn
                for s in batch:
                    s.error = e
            self.stats["passes"] += 1
            self.stats["rows"] += len(batch)
            self.stats["largest"] = max(self.stats["largest"], len(batch))
            for s in batch:
                s.done.set()


def run_batch(core: Any, steps: list[tuple[list[int], Any, Any]]) -> list[Any]:
    """One forward pass over several sequences' steps ``(feed, kv, pixels)``; each ``kv`` (a
    ``DynamicCache``) is extended with its row's new keys and values. Returns each row's last logits."""
    import torch

    if len(steps) == 1:  # alone: exactly the unbatched call
        feed, kv, pixels = steps[0]
        kwargs: dict[str, Any] = {"input_ids": torch.tensor([feed], device=core.device), "cache": kv,
                                  "use_cache": True, "logits_to_keep": 1}
        if pixels is not None:
            kwargs["pixel_values"] = pixels
        with torch.inference_mode():
            out = core.model(**kwargs)
        if out.cache is not kv:  # a cache the model made (none was passed in)
            _append(kv, out.cache, 0, len(feed))
        return [out.logits[0, -1]]

    from transformers import DynamicCache

    dev = core.device
    feeds = [len(f) for f, _, _ in steps]
    pasts = [kv.get_seq_length() for _, kv, _ in steps]
    n_past, n_new, b = sum(pasts), sum(feeds), len(steps)
    # which row each key (every row's past, then every row's new tokens) and each query belongs to
    rows = torch.arange(b, device=dev)
    owner_q = rows.repeat_interleave(torch.tensor(feeds, device=dev))
    owner_k = torch.cat([rows.repeat_interleave(torch.tensor(pasts, device=dev)), owner_q])
    allowed = owner_q[:, None] == owner_k[None, :]
    allowed[:, n_past:] &= torch.ones((n_new, n_new), dtype=torch.bool, device=dev).tril()  # causal
    ids = torch.tensor([[t for f, _, _ in steps for t in f]], device=dev)
    pos = torch.cat([torch.arange(p, p + f, device=dev) for p, f in zip(pasts, feeds, strict=True)])[None]
    dtype = core.model.dtype
    mask = torch.zeros((1, 1, n_new, n_past + n_new), dtype=dtype, device=dev)
    mask.masked_fill_(~allowed[None, None], torch.finfo(dtype).min)
    batch_kv = DynamicCache(config=core.model.config.get_text_config())
    with_past = [kv for (_, kv, _), past in zip(steps, pasts, strict=True) if past]
    for li in range(len(with_past[0].layers) if with_past else 0):
        keys = torch.cat([kv.layers[li].keys for kv in with_past], dim=-2)
        values = torch.cat([kv.layers[li].values for kv in with_past], dim=-2)
        layer = batch_kv.layers[li]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values  # (``update`` would copy them once more)
    last = torch.tensor(feeds, device=dev).cumsum(0) - 1  # each row's last new token
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
              "cache": batch_kv, "use_cache": True, "logits_to_keep": last}
    pixels = [p for _, _, p in steps if p is not None]
    if pixels:
        kwargs["pixel_values"] = torch.cat(pixels)
    with torch.inference_mode():
        out = core.model(**kwargs)
    start = n_past
    for (_, kv, _), f in zip(steps, feeds, strict=True):
        _append(kv, out.cache, 0, f, start=start)
        start += f
    return [out.logits[0, r] for r in range(b)]


def _append(kv: Any, source: Any, row: int, count: int, *, start: int | None = None) -> None:
    """Append row ``row``'s last ``count`` positions (from ``start``) of every layer of ``source`` to ``kv``."""
    for li, layer in enumerate(source.layers):
        k, v = layer.keys, layer.values
        s = k.shape[-2] - count if start is None else start
        kv.update(k[row:row + 1, :, s:s + count], v[row:row + 1, :, s:s + count], li)  # update copies (cat)
