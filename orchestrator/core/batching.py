"""Batched decoding steps: concurrent turns share the core's forward passes.

Every turn decodes on its own thread (the API server runs turns in threads), one forward pass per
token the model chooses (``orchestrator.core.decode``). On a CPU a pass over one sequence leaves the
matrix units mostly idle, so the passes of concurrent turns are worth running together, as the
workers batch expert calls. :class:`StepBatcher` waits until every turn that is decoding has asked for
its next step (at most a short window), runs the steps as one forward pass and hands each turn its
own last-token logits.

Each turn keeps its own KV cache (a transformers ``DynamicCache``, so jump-forward's roll-back and the
prefix cache work as before). A batched pass packs the rows' new tokens (one chosen token, a
jump-forward insertion, or a whole prompt) into one sequence, without padding, with explicit position
ids, so the linear layers (most of a pass) see all rows at once. Attention is taken row by row: each
layer's new keys and values are split by row and appended to the row's own cache, and each row
attends over its own keys with what its pass alone would use (the same attention function and
mask); the logits kept are each row's last. With the linear layers packed for oneDNN (each output
row computed independently of the others: ``orchestrator.core.packed``) a row's logits and cache are
bit for bit those of its pass alone (tests/orchestrator/core/test_batching.py). Packing rather than
padding matters on a CPU: a batch that mixes a prefill (~40 tokens) or a jump (~10) with one-token
steps would otherwise pay for every row at the longest row's length; attending row by row rather than
over the packed sequence with a block mask spares a batch of 16 prompts 16 times the attention scores
it keeps, and the per-pass concatenation of every row's past.

Batches run in lockstep: the serving thread waits (up to ``window_s``, 30 ms by default) until every
turn that is decoding has its next step waiting. A turn's own work between two passes (grammar
checks, re-tokenising after a jump) takes a few milliseconds, far less than a pass, so waiting for the
stragglers costs little, while a pass started without them costs a whole extra pass for them alone
(on a CPU a pass of a few rows costs about what a pass of one row costs: the weights are read once
either way). A turn that finishes leaves its session, and a batch waiting for it runs at once.

The serving thread is the core's one compute thread: every forward pass of the core runs on it,
batched or alone (:meth:`StepBatcher.call`: ``CoreModel.run``), and so do loading the model and the
router's encoder. Measured on the 2-core machine: a one-token pass of the shipped core took 44 ms on
the only thread that had run the model, 70–75 ms on a second thread after the first had run passes
(57 ms there with one torch thread); in the 16-turn benchmark, batched passes of two rows went from
85–95 ms to 52–57 ms once the loading and every pass ran on this one thread. (Our reading: PyTorch's
CPU kernels run on OpenMP, libgomp keeps a team of workers per thread that runs parallel kernels,
and workers that share the cores with another team wait for wake-ups instead of spinning.) Threads
that run torch kernels of their own afterwards (an expert's convolutions in-process) left the
compute thread's passes as they were (48 ms before and after). The thread runs with the torch thread
count of the thread that created the batcher.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: how long the first step of a batch waits, at most, for the other decoding turns' steps (seconds)
DEFAULT_WINDOW_S = 0.03
DEFAULT_MAX_BATCH = 32
#: while turns keep arriving (sessions opening less than this apart, the last less than this ago), a
#: batch waits for them too (seconds)
SETTLE_S = 0.01
#: an idle compute thread looks this often whether its batcher (and core) is still in use (seconds)
IDLE_CHECK_S = 1.0


@dataclass
class _Step:
    feed: list[int]
    kv: Any
    pixels: Any
    keep: int = 1
    done: threading.Event = field(default_factory=threading.Event)
    logits: Any = None
    error: BaseException | None = None


@dataclass
class _Call:
    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class StepBatcher:
    """Runs the decoding steps of concurrent turns of one core as batched forward passes.

    A decoding turn wraps its loop in :meth:`session` (so the batcher knows how many steps to wait
    for) and calls :meth:`step` for each forward pass. A batch runs as soon as every open session has
    a step waiting and no burst of turns is still arriving (:data:`SETTLE_S`), or ``window_s`` after
    its first step arrived, whichever is first; at most
    ``max_batch`` rows at once; ``window_s`` = 0: every step runs alone, at once. One thread (started
    on first use, with the creating thread's torch thread count) runs the passes, and anything else
    handed to :meth:`call`.
    """

    def __init__(self, core: Any, *, window_s: float = DEFAULT_WINDOW_S, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        import torch

        self.core = core
        self.window_s = window_s
        self.max_batch = max(1, max_batch)
        self.threads = torch.get_num_threads()
        self._cond = threading.Condition()
        self._pending: list[_Step] = []
        self._calls: list[_Call] = []
        self._active = 0
        self._opened = (float("-inf"), float("-inf"))  # when the last two sessions opened (time.monotonic)
        self._thread: threading.Thread | None = None
        #: what ran: passes, rows (their sum), and the largest batch (benchmarks read it)
        self.stats = {"passes": 0, "rows": 0, "largest": 0}

    @contextmanager
    def session(self) -> Iterator[None]:
        """One turn's decoding: while open, a batch may wait (up to the window) for this turn's step."""
        with self._cond:
            self._active += 1
            self._opened = (self._opened[1], time.monotonic())
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()  # a batch waiting for this turn need not wait any longer

    @property
    def decoding(self) -> int:
        """How many turns are decoding now (open sessions)."""
        return self._active

    def step(self, feed: list[int], kv: Any, pixels: Any = None, keep: int = 1) -> Any:
        """One forward pass of ``feed`` (token ids) after the tokens ``kv`` holds (``pixels``: the image
        features' input for the image tokens in ``feed``). ``kv`` is extended in place; returns the
        logits (vocabulary,) of the last token, or with ``keep`` > 1 those of the last ``keep`` tokens
        (keep, vocabulary): a drafted continuation is checked in one pass (``orchestrator.core.decode``)."""
        return self._submit(self._pending, _Step(list(feed), kv, pixels, keep)).logits

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on the compute thread (between batches); its result, or its exception raised here."""
        if threading.current_thread() is self._thread:
            return fn()
        return self._submit(self._calls, _Call(fn)).result

    def _submit(self, queue: list[Any], item: Any) -> Any:
        """Queue ``item`` (a step or a call) for the compute thread and wait until it has run."""
        with self._cond:
            self._start()
            queue.append(item)
            self._cond.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            # the thread holds the batcher only weakly between units of work: a core that is no longer
            # used (and its model) can be freed, and the thread then ends
            self._thread = threading.Thread(target=_serve, args=(weakref.ref(self), self._cond),
                                            name="core-compute", daemon=True)
            self._thread.start()

    # -- the serving thread ---------------------------------------------------------------------
    def _serve_once(self) -> None:
        """Run one unit of work (a call, or a batch of steps); return at once if there is none."""
        with self._cond:
            if not self._pending and not self._calls:
                return
            call = self._calls.pop(0) if self._calls else None
            if call is None:
                deadline = time.monotonic() + self.window_s
                while not self._calls and len(self._pending) < self.max_batch:
                    now = time.monotonic()
                    # turns arriving in a burst (two sessions opened close together, the last just
                    # now): their first passes (prompts) are worth one batch; a lone turn never waits
                    before, last = self._opened
                    settling = now - last < SETTLE_S and last - before < SETTLE_S
                    if len(self._pending) >= max(self._active, 1) and not settling:
                        break
                    left = deadline - now
                    if left <= 0:
                        break
                    self._cond.wait(min(left, SETTLE_S) if settling else left)
                size = self.max_batch if self.window_s > 0 else 1
                batch, self._pending = self._pending[:size], self._pending[size:]
        if call is not None:
            try:
                call.result = call.fn()
            except BaseException as e:  # noqa: BLE001 - raised in the calling thread
                call.error = e
            call.done.set()
            return
        try:
            logits = run_batch(self.core, [(s.feed, s.kv, s.pixels, s.keep) for s in batch])
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


def _serve(ref: weakref.ReferenceType[StepBatcher], cond: threading.Condition) -> None:
    """The compute thread: one unit of work at a time while its batcher is alive. It waits for work
    without holding the batcher, so that an unused core can be collected and the thread end."""
    import torch

    batcher = ref()
    if batcher is None:
        return
    torch.set_num_threads(batcher.threads)
    del batcher
    while True:
        with cond:
            batcher = ref()
            if batcher is None:
                return
            idle = not batcher._pending and not batcher._calls
            del batcher
            if idle:
                cond.wait(IDLE_CHECK_S)
                continue
        batcher = ref()
        if batcher is None:
            return
        batcher._serve_once()
        del batcher


def run_batch(core: Any, steps: list[tuple[Any, ...]]) -> list[Any]:
    """One forward pass over several sequences' steps ``(feed, kv, pixels)`` or ``(feed, kv, pixels,
    keep)``; each ``kv`` (a ``DynamicCache``) is extended with its row's new keys and values. Returns
    each row's last logits (vocabulary,), or its last ``keep`` tokens' (keep, vocabulary) where
    ``keep`` > 1."""
    import torch

    keeps = [min(s[3] if len(s) > 3 else 1, len(s[0])) for s in steps]
    if len(steps) == 1:  # alone: exactly the unbatched call
        feed, kv, pixels = steps[0][:3]
        kwargs: dict[str, Any] = {"input_ids": torch.tensor([feed], device=core.device), "cache": kv,
                                  "use_cache": True, "logits_to_keep": keeps[0]}
        if pixels is not None:
            kwargs["pixel_values"] = pixels
        with torch.inference_mode():
            out = core.model(**kwargs)
        if out.cache is not kv:  # a cache the model made (none was passed in)
            _append(kv, out.cache, len(feed))
        return [out.logits[0, -1] if keeps[0] == 1 else out.logits[0, -keeps[0]:]]

    dev = core.device
    _use_rows_attention(core.model)
    feeds = [len(s[0]) for s in steps]
    pasts = [s[1].get_seq_length() for s in steps]
    ids = torch.tensor([[t for s in steps for t in s[0]]], device=dev)
    pos = torch.cat([torch.arange(p, p + f, device=dev) for p, f in zip(pasts, feeds, strict=True)])[None]
    ends = torch.tensor(feeds, device=dev).cumsum(0)
    # each row's last ``keep`` new tokens
    kept = torch.cat([torch.arange(e - k, e, device=dev) for e, k in zip(ends.tolist(), keeps, strict=True)])
    # a 4-D mask is taken as given (transformers builds none); the rows' attention does not read it
    mask = torch.zeros((1, 1, sum(feeds), 1), dtype=core.model.dtype, device=dev)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
              "cache": _row_caches_class()([s[1] for s in steps], feeds, core.model.config.get_text_config()),
              "use_cache": True, "logits_to_keep": kept}
    pixels = [s[2] for s in steps if s[2] is not None]
    if pixels:
        kwargs["pixel_values"] = torch.cat(pixels)
    with torch.inference_mode():
        out = core.model(**kwargs)
    rows, start = [], 0
    for k in keeps:
        rows.append(out.logits[0, start] if k == 1 else out.logits[0, start:start + k])
        start += k
    return rows


class _Rows:
    """Each row's keys (or values) of one layer, as the rows' caches hold them after this pass."""

    def __init__(self, tensors: list[Any], feeds: list[int]) -> None:
        self.tensors, self.feeds = tensors, feeds


@functools.cache
def _row_caches_class() -> type:
    """The class, built on first use (transformers is imported only then)."""
    from transformers import DynamicCache

    class RowCaches(DynamicCache):
        """The cache a batched pass hands the model: each layer's new keys and values are split by row
        and appended to the rows' own caches, and the attention gets every row's own keys and values."""

        def __init__(self, rows: list[Any], feeds: list[int], config: Any) -> None:
            super().__init__(config=config)
            self.rows, self.feeds = rows, feeds

        def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
            keys, values = [], []
            for kv, k_new, v_new in zip(self.rows, key_states.split(self.feeds, dim=2),
                                        value_states.split(self.feeds, dim=2), strict=True):
                k, v = kv.update(k_new, v_new, layer_idx)
                keys.append(k)
                values.append(v)
            return _Rows(keys, self.feeds), _Rows(values, self.feeds)

    return RowCaches


#: the attention implementations wrapped so far: original name -> the wrapper's registered name
_WRAPPED: dict[str, str] = {}


def _use_rows_attention(model: Any) -> None:
    """Let the language model's attention take a batched pass's rows (:class:`_Rows`) one row at a
    time, each with its own past only, exactly as the row's pass alone would attend (same function,
    same mask); anything else goes to the model's own attention implementation unchanged. Attending
    row by row rather than over the packed sequence with a block mask costs each row only its own
    keys: a batch of 16 prompts of ~35 tokens no longer computes 16 times the scores it keeps."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if getattr(model, "_switchboard_rows", False):
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        if not hasattr(module, "layer_idx") or not hasattr(module, "is_causal") or config is None:
            continue
        original = config._attn_implementation or "eager"
        if original in _WRAPPED.values():
            continue
        if original not in _WRAPPED:
            _WRAPPED[original] = name = f"switchboard-rows-{original}"
            AttentionInterface.register(name, _rows_attention(original))
            if original in ALL_MASK_ATTENTION_FUNCTIONS:
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
        config._attn_implementation = _WRAPPED[original]
    model._switchboard_rows = True


def _rows_attention(original: str) -> Any:
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attend(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        if original == "eager":
            from importlib import import_module

            inner = import_module(type(module).__module__).eager_attention_forward
        else:
            inner = ALL_ATTENTION_FUNCTIONS[original]
        if not isinstance(key, _Rows):
            return inner(module, query, key, value, attention_mask, **kwargs)
        outs = []
        for q, k, v, f in zip(query.split(key.feeds, dim=2), key.tensors, value.tensors, key.feeds, strict=True):
            past = k.shape[-2] - f
            # what the row's own pass gets: no mask for one token or a whole prompt (causal), else
            # causal over its new tokens after all of its past
            mask = None if f == 1 or past == 0 else \
                torch.ones((f, past + f), dtype=torch.bool, device=query.device).tril(past)[None, None]
            out, _ = inner(module, q, k, v, mask, **kwargs)
            outs.append(out)
        return torch.cat(outs, dim=1), None

    return attend


def _append(kv: Any, source: Any, count: int) -> None:
    """Append the last ``count`` positions of every layer of ``source`` to ``kv``."""
    for li, layer in enumerate(source.layers):
        k, v = layer.keys, layer.values
        kv.update(k[:, :, -count:], v[:, :, -count:], li)  # update copies (cat)
