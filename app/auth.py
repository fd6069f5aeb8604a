"""API keys: who may read, write and administer the registry.

With ENABLE_AUTH=true every request (except the open paths, /health and
/metrics by default) carries ``X-API-Key: <key>`` or ``Authorization: Bearer
<key>``. Keys are never stored in clear: API_KEYS_FILE holds one
``<sha256 of key> <scope> <name>`` per line; API_KEYS (development only) takes
``key:scope:name`` entries. Scopes nest: ``read`` (GET, HEAD) < ``write``
(register, update, upload, versions) < ``admin`` (delete, batch).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from . import errors
from .appkeys import ROUTE_SCOPES
from .config import ConfigError
from .errors import ApiError

SCOPES = ("read", "write", "admin")
_LEVEL = {s: i for i, s in enumerate(SCOPES)}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="model-service", charset="UTF-8"'}

IDENTITY = web.RequestKey("identity", object)
# The keys of an application with ENABLE_AUTH=true; absent when auth is off.
KEYS = web.AppKey("api_keys", tuple)


@dataclass(frozen=True)
class ApiKey:
    digest: bytes  # sha256 of the key
    scope: str
    name: str


def _key_bytes(key: str) -> bytes:
    # Header values (and environment variables) that are not UTF-8 arrive
    # with their bytes as lone surrogates: hash the bytes that were sent.
    return key.encode("utf-8", "surrogateescape")


def hash_key(key: str) -> str:
    return hashlib.sha256(_key_bytes(key)).hexdigest()


def new_key() -> str:
    return "tfms_" + secrets.token_urlsafe(32)


def valid_key_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None


def _entry(digest_hex: str, scope: str, name: str, where: str) -> ApiKey:
    if not _HEX_RE.fullmatch(digest_hex):
        raise ConfigError(f"{where}: the first field must be the key's sha256 (64 lowercase hex digits)")
    if scope not in _LEVEL:
        raise ConfigError(f"{where}: scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not valid_key_name(name):
        raise ConfigError(f"{where}: name must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '@', '-'")
    return ApiKey(bytes.fromhex(digest_hex), scope, name)


def load_keys(keys_file: str | None, inline: str | None) -> tuple[ApiKey, ...]:
    keys: list[ApiKey] = []
    if keys_file:
        try:
            lines = Path(keys_file).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"API_KEYS_FILE: cannot read {keys_file}: {e.strerror}") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 3:
                raise ConfigError(f"API_KEYS_FILE {keys_file}:{number}: expected 'key_sha256 scope name'")
            keys.append(_entry(*fields, where=f"API_KEYS_FILE {keys_file}:{number}"))
    for i, item in enumerate(filter(None, (inline or "").split(",")), 1):
        parts = item.strip().split(":")
        if len(parts) != 3 or not parts[0]:
            raise ConfigError(f"API_KEYS entry {i}: expected key:scope:name")
        keys.append(_entry(hash_key(parts[0]), parts[1], parts[2], where=f"API_KEYS entry {i}"))
    return tuple(keys)


# The scope a method needs where no API route says otherwise; "write" for the rest.
_METHOD_SCOPE = {"GET": "read", "HEAD": "read", "OPTIONS": "read", "DELETE": "admin"}


def required_scope(request: web.Request) -> str:
    """The scope of the request's route in routes.API (``app[ROUTE_SCOPES]``).

    A request no API route takes (a 404 or 405 follows) needs what its method
    needs. And a request that changes something at a fixed path needs at least
    that path's own scope, whichever route takes it: PUT .../batch (405, by way
    of {id}) and POST .../batch/ (404) need admin, as POST .../batch does, so
    the key check answers for them as it does for the batch.
    """
    scopes = request.app[ROUTE_SCOPES]
    resource = request.match_info.route.resource
    scope = scopes.get((request.method, resource.canonical)) if resource is not None else None
    if scope is None:
        scope = _METHOD_SCOPE.get(request.method, "write")
    if _METHOD_SCOPE.get(request.method) == "read":
        return scope
    path = request.path.rstrip("/")
    fixed = [s for (_, template), s in scopes.items() if template == path and "{" not in template]
    return max([scope, *fixed], key=_LEVEL.get)


def presented_key(request: web.Request) -> str | None:
    key = request.headers.get("X-API-Key")
    if key:
        return key
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def identify(keys: tuple[ApiKey, ...], key: str) -> ApiKey | None:
    digest = hashlib.sha256(_key_bytes(key)).digest()
    found = None
    # Every entry is compared, in constant time, whatever matches: the time
    # taken says nothing about which key, or how much of one, was right.
    for entry in keys:
        if hmac.compare_digest(entry.digest, digest):
            found = entry
    return found


def identity(request: web.Request) -> ApiKey | None:
    """The known key behind the request, if any (worked out once per request).

    A key in the request's headers; on the UI's pages, the key its session
    cookie was signed in with (a browser signs in once, then sends no key).
    """
    if IDENTITY not in request:
        from .ui import session as ui  # imported here: the UI's session module imports this one

        keys = request.app.get(KEYS)
        who = None
        if keys and ui.owns(request.path):
            who = ui.session_identity(request)
        elif keys and (key := presented_key(request)) is not None:
            who = identify(keys, key)
        request[IDENTITY] = who
    return request[IDENTITY]


def middleware(open_paths: tuple[str, ...]):
    """401 without a known key, 403 when its scope is too small; needs ``app[KEYS]``."""
    from .ui import session as ui

    @web.middleware
    async def auth_middleware(request: web.Request, handler):
        if request.path in open_paths or (request.method == "OPTIONS" and "Origin" in request.headers):
            return await handler(request)
        if ui.owns(request.path):
            # The UI's pages check the scope themselves and show sign-in without one.
            return await handler(request)
        if presented_key(request) is None:
            raise ApiError(errors.UNAUTHORIZED, "an API key is required (X-API-Key or Authorization: Bearer)",
                           _CHALLENGE)
        who = identity(request)
        if who is None:
            raise ApiError(errors.UNAUTHORIZED, "unknown API key", _CHALLENGE)
        needed = required_scope(request)
        if _LEVEL[who.scope] < _LEVEL[needed]:
            raise ApiError(errors.FORBIDDEN, f"this key has scope {who.scope!r}; {needed!r} is needed")
        return await handler(request)

    return auth_middleware


def allows(identity: ApiKey, scope: str) -> bool:
    return _LEVEL[identity.scope] >= _LEVEL[scope]


def caller_name(request: web.Request) -> str | None:
    who = identity(request)
    return who.name if who is not None else None


def is_admin(request: web.Request) -> bool:
    who = identity(request)
    return who is not None and who.scope == "admin"
