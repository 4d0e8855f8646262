"""Experts: the tools the core can call. See experts.base for the contract."""

from experts.base import (
    BoxesRef,
    Example,
    Expert,
    ExpertResult,
    ImageRef,
    MaskRef,
    OutputArtifact,
    RunContext,
)
from experts.registry import Registry, get_registry

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
    "get_registry",
]
