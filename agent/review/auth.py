"""Login for the review app: a password hash or a token from the environment, sessions, CSRF.

The password is never stored: ``understudy review hash-password`` prints a salted scrypt
hash (stdlib ``hashlib.scrypt``) that goes in ``$UNDERSTUDY_REVIEW_PASSWORD_HASH``. A
token (``$UNDERSTUDY_REVIEW_TOKEN``) is an alternative for scripts: it is accepted as the
login password and as ``Authorization: Bearer <token>``.

Sessions live in this process's memory, keyed by a random id in an HttpOnly,
SameSite=Strict cookie. That is enough for one reviewer-facing process, and a restart
simply logs everybody out; nothing secret is ever put in the cookie itself. Each session
carries its own CSRF token, which every state-changing form must echo back.

>>> h = hash_password("correct horse")
>>> verify_password("correct horse", h), verify_password("wrong", h)
(True, False)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

from agent.review.errors import AuthNotConfigured, BadPasswordHash

SCHEME = "scrypt"
# ~50 ms and 16 MiB per check on this hardware: slow for a guesser, fine for a login.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SESSION_COOKIE = "understudy_session"
SESSION_IDLE_S = 12 * 3600
ANONYMOUS_LIMIT = 10_000   # pre-login sessions kept before the oldest are dropped


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R,
                  p: int = SCRYPT_P) -> str:
    """A salted scrypt hash: ``scrypt$N$r$p$salt$hash`` (URL-safe base64 parts)."""
    if not password:
        raise ValueError("the password must not be empty")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                            maxmem=128 * n * r * p + 2**20, dklen=32)
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def check_hash_format(encoded: str) -> None:
    """Raise :class:`BadPasswordHash` unless ``encoded`` is a hash this module made."""
    parts = encoded.strip().split("$")
    try:
        ok = (len(parts) == 6 and parts[0] == SCHEME and int(parts[1]) > 1
              and int(parts[2]) > 0 and int(parts[3]) > 0
              and len(_unb64(parts[4])) >= 8 and len(_unb64(parts[5])) >= 16)
    except ValueError:
        ok = False
    if not ok:
        raise BadPasswordHash(
            "the review password hash is not in the scrypt$N$r$p$salt$hash form; "
            "make one with `understudy review hash-password`")


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` string."""
    check_hash_format(encoded)
    _, n, r, p, salt, want = encoded.strip().split("$")
    n_, r_, p_ = int(n), int(r), int(p)
    got = hashlib.scrypt(password.encode("utf-8"), salt=_unb64(salt), n=n_, r=r_, p=p_,
                         maxmem=128 * n_ * r_ * p_ + 2**20, dklen=len(_unb64(want)))
    return hmac.compare_digest(got, _unb64(want))


class Authenticator:
    """Checks a login secret against the configured password hash and/or token.

    >>> Authenticator(password_hash=hash_password("pw")).check("pw")
    True
    """

    def __init__(self, *, password_hash: str | None = None, token: str | None = None):
        if not password_hash and not token:
            raise AuthNotConfigured(
                "the review app needs a login: set UNDERSTUDY_REVIEW_PASSWORD_HASH to the "
                "output of `understudy review hash-password` (or UNDERSTUDY_REVIEW_TOKEN to a "
                "long random token; the names are review.password_hash_env / token_env)")
        if password_hash:
            check_hash_format(password_hash)
        self._hash = password_hash.strip() if password_hash else None
        self._token = token

    def check(self, secret: str) -> bool:
        """True when ``secret`` is the password or the token."""
        if not secret:
            return False
        ok = False
        if self._token is not None:
            ok = hmac.compare_digest(secret.encode(), self._token.encode())
        if not ok and self._hash is not None:
            ok = verify_password(secret, self._hash)
        return ok

    def check_bearer(self, header: str | None) -> bool:
        """True for ``Authorization: Bearer <token>`` with the configured token."""
        if self._token is None or not header or not header.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self._token.encode())


@dataclass
class Session:
    id: str
    csrf: str
    user: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    flash: list[tuple[str, str]] = field(default_factory=list)   # (kind, text) for next page

    @property
    def authenticated(self) -> bool:
        return self.user is not None


class SessionStore:
    """In-memory sessions; ids and CSRF tokens are 256-bit random strings."""

    def __init__(self, idle_s: float = SESSION_IDLE_S):
        self._idle_s = idle_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        now = time.monotonic()
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return None
            if now - s.last_seen > self._idle_s:
                del self._sessions[sid]
                return None
            s.last_seen = now
            return s

    def new(self, user: str | None = None) -> Session:
        s = Session(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), user=user)
        with self._lock:
            if len(self._sessions) >= ANONYMOUS_LIMIT:
                self._evict()
            self._sessions[s.id] = s
        return s

    def login(self, old: Session | None, user: str) -> Session:
        """A fresh session for ``user``; the pre-login id is dropped (no fixation)."""
        if old is not None:
            self.drop(old.id)
        return self.new(user)

    def drop(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def _evict(self) -> None:
        anon = sorted((s.last_seen, k) for k, s in self._sessions.items() if s.user is None)
        for _, k in anon[: max(1, len(anon) // 2)]:
            del self._sessions[k]


def csrf_ok(session: Session | None, submitted: str | None) -> bool:
    """True when the form echoed this session's CSRF token."""
    if session is None or not submitted:
        return False
    return hmac.compare_digest(session.csrf.encode(), submitted.encode())
