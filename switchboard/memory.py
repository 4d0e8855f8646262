"""A memory budget for the expert models loaded in one process (``SWITCHBOARD_EXPERT_MEMORY_BUDGET_MB``).

Every expert that finishes ``setup()`` is recorded here with its footprint, in least-recently-used
order (``Expert.ensure_setup`` runs before every call, and marks the expert used). When loading one
would take the total over the budget, the least recently used others are unloaded first:
``teardown()`` on the CPU (the next call runs ``setup()`` again), or, for an expert whose models sit on
a GPU, their modules are moved to the CPU and moved back on its next call (cheaper than a reload;
the budget then counts GPU bytes only). An expert in the middle of a call (``pinned``) is never
unloaded: if only pinned experts are left, the budget is exceeded for a while, with a warning.

The footprint is the bytes of the parameters and buffers of the torch modules the expert holds
(found by walking its attributes; shared storage counted once), measured right after ``setup()``.
An expert that holds no torch module (an onnxruntime plugin, say) is charged the growth of the
process's RSS during its ``setup()`` instead. The first load of an expert can only be measured after
it happened, so it may exceed the budget by its own size until the others are unloaded; a reload
knows its size from before and makes room first.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)
MB = 1024 * 1024
#: the history a budget keeps (evictions, setup times per expert): a server that reloads experts on
#: every call under a tight budget must not grow a list per call
HISTORY = 256


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_libc: Any = None


def trim_heap() -> bool:
    """Give the allocator's free memory back to the system (glibc ``malloc_trim``; elsewhere a no-op).

    A served turn allocates and frees hundreds of MB (activations, decoded images) across many
    threads; glibc keeps what was freed in per-thread arenas, so a server's RSS creeps up with the
    number of turns run at once although nothing is retained. Calling this after a turn returns those
    pages (a few ms). Returns whether anything was released.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
        return bool(_libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        _libc = False
        return False


def peak_rss_bytes() -> int:
    """The highest RSS this process has had (VmHWM)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def torch_modules(obj: Any, depth: int = 4) -> list[Any]:
    """The torch modules an object holds, looking through attributes, lists and dicts ``depth`` deep."""
    torch = sys.modules.get("torch")
    if torch is None:  # nothing can hold a module if torch was never imported
        return []
    found: list[Any] = []
    seen: set[int] = set()

    def walk(o: Any, d: int) -> None:
        if id(o) in seen or d < 0 or o is None or isinstance(o, str | bytes | int | float | bool):
            return
        seen.add(id(o))
        if isinstance(o, torch.nn.Module):
            found.append(o)  # parameters() covers its submodules
            return
        if isinstance(o, dict):
            children = list(o.values())
        elif isinstance(o, list | tuple | set | frozenset):
            children = list(o)
        elif hasattr(o, "__dict__") and not isinstance(o, type) and not callable(o):
            children = list(vars(o).values())
        else:
            return
        for c in children:
            walk(c, d - 1)

    walk(obj if not hasattr(obj, "__dict__") else vars(obj), depth)
    return found


def _tensors(modules: list[Any]) -> Iterator[Any]:
    for m in modules:
        yield from m.parameters()
        yield from m.buffers()


def module_bytes(modules: list[Any], *, device_type: str | None = None) -> int:
    """Bytes of the modules' parameters and buffers (each storage once), optionally on one device type."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in _tensors(modules):
        if device_type is not None and t.device.type != device_type:
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def model_device(modules: list[Any]) -> str:
    """'cuda' when any of the modules' tensors is on a CUDA device, else 'cpu'."""
    return "cuda" if any(t.device.type == "cuda" for t in _tensors(modules)) else "cpu"


@dataclass
class LoadedExpert:
    """One expert the budget tracks."""

    name: str
    expert: Any
    bytes: int
    how: str  # "modules" (parameter/buffer bytes) or "rss" (RSS growth during setup)
    device: str = "cpu"
    offloaded: bool = False
    # modules moved to the CPU by an offload, with the device each came from
    moved: list[tuple[Any, Any]] = field(default_factory=list)


class MemoryBudget:
    """Tracks the experts loaded in this process; unloads the least recently used over ``limit_bytes``."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit_bytes = int(limit_bytes) if limit_bytes else None
        self._loaded: OrderedDict[int, LoadedExpert] = OrderedDict()  # least recently used first
        self._pins: dict[int, int] = {}
        self._known: dict[str, int] = {}  # footprints measured at earlier loads, by expert name
        self._lock = threading.RLock()
        #: what was unloaded, in order: (name, bytes, "teardown" | "offload"); the latest ``HISTORY``
        self.evictions: list[tuple[str, int, str]] = []
        self.loads: dict[str, int] = {}  # setups per expert name
        self.load_seconds: dict[str, list[float]] = {}  # how long the latest setup()s took, by expert name
        #: the most model bytes resident at once, including a first load's moment over the budget
        self.peak_bytes = 0
        #: the most model bytes resident once each load had made its room (what the budget bounds)
        self.peak_settled_bytes = 0

    # -- what is loaded -----------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._loaded.values() if not e.offloaded)

    def loaded(self) -> list[str]:
        """Names of the experts resident now, least recently used first."""
        with self._lock:
            return [e.name for e in self._loaded.values() if not e.offloaded]

    def footprint(self, name: str) -> int | None:
        return self._known.get(name)

    # -- hooks (switchboard.expert.Expert) --------------------------------------------------------------
    @contextmanager
    def loading(self, expert: Any) -> Iterator[None]:
        """Wrap an expert's ``setup()``: make room for its known size first, then record what it took."""
        name = expert.name
        with self._lock:
            known = self._known.get(name)
            if known:
                self._make_room(known, keep=expert)
        rss0, t0 = rss_bytes(), time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        rss_delta = max(0, rss_bytes() - rss0)
        modules = torch_modules(expert)
        device = model_device(modules) if modules else "cpu"
        if modules:
            size, how = module_bytes(modules, device_type="cuda" if device == "cuda" else None), "modules"
        else:
            # A reload reuses what the first load left mapped (libraries, the allocator's pools), so
            # its RSS growth understates the expert: keep the largest growth measured.
            size, how = max(rss_delta, self._known.get(name, 0)), "rss"
        with self._lock:
            self._known[name] = size
            self.loads[name] = self.loads.get(name, 0) + 1
            times = self.load_seconds.setdefault(name, [])
            times.append(seconds)
            del times[:-HISTORY]
            self._loaded[id(expert)] = LoadedExpert(name, expert, size, how, device)
            self._loaded.move_to_end(id(expert))
            self.peak_bytes = max(self.peak_bytes, self.used_bytes)
            self._make_room(0, keep=expert)
            self.peak_settled_bytes = max(self.peak_settled_bytes, self.used_bytes)
        log.info("loaded expert %s: %.1f MiB (%s); experts resident: %.1f MiB%s", name, size / MB, how,
                 self.used_bytes / MB, f" of {self.limit_bytes / MB:.1f}" if self.limit_bytes else "")

    def touch(self, expert: Any) -> None:
        """Mark an expert used now (and bring back its models if they were offloaded)."""
        with self._lock:
            entry = self._loaded.get(id(expert))
            if entry is None:
                return
            self._loaded.move_to_end(id(expert))
            if entry.offloaded:
                self._make_room(entry.bytes, keep=expert)
                for module, device in entry.moved:
                    module.to(device)
                entry.moved.clear()
                entry.offloaded = False
                self.peak_bytes = max(self.peak_bytes, self.used_bytes)
                self.peak_settled_bytes = max(self.peak_settled_bytes, self.used_bytes)

    def forget(self, expert: Any) -> None:
        """The expert was torn down (by the budget or by anyone else)."""
        with self._lock:
            self._loaded.pop(id(expert), None)

    @contextmanager
    def pinned(self, expert: Any) -> Iterator[None]:
        """While inside, ``expert`` is not unloaded (a call is running on it)."""
        key = id(expert)
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._pins[key] - 1
                if left:
                    self._pins[key] = left
                else:
                    del self._pins[key]

    # -- eviction -----------------------------------------------------------------------------------
    def _make_room(self, need: int, *, keep: Any) -> None:
        if self.limit_bytes is None:
            return
        while self.used_bytes + need > self.limit_bytes:
            # (an expert that holds nothing measurable frees nothing: it stays)
            victim = next((e for k, e in self._loaded.items() if e.bytes > 0 and not e.offloaded
                           and e.expert is not keep and not self._pins.get(k)), None)
            if victim is None:
                log.warning("expert memory budget %.1f MiB exceeded (%.1f MiB resident, %.1f MiB more wanted): "
                            "every other loaded expert is in use", self.limit_bytes / MB, self.used_bytes / MB,
                            need / MB)
                return
            self._unload(victim)

    def _unload(self, entry: LoadedExpert) -> None:
        if entry.device == "cuda":
            # Keep the weights in host memory: moving them back is much cheaper than a reload.
            entry.moved = [(m, next(m.parameters()).device) for m in torch_modules(entry.expert)
                           if any(True for _ in m.parameters())]
            for m, _ in entry.moved:
                m.to("cpu")
            entry.offloaded = True
            self.evictions.append((entry.name, entry.bytes, "offload"))
            del self.evictions[:-HISTORY]
            log.info("offloaded expert %s to the CPU (%.1f MiB)", entry.name, entry.bytes / MB)
            return
        self._loaded.pop(id(entry.expert), None)
        self.evictions.append((entry.name, entry.bytes, "teardown"))
        del self.evictions[:-HISTORY]
        log.info("unloaded expert %s (%.1f MiB) to stay within the budget", entry.name, entry.bytes / MB)
        entry.expert.teardown()


_budget: MemoryBudget | None = None
_budget_lock = threading.Lock()


def get_budget() -> MemoryBudget:
    """The process-wide budget, from ``Settings.expert_memory_budget_mb`` (unset: tracked, never evicts)."""
    global _budget
    if _budget is None:
        with _budget_lock:
            if _budget is None:
                from switchboard.settings import get_settings

                mb = getattr(get_settings(), "expert_memory_budget_mb", None)
                _budget = MemoryBudget(int(mb * MB) if mb else None)
    return _budget


def set_budget(budget: MemoryBudget | None) -> None:
    """Replace the process-wide budget (tests, benchmarks); ``None`` rebuilds it from the settings."""
    global _budget
    with _budget_lock:
        _budget = budget
