"""Slots for connections still in their first-bytes handshake (TLS, HTTP head, data-channel
header), counted per source (``common.limits.source_key``: an IPv4 address or an IPv6 /64).

A source holds at most ``per_source`` slots. When all ``total`` slots are taken, a newcomer
is not simply refused: it takes the oldest slot of the source that holds the most, provided it
would then hold fewer than that source (sources with a registered client count as lighter than
strangers). So a few addresses full of silent sockets cannot keep an honest data channel or
registration from another address out; they only crowd each other.
"""

from __future__ import annotations

import logging
import socket
import threading

from common.limits import LimitLog, source_key
from common.net import shutdown_quietly

log = logging.getLogger("chuantou.server")

DEFAULT_MAX_PENDING = 1024
DEFAULT_MAX_PENDING_PER_SOURCE = 256


class HandshakeGate:
    def __init__(self, total: int = DEFAULT_MAX_PENDING, per_source: int = DEFAULT_MAX_PENDING_PER_SOURCE,
                 is_known=lambda key: False):
        """``is_known(key)`` tells whether a source key has a registered client (it then
        outranks strangers when slots are scarce)."""
        self.total = total
        self.per_source = per_source
        self.is_known = is_known
        self.limit_log = LimitLog(log)
        self._lock = threading.Lock()
        self._count = 0
        self._by_source: dict[str, dict[socket.socket, None]] = {}  # key -> its sockets, oldest first
        self._source_of: dict[socket.socket, str] = {}
        self.evicted = 0  # figures for tests
        self.failed: dict[str, int] = {}  # source key -> handshakes that timed out or broke (figures for tests)

    def enter(self, ip: str, sock: socket.socket) -> bool:
        """Give ``sock`` a slot; False if its source may not have one now (the caller closes it)."""
        key = source_key(ip)
        victim = None
        refused: str | None
        with self._lock:
            held = len(self._by_source.get(key, ()))
            if held >= self.per_source:
                refused = "per_source"
            elif self._count >= self.total:
                victim = self._evict_for(key, held + 1)
                refused = None if victim is not None else "total"
            else:
                refused = None
            if refused is None:
                self._count += 1
                self._by_source.setdefault(key, {})[sock] = None
                self._source_of[sock] = key
        if victim is not None:
            shutdown_quietly(victim)  # wakes its thread, which closes it
        if refused == "per_source":
            self.limit_log.bit("handshakes_per_source", key,
                               "source %s holds %d connections that have not finished their first request; "
                               "more are closed (maxPendingHandshakesPerSource)", key, self.per_source)
        elif refused == "total":
            self.limit_log.bit("handshakes", key,
                               "all %d handshake slots are taken; a connection from %s was closed "
                               "(maxPendingHandshakes)", self.total, key)
        elif victim is not None:
            self.limit_log.bit("handshake_evicted", key,
                               "all %d handshake slots are taken; the oldest connection of the busiest source "
                               "was closed to make room for %s (maxPendingHandshakes)", self.total, key)
        return refused is None

    def _rank(self, key: str, held: int) -> tuple[bool, int]:
        return (not self.is_known(key), held)  # strangers first, then the source holding most

    def _evict_for(self, key: str, would_hold: int) -> socket.socket | None:
        """Free the oldest slot of the heaviest other source if it outranks the newcomer (lock held)."""
        heaviest, rank = None, None
        for other, socks in self._by_source.items():
            if other != key:
                other_rank = self._rank(other, len(socks))
                if rank is None or other_rank > rank:
                    heaviest, rank = other, other_rank
        if heaviest is None or rank is None or rank <= self._rank(key, would_hold):
            return None
        socks = self._by_source[heaviest]
        victim = next(iter(socks))
        self._release(victim)
        self.evicted += 1
        return victim

    def leave(self, ip: str, sock: socket.socket) -> None:
        """The handshake of ``sock`` ended (done, failed, or evicted earlier: then nothing to do)."""
        with self._lock:
            self._release(sock)

    def note_failed(self, ip: str) -> None:
        """Count a handshake from ``ip`` that ended in a timeout, reset or garbage (logged at DEBUG)."""
        key = source_key(ip)
        with self._lock:
            self.failed[key] = self.failed.get(key, 0) + 1

    def _release(self, sock: socket.socket) -> None:
        key = self._source_of.pop(sock, None)
        if key is None:
            return
        self._count -= 1
        socks = self._by_source[key]
        del socks[sock]
        if not socks:
            del self._by_source[key]

    def abort_all(self) -> None:
        """Shut down every connection still in its handshake (at stop)."""
        with self._lock:
            sockets = list(self._source_of)
        for sock in sockets:
            shutdown_quietly(sock)

    @property
    def pending(self) -> int:
        return self._count

    def held_by(self, ip: str) -> int:
        with self._lock:
            return len(self._by_source.get(source_key(ip), ()))
