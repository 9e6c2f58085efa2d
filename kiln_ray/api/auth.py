"""Optional API keys.

    KILN_API_KEY    every /v1 route (and /metrics when `metrics_require_key`)
    KILN_ADMIN_KEY  training and adapter-changing routes; falls back to the API key.
                    The admin key also opens every route the API key opens.

Keys arrive as `Authorization: Bearer <key>` (what the openai SDK sends) or `x-api-key`.
No key configured: the routes are open (the server binds to loopback by default). /health
and the /ui page are always open; the page's API calls carry the key the user types in.

A missing or wrong key is a 401, a valid API key on an admin route a 403, both with an
OpenAI-style body. Keys are compared in constant time (hmac.compare_digest, over every
configured key, never short-circuited on which one matched) and never logged: they live in
pydantic SecretStr fields, whose repr is masked.
"""

from __future__ import annotations

import enum
import hmac

from pydantic import SecretStr

from kiln_ray.api.errors import APIError


class Access(enum.IntEnum):
    OPEN = 0
    USER = 1
    ADMIN = 2


# Adapter routes that only read. Everything else under /v1/adapters changes the served set.
_ADAPTER_READS = {("GET", "/v1/adapters")}


def route_path(scope: dict) -> str:
    """The path the app routes by: without the root path it is mounted under (Ray Serve's
    route_prefix arrives as root_path, and the path still carries it), as Starlette strips it."""
    path, root = scope["path"], scope.get("root_path", "").rstrip("/")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def required_access(method: str, path: str, metrics_require_key: bool = False) -> Access:
    """Which key a request needs, from its method and path alone (before routing, so an
    unknown path under /v1 still needs a key and cannot be used to probe the route table)."""
    path = path.rstrip("/") or "/"
    if path == "/metrics":
        return Access.USER if metrics_require_key else Access.OPEN
    if not (path == "/v1" or path.startswith("/v1/")):
        return Access.OPEN  # /health, /ui, /docs, /openapi.json
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
