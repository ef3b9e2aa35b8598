"""Caps on control channels that have not registered yet, per source and overall.

A WebSocket costs the relay two threads and buffers before it proves anything; without a cap
one address could open thousands and slow everyone. A registered connection no longer counts
(it has proved a token, and per-client caps take over), nor does one that has ended.
"""

from __future__ import annotations

import logging
import threading

from common.limits import LimitLog, source_key

log = logging.getLogger("chuantou.server")

DEFAULT_MAX_UNREGISTERED = 1024
DEFAULT_MAX_UNREGISTERED_PER_SOURCE = 64


class Admission:
    """One connection's place under the cap; ``release()`` is safe to call more than once."""

    def __init__(self, gate: "UnregisteredGate", key: str):
        self._gate = gate
        self.key = key
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate._leave(self.key)


class UnregisteredGate:
    def __init__(self, total: int = DEFAULT_MAX_UNREGISTERED,
                 per_source: int = DEFAULT_MAX_UNREGISTERED_PER_SOURCE, limit_log: LimitLog | None = None):
        self.total = total
        self.per_source = per_source
        self.limit_log = limit_log or LimitLog(log)
        self._lock = threading.Lock()
        self._count = 0
        self._by_source: dict[str, int] = {}

    def admit(self, ip: str) -> tuple[Admission | None, str | None]:
        """(an Admission, None), or (None, the reason to give the peer) when a cap is reached."""
        key = source_key(ip)
        with self._lock:
            if self._by_source.get(key, 0) >= self.per_source:
                problem = (f"too many unregistered control connections from {key} (limit "
                           f"{self.per_source}, maxUnregisteredPerSource); register or close some first")
                limit = "unregistered_per_source"
            elif self._count >= self.total:
                problem = (f"the relay has too many unregistered control connections (limit {self.total}, "
                           f"maxUnregistered); try again shortly")
                limit = "unregistered_total"
            else:
                self._count += 1
                self._by_source[key] = self._by_source.get(key, 0) + 1
                return Admission(self, key), None
        self.limit_log.bit(limit, key, "control connection from %s refused: %s", ip, problem)
        return None, problem

    def _leave(self, key: str) -> None:
        with self._lock:
            self._count -= 1
            left = self._by_source.get(key, 1) - 1
            if left > 0:
                self._by_source[key] = left
            else:
                self._by_source.pop(key, None)

    @property
    def pending(self) -> int:
        with self._lock:
            return self._count

    def pending_from(self, ip: str) -> int:
        with self._lock:
            return self._by_source.get(source_key(ip), 0)
