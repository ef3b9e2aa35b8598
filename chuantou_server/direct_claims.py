"""What clients report about their direct paths (``path_report``): claims the relay cannot check.

A session that goes direct moves no payload through the relay, so only its clients know how
much it carried. Each side reports the path it took and the bytes it sent and received on the
direct path so far; the relay keeps one claim per side of each session and shows the figures
labelled "reported by clients". A lying client can therefore only skew figures about its own
sessions, and never without bounds:

- a claim names a session the relay holds with this client as one of its sides;
- counts are cumulative: a report never lowers what an earlier one said (so counters built on
  them never go backwards);
- a count is capped at what the session could have carried at MAX_CLAIM_RATE since it began
  (plus CLAIM_SLACK), and at protocol.MAX_REPORTED_BYTES, so one report cannot make a total
  jump to petabytes.

A TCP session takes one path for its whole life, and the relay sees which: a direct one's relay
channels end cleanly before carrying a byte (both sides close them once the direct connection is
sealed, chuantou_client/directchoice.py). The relay then *holds* the session (``held_direct``)
instead of ending it, so that its clients' reports find it, until a side says it ended
(``session_closed``) or goes offline; one that no side reports direct within UNREPORTED_HOLD
seconds (an older client's) is let go. A claim about a TCP session the relay carried bytes of is
ignored: its relay counts are the truth; and a TCP session's claims count only once it is held
(or ended by a side that reported it direct while the relay carried nothing of it), so that no
figure shown while it might still turn out relayed has to go back down.

A direction's direct bytes are the larger of its sender's "sent" and its receiver's "received":
the side that ends a session first reports both directions in full, and the other side's last
report, which may arrive after the session is gone, is not needed.
"""

from __future__ import annotations

import time

from common import protocol as p

MAX_CLAIM_RATE = 2 * 1024 ** 3  # bytes/s per direction and session: beyond any real direct flow
CLAIM_SLACK = 64 * 1024 ** 2  # bytes a claim may hold in a session's first moments
PATHS = ("direct", "relay")
UNREPORTED_HOLD = 10.0  # seconds a held direct session waits for a side's report (an older client sends none)


def record(session, side: int, report: p.PathReport, now: float | None = None) -> None:
    """Keep ``report`` as side ``side``'s (0: A, 1: B) claim about ``session``, bounded."""
    if session.protocol == "tcp" and relayed_any(session):
        return  # the relay carried it: not a direct session, whatever a side says
    age = max(0.0, (time.monotonic() if now is None else now) - session.created_mono)
    cap = min(p.MAX_REPORTED_BYTES, CLAIM_SLACK + int(MAX_CLAIM_RATE * age))
    claim = session.claims[side]
    # one writer per side (its client's control thread); readers see each count grow, never shrink
    claim[0] = max(claim[0], min(cap, report.directBytesSent))
    claim[1] = max(claim[1], min(cap, report.directBytesReceived))
    if report.path in PATHS:
        session.claimed_path[side] = report.path


def direct_bytes(session) -> tuple[int, int]:
    """(A->B, B->A) bytes that went direct, as the two sides' claims say."""
    (a_sent, a_received), (b_sent, b_received) = _counted(session)
    return max(a_sent, b_received), max(b_sent, a_received)


def claimed_by(session, client_id: str) -> tuple[int, int]:
    """(sent, received) directly that ``client_id`` claims in ``session`` (its own side's claim)."""
    claims = _counted(session)
    if client_id == session.client_a:
        return claims[0][0], claims[0][1]
    if client_id == session.client_b:
        return claims[1][0], claims[1][1]
    return 0, 0


def _counted(session) -> list:
    """The claims that count: a TCP session's only once the relay holds it as direct (before, it
    may still turn out relayed, and a figure shown then would have to go back down)."""
    if session.protocol == "tcp" and not session.direct_held:
        return [[0, 0], [0, 0]]
    return session.claims


def path(session) -> str:
    """"direct" when a side reported it goes direct, else "relay" (the default: it is what the
    relay sees; a client that says nothing is relayed or still choosing)."""
    if session.protocol == "tcp":
        return "direct" if is_direct(session) else "relay"
    return "direct" if "direct" in session.claimed_path else "relay"


def reported_by(session) -> list[str]:
    """Which sides reported a path, as "A"/"B"."""
    return [side for side, claimed in zip("AB", session.claimed_path) if claimed is not None]


def relayed_any(session) -> bool:
    return bool(session.bytes_a_to_b or session.bytes_b_to_a)


def held_direct(session, pipe) -> bool:
    """Did this TCP session's relay pipe just end as a direct session's does: cleanly, having
    carried nothing, after both sides offered a direct path? (Else it ended relayed.)"""
    offers = session.candidates
    return (session.protocol == "tcp" and pipe.ended_cleanly and not relayed_any(session)
            and None not in offers and all(path != "relay" for _, path in offers))


def is_direct(session) -> bool:
    """A TCP session that went direct: held, or reported direct by a side while the relay has
    carried nothing of it (its relay pipe not seen to end yet)."""
    return session.protocol == "tcp" and (session.direct_held or
                                          ("direct" in session.claimed_path and not relayed_any(session)))
