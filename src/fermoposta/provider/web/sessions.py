"""Logins of the status page: server-side sessions, their cookie and CSRF tokens.

Contract:
- `Sessions` keeps every login in memory (a restart logs everyone out):
  `create(kind, name)` makes a `Session` with a random 256-bit token (the
  cookie's value) and its own random CSRF token; `get(token)` returns it
  while it is alive: used within `idle` seconds, and younger than
  `MAX_AGE` in any case; `drop(token)` ends it (logout).  At most
  `MAX_PER_NAME` per operator or account (a new login ends that name's
  least recently used one) and `max_sessions` in all (expired ones go
  first, then the least recently used), so logins of one account cannot
  push everybody else out.
- `kind` is ``"operator"`` or ``"customer"``; `name` is the operator's name
  or the account's.  What a session may see is decided from those two
  only (`app.py`).
- `cookie_options(secure)` are the cookie's attributes: ``HttpOnly``,
  ``SameSite=Strict``, ``Path=/`` always and ``Secure`` when the page is
  served over TLS (over plain HTTP a browser would drop a Secure cookie,
  so without ``[tls]`` the page must stay on 127.0.0.1 or a trusted
  network: docs/web.md).
- `check_csrf(session, value)` compares in constant time.  A login form
  has no session yet: its CSRF token is a random value set in a cookie of
  its own when the form is shown (double submit), compared the same way.
"""

from __future__ import annotations

import collections
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

COOKIE = "fermoposta_session"
LOGIN_COOKIE = "fermoposta_login"
MAX_AGE = 12 * 3600.0
# Sessions one operator or account may hold at once; a new login beyond it
# ends that name's least recently used one, never somebody else's.
MAX_PER_NAME = 20


@dataclass(slots=True)
class Session:
    kind: str  # "operator" | "customer"
    name: str
    token: str
    csrf: str
    created_at: float
    used_at: float
    via: str = "password"  # or "certificate"
    # What the login rested on (app.py checks it again at every request, so
    # a removed operator or a changed password ends the session).
    credential: str = ""
    notices: list[str] = field(default_factory=list)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cookie_options(secure: bool) -> dict[str, Any]:
    return {"httponly": True, "samesite": "Strict", "secure": secure, "path": "/"}


def tokens_equal(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


class Sessions:
    def __init__(self, idle: float, *, max_sessions: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle = idle
        self.max_sessions = max_sessions
        self.clock = clock
        self._live: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def create(self, kind: str, name: str, via: str = "password",
               credential: str = "") -> Session:
        now = self.clock()
        mine = [t for t, s in self._live.items() if s.kind == kind and s.name == name]
        for token in mine[: max(0, len(mine) - MAX_PER_NAME + 1)]:
            del self._live[token]  # this login's own oldest
        if len(self._live) >= self.max_sessions:
            for token in [t for t, s in self._live.items() if self._expired(s, now)]:
                del self._live[token]
        while len(self._live) >= self.max_sessions:
            self._live.popitem(last=False)
        session = Session(kind, name, new_token(), new_token(), now, now, via, credential)
        self._live[session.token] = session
        return session

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.used_at >= self.idle or now - session.created_at >= MAX_AGE

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self._live.get(token)
        if session is None:
            return None
        now = self.clock()
        if self._expired(session, now):
            del self._live[token]
            return None
        session.used_at = now
        self._live.move_to_end(token)
        return session

    def drop(self, token: str | None) -> None:
        if token:
            self._live.pop(token, None)

    def __len__(self) -> int:
        return len(self._live)


def check_csrf(session: Session, value: str | None) -> bool:
    return tokens_equal(session.csrf, value)
