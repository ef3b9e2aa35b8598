"""The relay's bandwidth limits: per client and over the whole relay, whatever a client says.

Every client has one bucket for what it sends and one for what it receives, shared by all its
sessions (TCP and UDP); the relay as a whole has one bucket for every byte it relays, either
way. A TCP pump takes from the buckets its bytes pass (sender's up, receiver's down, the total)
and waits for them, so the sender's TCP window closes; a UDP datagram over a limit is dropped.
"""

from __future__ import annotations

import threading
import time

from common.limits import RateLimit

MAX_CLIENTS = 65536  # buckets kept at once; beyond that, the ones unused for IDLE are forgotten
IDLE = 60.0


class BandwidthLimits:
    """``per_client`` and ``total`` in bytes/s; 0 turns that limit off."""

    def __init__(self, per_client: int = 0, total: int = 0):
        self.per_client = per_client
        self.total = RateLimit(total) if total else None
        self._clients: dict[str, tuple[RateLimit, RateLimit, list[float]]] = {}  # id -> (up, down, [last use])
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return bool(self.per_client or self.total)

    def _client(self, client_id: str) -> tuple[RateLimit | None, RateLimit | None]:
        if not self.per_client:
            return None, None
        now = time.monotonic()
        with self._lock:
            entry = self._clients.get(client_id)
            if entry is None:
                if len(self._clients) >= MAX_CLIENTS:
                    self._clients = {k: e for k, e in self._clients.items() if now - e[2][0] < IDLE}
                entry = self._clients[client_id] = (RateLimit(self.per_client), RateLimit(self.per_client), [now])
            entry[2][0] = now
            return entry[0], entry[1]

    def pipe_limits(self, session) -> tuple[tuple, tuple]:
        """``Pipe(sock_a, sock_b, limits=...)`` for ``session``: (a -> b, b -> a)."""
        if not self.active:
            return (), ()
        a_up, a_down = self._client(session.client_a)
        b_up, b_down = self._client(session.client_b)
        return (a_up, b_down, self.total), (b_up, a_down, self.total)

    def udp_allowed(self, session, side: int, size: int) -> bool:
        """May a datagram from ``side`` (0: A) of ``session`` pass now? Nothing is spent if not."""
        if not self.active:
            return True
        sender, receiver = (session.client_a, session.client_b) if side == 0 else (session.client_b, session.client_a)
        up, _ = self._client(sender)
        _, down = self._client(receiver)
        limits = [limit for limit in (up, down, self.total) if limit is not None]
        # all or nothing: spend only once every bucket has room, so a drop costs no bucket anything
        if not all(limit.available(size) for limit in limits):
            return False
        return all(limit.try_take(size) for limit in limits)
