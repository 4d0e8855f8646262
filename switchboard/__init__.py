"""Switchboard's ground floor, and the one import a plugin author needs.

Everything else stands on this package: the expert contract (``Expert``, its ``Args``/``Result``
models, artifact references, ``RunContext``), the registry that finds experts by entry point, the
content-addressed artifact store, the user-facing errors and the settings. It imports nothing from
the rest of the project.

A plugin::

    import switchboard
    from pydantic import BaseModel

    class CaptionArgs(BaseModel):
        image: switchboard.ImageRef

    class CaptionExpert(switchboard.Expert):
        name = "caption"
        description = "Write a one-sentence caption of an image."
        Args = CaptionArgs
        Result = switchboard.ExpertResult
        examples = [switchboard.Example(request="caption this", args={"image": "{image}"})]

        def run(self, args, ctx): ...

registered under the entry-point group ``switchboard.experts``; its tests inherit
``switchboard.testing.ExpertContract``.
"""

from switchboard.errors import SwitchboardError
from switchboard.expert import (
    BoxesRef,
    Example,
    Expert,
    ExpertResult,
    ImageRef,
    MaskRef,
    OutputArtifact,
    RunContext,
    compose,
    exactly_one,
    only_with,
)
from switchboard.registry import Registry, get_registry

__version__ = "0.1.0"

__all__ = [
    "BoxesRef",
    "Example",
    "Expert",
    "ExpertResult",
    "ImageRef",
    "MaskRef",
    "OutputArtifact",
    "Registry",
    "RunContext",
    "SwitchboardError",
    "compose",
    "exactly_one",
    "get_registry",
    "only_with",
]
