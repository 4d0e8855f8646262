"""The composition root: what the settings ask for, assembled in one place.

``make_dispatcher`` is where in-process vs Celery is chosen (``SWITCHBOARD_BROKER_URL`` set or not);
``build_assistant`` puts the core (embedded, or remote when ``SWITCHBOARD_CORE`` is set), the registry,
the artifact store, the dispatcher and the conversation store together. The CLI and the API build their runtime through here.
"""

from __future__ import annotations

from typing import Any

from orchestrator.core.loop import Assistant
from orchestrator.dispatch import Dispatcher, LocalDispatcher
from orchestrator.session import ConversationStore
from switchboard.artifacts import ArtifactStore


def make_dispatcher(registry: Any = None, store: ArtifactStore | None = None, settings: Any = None) -> Dispatcher:
    """The dispatcher the settings ask for: Celery when a broker URL is set, else in-process."""
    from switchboard.registry import get_registry
    from switchboard.settings import get_settings

    s = settings or get_settings()
    registry = registry or get_registry()
    store = store or ArtifactStore.from_settings(s)
    if s.broker_url:
        from workers.dispatch import QueuedDispatcher

        return QueuedDispatcher(registry, store, settings=s)
    return LocalDispatcher(registry, store, max_workers=s.max_parallel_calls, default_timeout=s.call_timeout_s)


def build_assistant(settings: Any = None, *, core: Any = None, registry: Any = None) -> Assistant:
    """The assistant the settings describe: the shipped core (or ``SWITCHBOARD_CORE_MODEL``, or a remote
    core at ``SWITCHBOARD_CORE=openai:<base_url>#<model>``), every registered expert, the artifact store,
    and the in-process or Celery dispatcher."""
    from switchboard.registry import get_registry
    from switchboard.settings import get_settings

    s = settings or get_settings()
    registry = registry or get_registry()
    store = ArtifactStore.from_settings(s)
    if core is None and s.core:  # a remote core: any OpenAI-compatible chat endpoint
        from orchestrator.core.remote import RemoteCore

        core = RemoteCore.from_settings(s, registry)
    if core is None:
        from orchestrator.core.model import CoreModel, default_path

        core = CoreModel.load(default_path(s), cache_dir=s.cache_dir)
    router = None
    if s.use_router:
        from orchestrator.core.router import Router

        router = Router.load(s.router_model)
    cannot_see = None
    if getattr(core, "remote", False):  # a remote model sees what it is sent, or nothing
        if not core.send_images:
            def cannot_see(image: Any) -> bool:
                return True
    elif not sees_pixels(core):  # e.g. the shipped core: its projector's output layer is still zero
        def cannot_see(image: Any) -> bool:
            return True
    elif s.core_model is None:  # the embedded core's vision knows only the shapes world
        from experts.domain import check_image

        def cannot_see(image: Any) -> bool:
            return check_image(image).out_of_domain

    return Assistant(core, registry, store, make_dispatcher(registry, store, s), ConversationStore.from_settings(s),
                     router=router, cannot_see=cannot_see, jump_forward=s.core_jump_forward,
                     max_prompt_tokens=s.core_max_prompt_tokens,
                     max_calls=s.max_calls_per_reply, reuse_prefix=s.core_prefix_cache)


def sees_pixels(core: Any) -> bool:
    """Whether a LLaVA-style core's image tokens depend on the pixels: False when its projector's last
    layer is all zero (the shipped core trains it last; until then every image looks the same to it)."""
    model = getattr(core, "model", None)
    modules = getattr(model, "named_modules", None)
    if modules is None:
        return True
    for name, module in modules():
        if name.endswith("multi_modal_projector"):
            last = [m for m in module.modules() if hasattr(m, "weight") and getattr(m, "weight", None) is not None]
            if last:
                w, b = last[-1].weight, getattr(last[-1], "bias", None)
                return bool(w.abs().sum() > 0 or (b is not None and b.abs().sum() > 0))
    return True

