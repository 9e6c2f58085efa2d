"""Optional API keys.

    KILN_API_KEY    every route not listed open below (and /metrics when `metrics_require_key`)
    KILN_ADMIN_KEY  training and adapter-changing routes; falls back to the API key.
                    The admin key also opens every route the API key opens.

Keys arrive as `Authorization: Bearer <key>` (what the openai SDK sends) or `x-api-key`.
No key configured: the routes are open (the server binds to loopback by default). /health
and the /ui page (and the API docs) are always open; the page's API calls carry the key the
user types in.

A missing or wrong key is a 401, a valid API key on an admin route a 403, both with an
OpenAI-style body. Keys are compared in constant time (hmac.compare_digest, over every
configured key, never short-circuited on which one matched) and never logged: they live in
pydantic SecretStr fields, whose repr is masked.
"""

from __future__ import annotations

import enum
import hmac

from pydantic import SecretStr
from starlette._utils import get_route_path  # what Starlette's router matches (FastAPI uses it too)

from kiln_ray.api.errors import APIError


class Access(enum.IntEnum):
    OPEN = 0
    USER = 1
    ADMIN = 2


# Adapter routes that only read. Everything else under /v1/adapters changes the served set.
_ADAPTER_READS = {("GET", "/v1/adapters")}
_OPEN = {"/health", "/ui", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def route_path(scope: dict) -> str:
    """The path the app routes by: Starlette's own reading of it (Ray Serve's route_prefix
    arrives as root_path, and the path still carries it), so what is checked is what is routed."""
    return get_route_path(scope) or "/"


def required_access(method: str, path: str, metrics_require_key: bool = False) -> Access:
    """Which key a request needs, from its method and the path it routes by alone (before
    routing, so an unknown path still needs a key and cannot be used to probe the route
    table). Closed unless listed open: /health, the /ui page, the API docs, /metrics."""
    path = path.rstrip("/") or "/"
    if path == "/metrics":
        return Access.USER if metrics_require_key else Access.OPEN
    if path in _OPEN or path.startswith("/ui/"):
        return Access.OPEN
    if path.startswith("/v1/train"):
        return Access.ADMIN  # jobs carry training data: reading their status is admin too
    if path == "/v1/adapters" or path.startswith("/v1/adapters/"):
        if (method.upper(), path) in _ADAPTER_READS:
            return Access.USER
        return Access.ADMIN  # load/unload/delete/rollback/upload/merge, and download of weights
    return Access.USER


class KeyCheck:
    def __init__(self, api_key: SecretStr | str | None, admin_key: SecretStr | str | None):
        self._user = _bytes(api_key)
        self._admin = _bytes(admin_key) or self._user

    @property
    def enabled(self) -> bool:
        return bool(self._user or self._admin)

    def check(self, access: Access, presented: str | None) -> None:
        """Raise the APIError (401/403) this request deserves, or return if it may pass."""
        if access is Access.OPEN:
            return
        needs_user = access is Access.USER and self._user is not None
        needs_admin = access is Access.ADMIN and self._admin is not None
        if not (needs_user or needs_admin):
            return
        key = (presented or "").encode()
        is_admin = _equal(key, self._admin)
        is_user = _equal(key, self._user)
        if is_admin or (access is Access.USER and is_user):
            return
        if is_user:
            raise APIError(403, "this route needs the admin key (KILN_ADMIN_KEY)", code="insufficient_permissions")
        if not presented:
            raise APIError(401, "no API key provided: send 'Authorization: Bearer <key>'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        raise APIError(401, "incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def presented_key(headers) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None


def _bytes(key: SecretStr | str | None) -> bytes | None:
    if key is None:
        return None
    value = key.get_secret_value() if isinstance(key, SecretStr) else key
    return value.encode() if value else None


def _equal(presented: bytes, key: bytes | None) -> bool:
    # Compare against a same-length dummy when the key is unset, so timing never tells which
    # keys are configured.
    return hmac.compare_digest(presented, key if key is not None else b"\0" * 32) and key is not None
