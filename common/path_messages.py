"""Direct-path messages: how the two sides of a session try to reach each other without the relay.

Candidates go out and come back (``path_candidates`` / ``peer_candidates``, common.direct), a TCP
attempt is timed over ``path_sync``, and each side reports the path it took (``path_report``).
No I/O; part of the vocabulary ``common.protocol`` gathers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .wire import Message, require


@dataclass(frozen=True)
class PathCandidates(Message, wire="path_candidates", sent_by="client"):
    """A side of a UDP or TCP session offers where it may be reached directly (common.direct); the
    relay adds the address it saw, and once both sides have spoken sends each ``PeerCandidates``."""

    sessionId: str
    candidates: list[str]
    path: str = "auto"  # "relay": this side will not try (the relay tells the other at once)

    def check(self) -> None:
        _check_candidates(self.candidates)
        require(self.path in ("auto", "relay", "direct"), "path must be auto, relay or direct")


@dataclass(frozen=True)
class PeerCandidates(Message, wire="peer_candidates", sent_by="relay"):
    """The other side's candidates and the key both sign punch packets with; no candidates:
    use the relay."""

    sessionId: str
    candidates: list[str]
    punchKey: str | None = None  # hex, 16 bytes

    def check(self) -> None:
        _check_candidates(self.candidates)
        if self.punchKey is not None:
            require(bool(re.fullmatch(r"[0-9a-f]{32}", self.punchKey)), "punchKey must be 32 hex digits")


MAX_REPORTED_BYTES = 2 ** 53 - 1  # the largest count a JSON number carries exactly (to a browser too)


@dataclass(frozen=True)
class PathReport(Message, wire="path_report", sent_by="client"):
    """A side's claim about a session of its own: the path it takes and the bytes it has sent and
    received on the direct path so far (cumulative; sent while the session runs and at its end).
    The relay cannot check it: it keeps it bounded, per side, shown as reported by clients."""

    sessionId: str
    path: str  # "direct" or "relay"
    directBytesSent: int = 0
    directBytesReceived: int = 0

    def check(self) -> None:
        require(len(self.sessionId) <= 64, "sessionId is too long")
        require(self.path in ("direct", "relay"), "path must be direct or relay")
        for name in ("directBytesSent", "directBytesReceived"):
            require(0 <= getattr(self, name) <= MAX_REPORTED_BYTES, f"{name} must be 0 to 2**53-1")


@dataclass(frozen=True)
class PathSync(Message, wire="path_sync"):
    """A TCP session's direct attempt, timed as libp2p's DCUtR does (chuantou_client.directtcp):
    A sends ``ping``, B answers ``pong`` (A now knows the round trip through the relay), A sends
    ``sync`` and dials after half that round trip, B dials as ``sync`` arrives. The relay passes
    it, unchanged, to the session's other side only."""

    sessionId: str
    step: str  # "ping", "pong" or "sync"

    def check(self) -> None:
        require(len(self.sessionId) <= 64, "sessionId is too long")
        require(self.step in PATH_SYNC_STEPS, f"step must be one of {', '.join(PATH_SYNC_STEPS)}")


PATH_SYNC_STEPS = ("ping", "pong", "sync")


MAX_CANDIDATES = 8
CANDIDATE_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]{2,45}\]|[0-9.]{7,15}):[0-9]{1,5}$")


def _check_candidates(candidates: list[str]) -> None:
    require(len(candidates) <= MAX_CANDIDATES, f"at most {MAX_CANDIDATES} candidates")
    for candidate in candidates:
        require(bool(CANDIDATE_PATTERN.match(candidate)), "a candidate must be ip:port or [ipv6]:port")
