"""API keys: user keys may generate, admin keys may also change vectors and monitors.

With no user keys configured, generation and reads are open; with no admin keys, admin
routes are open too (the server binds 127.0.0.1 by default). Keys are compared in constant
time and never echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.deps import State
from app.errors import APIError


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def _matches(key: str, candidates: list[str]) -> bool:
    # Compare against every candidate so timing does not reveal which one (or whether any) matched.
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def identity(key: str | None, request: Request) -> str:
    """A label for audit logs: a short hash of the key, never the key itself."""
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"anonymous@{request.client.host if request.client else 'unknown'}"


def require_user(request: Request, state: State) -> str:
    settings = state.settings
    if not settings.api_keys:  # no user keys configured: generation and reads are open
        return identity(None, request)
    key = _presented(request)
    if not key:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", type="authentication_error", code="missing_api_key")
    if not (_matches(key, settings.api_keys) or _matches(key, settings.admin_keys)):
        raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
    return identity(key, request)


def require_admin(request: Request, state: State) -> str:
    settings = state.settings
    if not settings.admin_keys:
        return identity(None, request)
    key = _presented(request)
    if not key:
        raise APIError(401, "missing admin key: send 'Authorization: Bearer <key>'", type="authentication_error", code="missing_api_key")
    if _matches(key, settings.admin_keys):
        return identity(key, request)
    if _matches(key, settings.api_keys):
        raise APIError(403, "this route needs an admin key", type="permission_error", code="admin_required")
    raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")


def is_admin(request: Request, state) -> bool:
    key = _presented(request)
    return not state.settings.admin_keys or bool(key and _matches(key, state.settings.admin_keys))


def reads_thresholds(request: Request, state) -> bool:
    """Whether the caller may see monitor thresholds: whoever may read ``/v1/monitors`` (an admin,
    or anyone where no admin keys are set) and holders of a metrics key."""
    key = _presented(request)
    return is_admin(request, state) or bool(key and _matches(key, state.settings.metrics_keys))


User = Annotated[str, Depends(require_user)]
Admin = Annotated[str, Depends(require_admin)]
