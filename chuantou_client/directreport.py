"""A direct TCP session's life after its path was chosen (directchoice.py): what it tells the
relay, and what its end teaches the memory of paths.

The relay cannot see a direct session's bytes, so each side reports them (``path_report``, as
UDP flows do, direct.py): once when the session goes direct, every REPORT_EVERY seconds while
its counts change (from the heartbeat loop: the pump's threads only copy), and at its end,
followed by ``session_closed`` (the relay holds a direct session until told it ended; see
chuantou_server/direct_claims.py).

A direct connection whose path went silent is noticed by the kernel: the socket has keepalive
probes and TCP_USER_TIMEOUT of ``liveness`` seconds (directtcp.prepare), which end it with
ETIMEDOUT, and the pump passes that on as a reset to the user, never as a finished stream. When
that ends one of A's sessions, the pair is marked failed: new connections take the relay, and
the pair is tried again after the memory's backoff.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from common import direct as d
from common import protocol as p
from common.errors import ChuantouError

log = logging.getLogger("chuantou.client")

REPORT_EVERY = 5.0  # seconds between a direct session's reports while its counts change (as UDP's)
# what ends a TCP connection whose path went silent (keepalive or TCP_USER_TIMEOUT, or an ICMP
# error the kernel turned into one): the path died, not the user or the service
PATH_ERRORS = (errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN)


def liveness(keepalive: float) -> float:
    """Seconds of silence after which a direct TCP connection is declared dead (as a UDP flow's)."""
    return keepalive * d.DEAD_AFTER


class TcpReports:
    """The reports of one client's direct TCP sessions (thread-safe: session threads and the
    heartbeat loop call in)."""

    def __init__(self, client, every: float = REPORT_EVERY):
        self.client = client
        self.every = every
        self._lock = threading.Lock()
        self._reported: dict[str, tuple[tuple[int, int], float]] = {}  # session id -> (counts, when)

    def went_direct(self, record) -> None:
        """The session runs on its own connection from now on: say so at once (the relay page
        shows its path before it has moved a byte)."""
        with self._lock:
            self._reported[record.id] = ((0, 0), time.monotonic())
        self._send(record.id, (0, 0))

    def tick(self) -> None:
        """Report every direct session whose counts changed since its last report, when due."""
        now = time.monotonic()
        for record in self.client.sessions.records():
            counts = _direct_counts(record)
            if counts is None:
                continue
            with self._lock:
                last = self._reported.get(record.id)
                if last is None or last[0] == counts or now - last[1] < self.every:
                    continue
                self._reported[record.id] = (counts, now)
            self._send(record.id, counts)

    def ended(self, record, pipe) -> None:
        """The session's pump returned: the final report, then its end; on A, a dead path is
        remembered as a failure of the pair."""
        with self._lock:
            self._reported.pop(record.id, None)
        counts = _direct_counts(record)
        if counts is None:
            return
        self._send(record.id, counts)
        reason = p.NORMAL_END
        error = getattr(pipe, "error", None)
        if not pipe.ended_cleanly and path_died(error):
            reason = f"the direct path to {record.peer} went silent ({error})"
            if record.side == "A":  # A decides paths: its next connections to the peer take the relay
                self.client.direct.memory.failed(record.peer)
            log.warning("TCP session %s...: %s%s", record.id[:8], reason,
                        "; new connections take the relay until it is tried again" if record.side == "A" else "")
        self.client.end_session(record.id, reason)

    def _send(self, session_id: str, counts: tuple[int, int]) -> None:
        try:
            self.client.control.send(p.PathReport(sessionId=session_id, path="direct",
                                                  directBytesSent=counts[0], directBytesReceived=counts[1]))
        except ChuantouError:  # the control channel is down: the relay's page misses these bytes
            pass


def path_died(error: BaseException | None) -> bool:
    return isinstance(error, OSError) and error.errno in PATH_ERRORS


def _direct_counts(record) -> tuple[int, int] | None:
    """(sent, received) on a direct TCP session's own connection, or None for any other."""
    if record.protocol != "tcp" or record.path != "direct":
        return None
    counts = record.byte_counts  # (received, sent) by this client: all of it went direct
    return None if counts is None else (counts[1], counts[0])
