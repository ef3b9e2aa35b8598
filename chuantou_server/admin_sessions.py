"""The relay admin page's login sessions (common/login_sessions.py) and the per-source limit on
failed logins.
"""

from __future__ import annotations

import logging
import threading
import time

from common.limits import LimitLog, TokenBucket, source_key
from common.login_sessions import DEFAULT_IDLE, DEFAULT_LIFETIME, DEFAULT_MAX_SESSIONS  # noqa: F401 (re-exported)
from common.login_sessions import LoginSessions as AdminSessions  # noqa: F401 (re-exported)

log = logging.getLogger("chuantou.server")

DEFAULT_LOGIN_FAILURES_PER_MINUTE = 10
MAX_SOURCES = 4096  # failure buckets kept; a spray of addresses cannot grow this without bound


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
