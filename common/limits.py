"""Shared pieces for the limits that protect the relay and the clients from hostile load.

Plain data structures with no I/O: the key one source address is counted under, a token
bucket, and a logger that says a limit bit at most once per source per interval (so a flood
cannot flood the log as well).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

LOG_INTERVAL = 60.0  # a limit that bites is logged at most once per source per minute


def source_key(ip: str) -> str:
    """The key a source address is counted under: the IPv4 address itself, or the /64 of an
    IPv6 address (one host usually holds a whole /64). IPv4-mapped IPv6 counts as IPv4."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class TokenBucket:
    """``rate`` events per second on average, bursts of up to ``burst``. Not thread-safe on its
    own: callers that share one hold their own lock (the UDP relay has a single thread)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, amount: float = 1.0, now: float | None = None) -> bool:
        """Spend ``amount`` tokens if there are enough; False (and nothing spent) if not."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False


class LimitLog:
    """Logs "limit X bit for source S" at most once per (limit, source) per ``interval``, and
    counts every time it bit, so tests and figures can see it without reading the log."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL, max_keys: int = 4096):
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self.counts: dict[str, int] = {}  # limit name -> times it bit
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def bit(self, limit: str, source: str, message: str, *args, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        with self._lock:
            self.counts[limit] = self.counts.get(limit, 0) + 1
            key = (limit, source)
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                return
            if len(self._last) >= self.max_keys:  # a spray of sources must not grow this without bound
                self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
                if len(self._last) >= self.max_keys:
                    self._last.clear()
            self._last[key] = now
        self.logger.log(level, message + " (logged at most once a minute per source)", *args)

    def count(self, limit: str) -> int:
        with self._lock:
            return self.counts.get(limit, 0)
