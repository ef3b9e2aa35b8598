"""Caps on the relay's sessions: per requesting client (open and still unjoined), per target
client, overall, and a reserve of file descriptors kept for control connections.

``SessionCaps.refusal()`` is asked before a session is created and answers None or a
``Refusal``: which limit (one of ``LIMITS``, a label for the metrics) and the message for
client A; each refusal is also logged, at most once per client per minute.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from common.limits import LimitLog

log = logging.getLogger("chuantou.server")

DEFAULT_MAX_SESSIONS = 10000
DEFAULT_MAX_SESSIONS_PER_CLIENT = 4096
DEFAULT_MAX_SESSIONS_PER_TARGET = 4096
DEFAULT_MAX_UDP_FLOWS_PER_CLIENT = 1024
DEFAULT_MAX_PENDING_SESSIONS_PER_CLIENT = 256
DEFAULT_DESCRIPTOR_RESERVE = 256
DESCRIPTORS_PER_SESSION = 2  # the two data channels at the relay
LIMITS = ("per_client", "pending", "per_target", "total", "descriptors")  # what Refusal.limit may be


class Refusal(NamedTuple):
    limit: str  # one of LIMITS
    message: str  # for client A


class DescriptorBudget:
    """Open file descriptors against RLIMIT_NOFILE. Counting /proc/self/fd costs a directory
    read, so the count is refreshed at most every ``refresh`` seconds, and more often (every
    ``near_refresh``) once the headroom is small; sessions admitted in between are added."""

    def __init__(self, reserve: int, refresh: float = 1.0, near_refresh: float = 0.05):
        self.reserve = reserve
        self.refresh = refresh
        self.near_refresh = near_refresh
        self._lock = threading.Lock()
        self._open = 0
        self._counted_at = float("-inf")

    @staticmethod
    def limit() -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return soft if soft != resource.RLIM_INFINITY else 1 << 20

    @staticmethod
    def count_open() -> int:
        try:
            return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself opened
        except OSError:  # no /proc: do not limit by descriptors
            return 0

    def headroom(self) -> int:
        """Descriptors still free above the reserve (may be negative)."""
        now = time.monotonic()
        with self._lock:
            stale = now - self._counted_at
            near = self.limit() - self._open - self.reserve < 4 * self.reserve
            if stale >= self.refresh or (near and stale >= self.near_refresh):
                self._open = self.count_open()
                self._counted_at = now
            return self.limit() - self._open - self.reserve

    def spend(self, count: int) -> None:
        with self._lock:
            self._open += count


@dataclass
class SessionCaps:
    max_sessions: int = DEFAULT_MAX_SESSIONS
    per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT
    udp_per_client: int = DEFAULT_MAX_UDP_FLOWS_PER_CLIENT
    per_target: int = DEFAULT_MAX_SESSIONS_PER_TARGET
    pending_per_client: int = DEFAULT_MAX_PENDING_SESSIONS_PER_CLIENT
    descriptor_reserve: int = DEFAULT_DESCRIPTOR_RESERVE
    limit_log: LimitLog = field(default_factory=lambda: LimitLog(log))

    def __post_init__(self):
        self.descriptors = DescriptorBudget(self.descriptor_reserve)
        # sessions a client opened that other relays of its cluster pump (cluster.py sets it)
        self.opened_elsewhere: Callable[[str, str], int] = lambda client_id, protocol: 0
        self.pending_elsewhere: Callable[[str], int] = lambda client_id: 0  # its pending sessions there

    def out_of_descriptors(self) -> bool:
        """True when no TCP session would be admitted for lack of descriptors (the health check)."""
        return self.descriptors.headroom() < DESCRIPTORS_PER_SESSION

    def refusal(self, sessions, client_a: str, client_b: str, protocol: str) -> Refusal | None:
        """Why a new ``protocol`` session from ``client_a`` to ``client_b`` may not open now, or None."""
        problem = self._problem(sessions, client_a, client_b, protocol)
        if problem is None:
            if protocol == "tcp":
                self.descriptors.spend(DESCRIPTORS_PER_SESSION)
            return None
        self.limit_log.bit(problem.limit, client_a, "session from %s to %s refused: %s", client_a, client_b,
                           problem.message)
        return problem

    def _problem(self, sessions, client_a: str, client_b: str, protocol: str) -> Refusal | None:
        limit = self.per_client if protocol == "tcp" else self.udp_per_client
        key = "maxSessionsPerClient" if protocol == "tcp" else "maxUdpFlowsPerClient"
        elsewhere = self.opened_elsewhere(client_a, protocol)
        if sessions.opened_by(client_a, protocol) + elsewhere >= limit:
            where = " (across the relay's cluster)" if elsewhere else ""
            return Refusal("per_client", f"this client already has {limit} open {protocol.upper()} sessions{where}, "
                                         f"the relay's limit per client; close some connections or raise the "
                                         f"limit ({key})")
        pending_elsewhere = self.pending_elsewhere(client_a)
        if sessions.unjoined_by(client_a) + pending_elsewhere >= self.pending_per_client:
            return Refusal("pending", pending_problem(self.pending_per_client, pending_elsewhere > 0))
        if sessions.targeting(client_b) + self.opened_elsewhere(client_b, "to") >= self.per_target:
            return Refusal("per_target", f"client '{client_b}' already has {self.per_target} open sessions, the "
                                         f"relay's limit per target; try again later (maxSessionsPerTarget)")
        if len(sessions) >= self.max_sessions:
            return Refusal("total", f"the relay holds {self.max_sessions} sessions, its limit; try again later "
                                    f"(maxSessions)")
        if protocol == "tcp" and self.out_of_descriptors():
            return Refusal("descriptors", "the relay is out of file descriptors for new sessions (it keeps "
                                          f"{self.descriptor_reserve} for control connections); try again later, "
                                          "or raise its open-file limit (ulimit -n) or lower descriptorReserve")
        return None


def pending_problem(cap: int, cluster: bool) -> str:
    where = " (across the relay's cluster)" if cluster else ""
    return (f"this client already has {cap} sessions waiting to be joined{where}, the relay's limit per client; "
            f"wait for them to connect or time out (maxPendingSessionsPerClient)")
