"""Login sessions of an admin page: random, kept in the process, expiring, revocable.

Shared by the relay's admin page and the client's local page. A login gets a fresh random
session ID (the cookie's value). It expires after ``idle`` seconds without use and
``lifetime`` seconds after the login, whichever comes first; logout revokes it; at most
``max_sessions`` live at once (a login beyond that ends the least recently used one). Only a
hash of each ID is kept, so a dump of this table does not log anyone in.

This is application shell rather than wire format; it lives in ``common`` because both programs'
pages use it and the layout has no other shared package.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

DEFAULT_IDLE = 30 * 60.0  # half an hour without a request
DEFAULT_LIFETIME = 12 * 3600.0  # a working day, however active
DEFAULT_MAX_SESSIONS = 64
SESSION_ID_BYTES = 32


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()


@dataclass
class _Session:
    created: float
    last_used: float


class LoginSessions:
    def __init__(self, idle: float = DEFAULT_IDLE, lifetime: float = DEFAULT_LIFETIME,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, clock=time.monotonic):
        self.idle = idle
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: dict[bytes, _Session] = {}
        self._lock = threading.Lock()

    def create(self) -> str:
        """A new session; returns its ID (the cookie value). May end the least recently used one."""
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        now = self._clock()
        with self._lock:
            self._prune(now)
            while self._sessions and len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions, key=lambda k: self._sessions[k].last_used)
                del self._sessions[oldest]
            self._sessions[_digest(session_id)] = _Session(now, now)
        return session_id

    def check(self, session_id: str) -> bool:
        """True if ``session_id`` is a live session (and counts as its use); expired ones are dropped."""
        key, now = _digest(session_id), self._clock()
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return False
            if self._expired(session, now):
                del self._sessions[key]
                return False
            session.last_used = now
            return True

    def revoke(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(_digest(session_id), None) is not None

    def revoke_all(self) -> None:
        with self._lock:
            self._sessions.clear()

    def count(self) -> int:
        with self._lock:
            self._prune(self._clock())
            return len(self._sessions)

    def max_age(self) -> int:
        """The cookie's Max-Age: the browser may forget it when the relay will anyway."""
        return max(1, int(self.lifetime))

    def _expired(self, session: _Session, now: float) -> bool:
        return now - session.last_used > self.idle or now - session.created > self.lifetime

    def _prune(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[key]
