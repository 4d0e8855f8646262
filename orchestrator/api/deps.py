"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPBearer

from orchestrator.api.metrics import Metrics
from orchestrator.api.protocol import CONVERSATION_HEADER
from orchestrator.api.serving import ServingChat
from orchestrator.session import DEFAULT_OWNER
from switchboard.errors import SwitchboardError

# Keys are checked for every request by ApiKeyAuth (orchestrator.api.middleware), before the body is
# read; this scheme only documents the Bearer key in the OpenAPI schema.
bearer = HTTPBearer(auto_error=False, description="An API key from SWITCHBOARD_API_KEYS.")


class UnsupportedMediaType(SwitchboardError):
    code = "unsupported_media_type"
    status = 415


def get_serving(request: Request) -> ServingChat:
    return request.app.state.serving


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def owner_of_key(key: str) -> str:
    """The tenant an API key stands for: a digest of it (the key itself is never written to disk)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def get_owner(request: Request) -> str:
    """Whose request this is: each configured API key is its own tenant (its conversations and
    artifacts are invisible to the other keys); with no keys configured everyone is ``DEFAULT_OWNER``.
    The key itself was already checked by ``ApiKeyAuth``."""
    if not request.app.state.settings.api_keys:
        return DEFAULT_OWNER
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return owner_of_key(token.strip())


def require_json(request: Request) -> None:
    """Refuse bodies declared as something other than JSON (a missing Content-Type is read as JSON)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"the request body must be JSON (Content-Type: application/json), not {ctype!r}")


ServingDep = Annotated[ServingChat, Depends(get_serving)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
OwnerDep = Annotated[str, Depends(get_owner)]
JsonBody = Annotated[None, Depends(require_json)]
ConversationHeader = Annotated[str | None, Header(alias=CONVERSATION_HEADER, description=(
    "Continue this conversation (same as the conversation_id field)."))]
