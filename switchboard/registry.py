"""The expert registry, fed by the entry-point group ``switchboard.experts``.

Built-in experts register through the same group as third-party plugins (see pyproject.toml), so
there is one way in. Two packages claiming one name is an error that names both.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from switchboard.errors import DuplicateExpert, UnknownExpert
from switchboard.expert import Expert

GROUP = "switchboard.experts"


@dataclass(frozen=True)
class Registration:
    cls: type[Expert]
    package: str


class Registry:
    """Expert classes by name, plus one lazily set-up instance of each per process."""

    def __init__(self) -> None:
        self._items: dict[str, Registration] = {}
        self._instances: dict[str, Expert] = {}
        self._lock = threading.Lock()

    # -- registration ---------------------------------------------------------------------------
    def register(self, cls: type[Expert], package: str = "<runtime>") -> None:
        if not (isinstance(cls, type) and issubclass(cls, Expert)):
            raise TypeError(f"{cls!r} from {package} is not an Expert subclass")
        with self._lock:
            existing = self._items.get(cls.name)
            if existing is not None and existing.cls is not cls:
                raise DuplicateExpert(
                    f"expert name {cls.name!r} is registered twice: by {existing.package} "
                    f"({existing.cls.__module__}.{existing.cls.__qualname__}) and by {package} "
                    f"({cls.__module__}.{cls.__qualname__}); uninstall one of them"
                )
            self._items[cls.name] = Registration(cls, package)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)
            self._instances.pop(name, None)

    def load_entry_points(self) -> None:
        for ep in entry_points(group=GROUP):
            self.register(_load(ep), _package_of(ep))

    # -- lookup ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get_class(self, name: str) -> type[Expert]:
        try:
            return self._items[name].cls
        except KeyError:
            raise UnknownExpert(
                f"unknown expert {name!r}; registered experts: {', '.join(self.names()) or '(none)'}"
            ) from None

    def package_of(self, name: str) -> str:
        self.get_class(name)
        return self._items[name].package

    def instance(self, name: str) -> Expert:
        """The process-wide instance of an expert (constructed cheaply; set up on first call)."""
        cls = self.get_class(name)
        with self._lock:
            inst = self._instances.get(name)
            if inst is None or type(inst) is not cls:
                inst = cls()
                self._instances[name] = inst
            return inst

    def loaded_instances(self) -> dict[str, Expert]:
        return dict(self._instances)

    def describe(self) -> list[dict[str, Any]]:
        """What `switchboard experts --json` prints: name, description, argument schema, package."""
        out = []
        for name in self.names():
            reg = self._items[name]
            out.append({
                "name": name,
                "description": reg.cls.description,
                "package": reg.package,
                "queue": reg.cls.queue_name(),
                "args_schema": reg.cls.args_schema(),
                "examples": [e.model_dump() for e in reg.cls.examples],
            })
        return out


def _load(ep: EntryPoint) -> type[Expert]:
    try:
        obj = ep.load()
    except Exception as e:
        raise ImportError(f"expert plugin {ep.name!r} ({ep.value}) from {_package_of(ep)} failed to load: {e}") from e
    return obj


def _package_of(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.module.split(".")[0]


_registry: Registry | None = None
_registry_lock = threading.Lock()


def parse_extra_experts(spec: str) -> list[str]:
    """Split ``"pkg.mod:Class, other.mod:Other"`` into its entries (empty entries dropped)."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def load_extra_experts(registry: Registry, spec: str) -> list[str]:
    """Register the expert classes named in ``spec`` (``module:Class``, comma-separated).

    This is ``SWITCHBOARD_EXTRA_EXPERTS``: a way to add experts to the orchestrator and workers without
    packaging them with an entry point — for development and tests. Installed plugins use the
    ``switchboard.experts`` entry-point group instead. Returns the names registered.
    """
    names = []
    for entry in parse_extra_experts(spec):
        module, sep, attr = entry.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"SWITCHBOARD_EXTRA_EXPERTS entry {entry!r} must look like package.module:Class")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"SWITCHBOARD_EXTRA_EXPERTS entry {entry!r} cannot be loaded: {e}") from e
        registry.register(obj, f"SWITCHBOARD_EXTRA_EXPERTS ({module})")
        names.append(obj.name)
    return names


def get_registry() -> Registry:
    """The process-wide registry: entry points, plus ``SWITCHBOARD_EXTRA_EXPERTS`` (loaded on first use)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            from switchboard.settings import get_settings

            reg = Registry()
            reg.load_entry_points()
            extra = get_settings().extra_experts
            if extra:
                load_extra_experts(reg, extra)
            _registry = reg
        return _registry


def reset_registry() -> None:
    """Forget the process-wide registry (tests; after installing a plugin at run time)."""
    global _registry
    with _registry_lock:
        _registry = None
