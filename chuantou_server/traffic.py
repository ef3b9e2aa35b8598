"""Byte figures of the relay for the admin page: totals, per-client totals, per-session rates,
and a five-minute history of throughput; beside them, the bytes clients report they moved on
direct paths (direct_claims.py: claims, kept apart from what the relay itself counted).

``Server`` ends a session through ``retire()`` (which takes it out of the table and adds its
bytes to the finished totals in one step), and runs ``run()`` on a thread of its own;
everything else reads counters the sessions already keep, live: a running pipe's ``sent``.
"""

from __future__ import annotations

import threading
import time

from common.traffic import SAMPLE_INTERVAL, RateHistory

from . import direct_claims


class RelayTraffic:
    def __init__(self, sessions, registry, interval: float = SAMPLE_INTERVAL):
        self.sessions = sessions
        self.registry = registry
        self.interval = interval
        self._lock = threading.Lock()
        self._finished: dict[tuple[str, int], int] = {}  # (protocol, 0: a->b / 1: b->a) -> bytes, ended sessions
        self._finished_by_client: dict[str, list[int]] = {}  # client id -> [sent, received]
        self._finished_direct: dict[tuple[str, int], int] = {}  # as _finished, the bytes reported direct
        self._finished_direct_by_client: dict[str, list[int]] = {}  # client id -> [sent, received] it claimed
        self._session_rates: dict[str, tuple[float, float]] = {}
        self._last_bytes: dict[str, tuple[int, int]] = {}
        self._last_sample: float | None = None
        self.history = RateHistory(self.total_bytes)

    def retire(self, session, remove) -> bool:
        """``remove(session)`` from the table and, if that removed it, count its bytes as finished;
        True if so. One step under our lock, so a figure read meanwhile (``bytes_by_direction``)
        counts the session's bytes once, live or finished, and never goes back."""
        with self._lock:
            if not remove(session):
                return False
            self._session_closed(session)
            return True

    def _session_closed(self, session) -> None:
        """(The caller holds our lock.)"""
        a_to_b, b_to_a = session.bytes_a_to_b, session.bytes_b_to_a
        for index, count in ((0, a_to_b), (1, b_to_a)):
            key = (session.protocol, index)
            self._finished[key] = self._finished.get(key, 0) + count
        for client_id, sent, received in ((session.client_a, a_to_b, b_to_a),
                                          (session.client_b, b_to_a, a_to_b)):
            totals = self._finished_by_client.setdefault(client_id, [0, 0])
            totals[0] += sent
            totals[1] += received
        for index, count in enumerate(direct_claims.direct_bytes(session)):
            key = (session.protocol, index)
            self._finished_direct[key] = self._finished_direct.get(key, 0) + count
        for client_id in {session.client_a, session.client_b}:
            claimed = direct_claims.claimed_by(session, client_id)
            totals = self._finished_direct_by_client.setdefault(client_id, [0, 0])
            totals[0] += claimed[0]
            totals[1] += claimed[1]

    def bytes_by_direction(self) -> dict[tuple[str, int], int]:
        """(protocol, 0: A->B / 1: B->A) -> bytes relayed since start, running sessions included."""
        with self._lock:
            totals = dict(self._finished)
            for s in self.sessions.all():
                for index, count in ((0, s.bytes_a_to_b), (1, s.bytes_b_to_a)):
                    key = (s.protocol, index)
                    totals[key] = totals.get(key, 0) + count
        return totals

    def direct_by_direction(self) -> dict[tuple[str, int], int]:
        """As ``bytes_by_direction``, the bytes clients report went direct (claims, bounded)."""
        with self._lock:
            totals = dict(self._finished_direct)
            for s in self.sessions.all():
                for index, count in enumerate(direct_claims.direct_bytes(s)):
                    key = (s.protocol, index)
                    totals[key] = totals.get(key, 0) + count
        return totals

    def client_direct(self, client_id: str, live_sessions) -> tuple[int, int]:
        """(sent, received) directly, as ``client_id`` itself reported: ended sessions plus ``live_sessions``."""
        with self._lock:
            sent, received = self._finished_direct_by_client.get(client_id, (0, 0))
        for s in live_sessions:
            claimed = direct_claims.claimed_by(s, client_id)
            sent, received = sent + claimed[0], received + claimed[1]
        return sent, received

    def total_bytes(self) -> tuple[int]:
        return (sum(self.bytes_by_direction().values()),)

    def client_bytes(self, client_id: str, live_sessions) -> tuple[int, int]:
        """(sent, received) by ``client_id`` through the relay: ended sessions plus ``live_sessions``."""
        with self._lock:
            sent, received = self._finished_by_client.get(client_id, (0, 0))
        for s in live_sessions:
            if s.client_a == client_id:
                sent, received = sent + s.bytes_a_to_b, received + s.bytes_b_to_a
            if s.client_b == client_id:
                sent, received = sent + s.bytes_b_to_a, received + s.bytes_a_to_b
        return sent, received

    def session_rate(self, session_id: str) -> tuple[float, float]:
        """(A->B, B->A) bytes/s over the last sample interval."""
        with self._lock:
            return self._session_rates.get(session_id, (0.0, 0.0))

    def sample(self) -> None:
        now = time.monotonic()
        sessions = self.sessions.all()
        current = {s.id: (s.bytes_a_to_b, s.bytes_b_to_a) for s in sessions}
        # Per-client totals live as long as the client is online or has a session running.
        keep = set(self.registry.ids()).union(*({s.client_a, s.client_b} for s in sessions))
        with self._lock:
            for finished in (self._finished_by_client, self._finished_direct_by_client):
                for client_id in [c for c in finished if c not in keep]:
                    del finished[client_id]
            if self._last_sample is not None and now > self._last_sample:
                elapsed = now - self._last_sample
                previous = self._last_bytes
                self._session_rates = {
                    sid: tuple(max(0.0, (new - old) / elapsed) for new, old in zip(pair, previous.get(sid, (0, 0))))
                    for sid, pair in current.items()
                }
            self._last_bytes = current
            self._last_sample = now
        self.history.sample()

    def run(self, stopping: threading.Event) -> None:
        self.sample()
        while not stopping.wait(self.interval):
            self.sample()
