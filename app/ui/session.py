"""The web UI's sessions: a signed cookie instead of a key on every request.

The cookie holds no key. It names the key that signed in by a fingerprint
(an HMAC of the key's sha256 under UI_SESSION_SECRET), a CSRF token that each
form echoes, and a session id. itsdangerous signs it and stamps the time, so
any worker that shares the secret can check it and an old one expires. The
scope comes from the keys table on every request, never from the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from aiohttp import web
from itsdangerous import BadSignature, URLSafeTimedSerializer

from ..auth import ApiKey

PREFIX = "/ui"
COOKIE = "tfms_session"
MAX_AGE = 12 * 3600


def owns(path: str) -> bool:
    """The paths the UI answers, which authenticate by session, not by key."""
    return path in ("/", PREFIX) or path.startswith(PREFIX + "/")


@dataclass(frozen=True)
class Session:
    sid: str
    csrf: str
    key_id: str | None = None  # fingerprint of the signed-in key

    @classmethod
    def new(cls, key_id: str | None = None) -> "Session":
        return cls(secrets.token_urlsafe(16), secrets.token_urlsafe(32), key_id)

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, secret: str, keys: tuple[ApiKey, ...]) -> None:
        self._secret = secret.encode()
        self._signer = URLSafeTimedSerializer(secret, salt="tfms-ui-session")
        self._keys = {self.key_id(k): k for k in keys}
        # Signed out before they expired. Per process: with WORKERS > 1 another
        # worker still takes such a cookie until MAX_AGE (README, Security).
        self._ended: dict[str, float] = {}

    def key_id(self, key: ApiKey) -> str:
        return hmac.new(self._secret, key.digest, hashlib.sha256).hexdigest()[:32]

    def load(self, request: web.Request) -> Session | None:
        raw = request.cookies.get(COOKIE)
        if not raw or len(raw) > 1024:
            return None
        try:
            data = self._signer.loads(raw, max_age=MAX_AGE)
            session = Session(str(data["s"]), str(data["c"]), data.get("k"))
        except (BadSignature, AttributeError, KeyError, TypeError, ValueError):
            return None
        if session.sid in self._ended:
            return None
        return session

    def identity(self, session: Session | None) -> ApiKey | None:
        if session is None or session.key_id is None:
            return None
        return self._keys.get(session.key_id)

    def save(self, request: web.Request, response: web.StreamResponse, session: Session) -> None:
        data = {"s": session.sid, "c": session.csrf}
        if session.key_id:
            data["k"] = session.key_id
        # Secure over HTTPS, including TLS ended at the ingress in front of us.
        secure = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        response.set_cookie(COOKIE, self._signer.dumps(data), max_age=MAX_AGE, path=PREFIX,
                            httponly=True, samesite="Strict", secure=secure)

    def end(self, response: web.StreamResponse, session: Session) -> None:
        now = time.monotonic()
        self._ended = {sid: until for sid, until in self._ended.items() if until > now}
        self._ended[session.sid] = now + MAX_AGE
        response.del_cookie(COOKIE, path=PREFIX)


SESSIONS = web.AppKey("ui_sessions", Sessions)
_LOADED = web.RequestKey("ui_session", object)


def current(request: web.Request) -> Session | None:
    """The request's valid session, checked once per request."""
    if _LOADED not in request:
        request[_LOADED] = request.app[SESSIONS].load(request)
    return request[_LOADED]


def session_identity(request: web.Request) -> ApiKey | None:
    return request.app[SESSIONS].identity(current(request))
