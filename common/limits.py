"""Shared pieces for the limits that protect the relay and the clients from hostile load.

Plain data structures with no I/O: the key one source address is counted under, a token
bucket (and ``RateLimit``, its thread-safe form that bandwidth limits wait on), and a logger
that says a limit bit at most once per source per interval (so a flood cannot flood the log
as well).
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


class RateLimit:
    """``bytes_per_second`` on average with bursts of ``burst`` bytes, shared by many threads
    (every session of a proxy, or of a client on the relay).

    ``take(n)`` reserves ``n`` bytes and sleeps until they are covered: the balance may go into
    debt, so a chunk larger than the burst still passes, and each taker waits its turn in the
    order it reserved. That sleep is the backpressure: a pump that waits reads nothing, so its
    sender's TCP window closes. ``try_take(n)`` is for UDP, which drops instead of waiting."""

    def __init__(self, bytes_per_second: float, burst: float | None = None):
        if bytes_per_second <= 0:
            raise ValueError("a rate limit needs bytes_per_second > 0")
        self.rate = float(bytes_per_second)
        self.burst = float(burst) if burst else default_burst(self.rate)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<RateLimit {self.rate:g} B/s burst {self.burst:g}>"

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def reserve(self, n: int) -> float:
        """Spend ``n`` bytes now (into debt if need be); return the seconds to wait before using them."""
        with self._lock:
            self._refill(time.monotonic())
            self._tokens -= n
            return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def try_take(self, n: int) -> bool:
        """Spend ``n`` bytes if they are there now; False (nothing spent) if not."""
        with self._lock:
            self._refill(time.monotonic())
            if self._tokens >= n:
                self._tokens -= n
                return True
            return False

    def available(self, n: int) -> bool:
        """Are ``n`` bytes there now (nothing spent)?"""
        with self._lock:
            self._refill(time.monotonic())
            return self._tokens >= n

    def take(self, n: int, interrupt: threading.Event | None = None) -> None:
        take_all((self,), n, interrupt)


def default_burst(rate: float) -> float:
    """A tenth of a second's worth, at least 64 KiB: smooth enough to measure, big enough
    that a pump still moves whole buffers."""
    return max(64 * 1024.0, rate / 10)


def take_all(limits, n: int, interrupt: threading.Event | None = None) -> None:
    """Take ``n`` bytes from every limit in ``limits``; sleep the longest wait among them
    (on ``interrupt``, so an abort wakes the sleeper at once)."""
    wait = max((limit.reserve(n) for limit in limits), default=0.0)
    if wait > 0:
        if interrupt is not None:
            interrupt.wait(wait)
        else:
            time.sleep(wait)


def most_of(limits) -> int:
    """The largest chunk a limited pump should read at once: the smallest burst among ``limits``."""
    return int(min(limit.burst for limit in limits))


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
