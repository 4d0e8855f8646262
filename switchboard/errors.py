"""Errors that reach users. Each carries a stable ``code`` and a message that says what is wrong."""

from __future__ import annotations


class SwitchboardError(Exception):
    """Base class of every error Switchboard reports to a user."""

    code = "error"
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidArtifactId(SwitchboardError):
    code = "invalid_artifact_id"


class ArtifactNotFound(SwitchboardError):
    code = "artifact_not_found"
    status = 404


class ImageRejected(SwitchboardError):
    """An image that is corrupt, of an unsupported type, or over the size/pixel limits."""

    code = "image_rejected"


class ImageTooLarge(ImageRejected):
    code = "image_too_large"
    status = 413


class UnknownExpert(SwitchboardError):
    code = "unknown_expert"
    status = 404


class ExpertDefinitionError(TypeError):
    """Raised when an Expert subclass is declared wrongly (at class-definition time)."""


class DuplicateExpert(RuntimeError):
    """Two packages register an expert under the same name."""
