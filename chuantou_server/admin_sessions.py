"""Login sessions of the relay's admin page: random, kept on the relay, expiring, revocable.

A login gets a fresh random session ID (the cookie's value). It expires after
``idle`` seconds without use and ``lifetime`` seconds after the login, whichever
comes first; logout revokes it; at most ``max_sessions`` live at once (a login beyond
that ends the least recently used one). Only a hash of each ID is kept, so a dump of this
table does not log anyone in. Also here: the per-source limit on failed logins.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass

from common.limits import LimitLog, TokenBucket, source_key

log = logging.getLogger("chuantou.server")

DEFAULT_IDLE = 30 * 60.0  # half an hour without a request
DEFAULT_LIFETIME = 12 * 3600.0  # a working day, however active
DEFAULT_MAX_SESSIONS = 64
DEFAULT_LOGIN_FAILURES_PER_MINUTE = 10
SESSION_ID_BYTES = 32
MAX_SOURCES = 4096  # failure buckets kept; a spray of addresses cannot grow this without bound


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()


@dataclass
class _Session:
    created: float
    last_used: float


class AdminSessions:
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


class LoginFailures:
    """At most ``per_minute`` failed logins (wrong admin token) per source; 0 turns the limit off."""

    def __init__(self, per_minute: int = DEFAULT_LOGIN_FAILURES_PER_MINUTE):
        self.per_minute = per_minute
        self.limit_log = LimitLog(log)
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def blocked(self, ip: str) -> bool:
        """True while ``ip``'s source has used up its failures (logged when it bites; nothing is
        spent by asking)."""
        if self.per_minute <= 0:
            return False
        key = source_key(ip)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return False
            bucket.take(0)  # refill up to now
            if bucket.tokens >= 1:
                return False
        self.limit_log.bit("adminLoginFailuresPerMinute", key,
                           "admin login refused for %s: more than %d failed logins a minute "
                           "(adminLoginFailuresPerMinute)", key, self.per_minute)
        return True

    def failed(self, ip: str) -> None:
        if self.per_minute <= 0:
            return
        key = source_key(ip)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= MAX_SOURCES:
                    self._forget_recovered()
                bucket = self._buckets[key] = TokenBucket(self.per_minute / 60.0, self.per_minute)
            bucket.take()

    def _forget_recovered(self) -> None:
        now = time.monotonic()
        for key, bucket in list(self._buckets.items()):
            bucket.take(0, now)  # refill up to now
            if bucket.tokens >= bucket.burst:  # back to full: forgetting it changes nothing
                del self._buckets[key]
        if len(self._buckets) >= MAX_SOURCES:
            self._buckets.clear()
