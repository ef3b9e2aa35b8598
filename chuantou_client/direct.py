"""The direct path for UDP flows on both clients: hole punching (NAT discovery is in natprobe.py).

``Puncher`` runs one flow's attempt on the socket the flow already uses toward the relay: it
offers the flow's local address over the control channel, the relay adds what it saw and hands
each side the other's candidates with a punch key, and both sides send signed pings to every
candidate. A side trusts an address as its peer once a genuine punch packet came from it, and
sends its payload there once it has proof that the way back works too (a pong to one of its own
pings, or the peer's sealed payload arriving directly). Once direct, ``watch`` keeps the path
proved: a ping with a fresh nonce every keepalive, and a path whose pings went unanswered (and
that brought no authentic payload) for ``dead_after`` is declared dead (the flow then ends; live
flows do not move to the relay, the next one takes it). The peer's pings prove nothing about
liveness: a recorded one, replayed, would look the same. ``DirectPaths`` holds the client's
mode, deadline, keepalive, memory of pairs and NAT result.

TCP sessions try theirs by simultaneous open (directtcp.py); their attempts are kept here too.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from common import direct as d
from common import protocol as p
from common.errors import ChuantouError
from common.net import close_quietly

log = logging.getLogger("chuantou.client")

PING_EVERY = 0.02  # seconds between rounds of pings while an attempt runs
POLL = 0.01  # socket timeout of a flow while it punches (so it pings on time)
GRACE = 0.5  # the target keeps pinging this much past the deadline (the gateway's clock started first)
REPORT_EVERY = 5.0  # seconds between a direct flow's reports of its bytes to the relay (while they change)


class DirectPaths:
    """The client's side of the direct path: mode, deadline, memory, live attempts, NAT result."""

    def __init__(self, path: str = "auto", deadline: float = d.DEFAULT_DEADLINE,
                 keepalive: float = d.DIRECT_KEEPALIVE, first_retry: float = d.FIRST_RETRY):
        if path not in d.PATHS:
            raise ChuantouError(f"--path must be one of {', '.join(d.PATHS)}, not {path!r}")
        for what, value in (("deadline", deadline), ("keepalive", keepalive), ("retry interval", first_retry)):
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ChuantouError(f"the direct path {what} must be a number of seconds > 0, not {value!r}")
        self.path = path
        self.deadline = deadline
        self.keepalive = keepalive
        self.memory = d.PathMemory(first_retry=first_retry, max_retry=max(first_retry, d.MAX_RETRY))
        self.nat: dict = {"mapping": "not probed yet", "filtering": "not probed yet"}
        self.relay_knows = False  # the relay said where probes go: it speaks path_candidates too
        self._punchers: dict[str, Puncher] = {}
        self.unanswered_pongs = 0  # of ended flows: genuine pongs that answered no ping of theirs
        self._tcp: dict[str, Any] = {}  # session id -> directtcp.TcpAttempt
        self._lock = threading.Lock()

    def wants_to_try(self, peer: str) -> bool:
        """Should a new flow to ``peer`` try the direct path (the gateway's decision)?"""
        if self.path == "relay" or not self.relay_knows:
            return False
        return self.path == "direct" or self.memory.should_try(peer)

    def begin(self, puncher: Puncher) -> None:
        with self._lock:
            self._punchers[puncher.session_id] = puncher

    def end(self, puncher: Puncher) -> None:
        with self._lock:
            if self._punchers.get(puncher.session_id) is puncher:
                del self._punchers[puncher.session_id]
                self.unanswered_pongs += puncher.unanswered

    def begin_tcp(self, attempt: Any) -> None:
        with self._lock:
            self._tcp[attempt.session_id] = attempt

    def end_tcp(self, attempt: Any) -> None:
        session_id = attempt.session_id
        with self._lock:
            if self._tcp.get(session_id) is attempt:
                del self._tcp[session_id]

    def stop_tcp(self) -> None:
        """The client stops: every TCP attempt ends now (its threads return, its dials close)."""
        with self._lock:
            attempts = list(self._tcp.values())
        for attempt in attempts:
            attempt.stop()

    def deliver(self, msg: p.PeerCandidates) -> None:
        """The relay's answer to an offer (on the control reader thread: must not block)."""
        with self._lock:
            puncher = self._punchers.get(msg.sessionId) or self._tcp.get(msg.sessionId)
        if puncher is not None:
            puncher.peer_offered(msg)

    def deliver_sync(self, msg: p.PathSync) -> None:
        """A step of a TCP attempt's timing from the peer (on the control reader thread)."""
        with self._lock:
            attempt = self._tcp.get(msg.sessionId)
        if attempt is not None:
            attempt.synced(msg.step)

    def describe(self) -> dict:
        with self._lock:
            unanswered = self.unanswered_pongs + sum(p.unanswered for p in self._punchers.values())
        return {"path": self.path, "deadline": self.deadline, "nat": dict(self.nat), "pairs": self.memory.describe(),
                "unansweredPongs": unanswered}


class Puncher:
    """One UDP flow's attempt at a direct path, driven by the thread that owns ``sock``."""

    def __init__(self, sock: socket.socket, session_id: str, side: str, deadline: float,
                 keepalive: float = d.DIRECT_KEEPALIVE):
        self.sock = sock
        self.session_id = session_id
        self.side = side
        self.peer_side = "B" if side == "A" else "A"
        self.deadline = deadline
        self.v6 = sock.family == socket.AF_INET6
        self.answered = threading.Event()  # the relay handed us the peer's offer
        self.key: bytes | None = None  # set last by peer_offered: the owner thread reads it unlocked
        self.targets: list[tuple] = []
        self.confirmed: set[tuple] = set()  # addresses a genuine punch packet came from
        self.direct: tuple | None = None  # where this side sends payload, once the way back is proved
        self.gave_up = False  # decided on the relay: no more pings, no more pongs
        self.stop_pinging_at = float("inf")
        self._next_ping = 0.0
        self.pings = d.OutstandingPings()  # nonces of our recent pings, for their pongs to answer
        self.unanswered = 0  # genuine pongs that answered none of them (late duplicates, or replays)
        # while punching, one nonce per stretch of rounds, so that the outstanding ones cover the
        # whole attempt (a pong may come back a round trip later, after many rounds)
        self._nonce_every = (deadline + GRACE) / d.MAX_OUTSTANDING
        self._nonce: bytes | None = None
        self._next_nonce = 0.0
        self.direct_bytes = [0, 0]  # sent, received on the direct path (counted by the flow; see report())
        self._reported: tuple | None = None
        self._next_report = 0.0
        self.keepalive = keepalive
        # B gives A one keepalive more, so that A (which keeps the memory of paths) usually
        # notices a dead path first and sends its next flow straight to the relay
        self.dead_after = keepalive * (d.DEAD_AFTER + (1 if side == "B" else 0))
        # monotonic: when the path was last proved alive (the sending time of a ping of ours the
        # peer answered, or the arrival of its authentic payload)
        self.last_heard = 0.0
        self._next_keepalive = 0.0
        self._pinged_at = 0.0  # the last keepalive ping

    # --- the offer --------------------------------------------------------------------------


    @property
    def direct_counts(self) -> tuple[int, int] | None:
        """(sent, received) on the direct path, or None while the flow is relayed."""
        return None if self.direct is None else (self.direct_bytes[0], self.direct_bytes[1])
    def offer(self, control, relay: tuple, path: str) -> None:
        """Tell the relay where this flow's socket may be reached on its own network."""
        local = local_candidate(self.sock, relay)
        self.stop_pinging_at = time.monotonic() + self.deadline + (GRACE if self.side == "B" else 0.0)
        try:
            control.send(p.PathCandidates(sessionId=self.session_id, candidates=[local] if local else [],
                                          path="relay" if path == "relay" else "auto"))
        except ChuantouError as exc:  # the control channel is down: this flow takes the relay
            log.debug("UDP session %s...: no direct path offered: %s", self.session_id[:8], exc)
            self.answered.set()

    def peer_offered(self, msg: p.PeerCandidates) -> None:
        targets = []
        for text in msg.candidates:
            try:
                targets.append(d.for_socket(self.v6, *d.parse_candidate(text)))
            except d.DirectFrameError:
                continue
        self.targets = targets
        log.debug("UDP session %s... (%s): the peer's candidates are %s", self.session_id[:8], self.side,
                  ", ".join(msg.candidates) or "none (it takes the relay)")
        if targets and msg.punchKey:
            self.stop_pinging_at = time.monotonic() + self.deadline + (GRACE if self.side == "B" else 0.0)
            self.key = bytes.fromhex(msg.punchKey)
        self.answered.set()

    @property
    def refused(self) -> bool:
        """The relay answered with no candidates: the peer (or its mode) wants the relay."""
        return self.answered.is_set() and self.key is None

    @property
    def pinging(self) -> bool:
        return self.key is not None and self.direct is None and not self.gave_up

    @property
    def busy(self) -> bool:
        """Pinging, or about to be: the owner must poll its socket quickly (the relay's answer
        arrives on another thread, and the peer's first pings die at our NAT until we ping)."""
        if self.pinging:
            return True
        return not self.answered.is_set() and not self.gave_up and time.monotonic() < self.stop_pinging_at

    # --- on the owner's thread --------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Send a round of pings when one is due (and give up once the time is over)."""
        key = self.key
        if key is None or not self.pinging or now < self._next_ping:
            return
        if now >= self.stop_pinging_at:
            self.gave_up = True
            return
        self._next_ping = now + PING_EVERY
        if self._nonce is None or now >= self._next_nonce:
            self._nonce, self._next_nonce = self.pings.fresh(now), now + self._nonce_every
        ping = d.pack_punch(key, d.PING, self.side, self.session_id, self._nonce)
        for target in [*self.targets, *self.confirmed]:
            try:
                self.sock.sendto(ping, target)
            except OSError:  # an unreachable candidate (a private address elsewhere): the others may work
                pass

    def handle(self, data: bytes, src: tuple) -> bool:
        """True when ``data`` was a punch packet (answered here, never payload). A ping gets its
        pong, and proves nothing else (it may be a replay); only a pong that answers one of our
        outstanding pings chooses the direct path or keeps it alive."""
        key = self.key
        if key is None:
            return False
        unpacked = d.unpack_punch(data, key, self.session_id, self.peer_side)
        if unpacked is None:
            return False
        kind, nonce = unpacked
        if self.gave_up and self.direct is None:
            return True  # this flow uses the relay now; live flows do not move
        if src not in self.confirmed:
            log.debug("UDP session %s... (%s): a genuine %s from %s:%s", self.session_id[:8], self.side,
                      "ping" if kind == d.PING else "pong", *src)
        self.confirmed.add(src)
        if kind == d.PING:
            try:
                self.sock.sendto(d.pack_punch(key, d.PONG, self.side, self.session_id, nonce), src)
            except OSError:
                pass
            return True
        if self.direct is not None and src != self.direct:
            return True  # a late pong at another of the peer's candidates: the path is chosen
        sent_at = self.pings.answer(nonce)
        if sent_at is None:
            self.unanswered += 1  # answers no ping of ours (any more): a late duplicate, or a replay
            return True
        if self.direct is None:
            self.direct = src  # our ping reached them and their pong reached us: both ways work
        self.last_heard = max(self.last_heard, sent_at)  # alive when that ping left, no later
        return True

    def is_peer(self, src: tuple) -> bool:
        return src in self.confirmed

    def peer_payload(self, src: tuple) -> None:
        """Authentic payload came straight from the peer: it has our pong, so the way to it works
        (and, on a direct path, the path is alive). Authentic means opened by the sealed UDP
        layer, whose replay window drops a datagram seen before (udpseal.ReplayWindow); an
        unsealed flow (allowed only when configured so) has no such proof."""
        if self.direct is None and not self.gave_up:
            self.direct = src
        if src == self.direct:
            self.last_heard = time.monotonic()

    def watch(self, now: float) -> float | None:
        """On a direct path, called often by the owner: a ping with a fresh nonce every keepalive
        (every half of one while the last went unanswered), which also keeps both NATs' mappings. Returns the
        seconds of silence once they reach ``dead_after`` (the path is dead), else None."""
        if self.direct is None or self.key is None:
            return None
        silent = now - self.last_heard
        if silent >= self.dead_after:
            return silent
        if now >= self._next_keepalive:
            answered = self.last_heard >= self._pinged_at  # the last keepalive came back (or payload did)
            self._next_keepalive = now + (self.keepalive if answered else self.keepalive / 2)
            self._pinged_at = now
            ping = d.pack_punch(self.key, d.PING, self.side, self.session_id, self.pings.fresh(now))
            try:
                self.sock.sendto(ping, self.direct)
            except OSError:
                pass
        return None

    def poll_interval(self, resting: float) -> float:
        """The owner's socket timeout once the attempt is over: short enough to watch on time."""
        return min(resting, self.keepalive / 2) if self.direct is not None else resting

    def dead_reason(self, peer: str, silent: float) -> str:
        where = d.format_candidate(*self.direct) if self.direct is not None else "the peer"
        return (f"the direct path to {peer} went silent: nothing from {where} for "
                f"{silent:.1f} s (keepalive every {self.keepalive:g} s); live flows do not move to the relay, "
                f"the next one takes it")

    @property
    def path(self) -> str:
        return "direct" if self.direct is not None else "relay"

    def report(self, control, now: float, final: bool = False) -> None:
        """Tell the relay what went direct, which it cannot see (it shows it as reported by
        clients): once the path is direct, then every REPORT_EVERY seconds while the counts
        change, and at the end (``final``)."""
        if self.direct is None or (now < self._next_report and not final):
            return
        counts = (self.direct_bytes[0], self.direct_bytes[1])
        if counts == self._reported:
            return
        self._next_report = now + REPORT_EVERY
        try:
            control.send(p.PathReport(sessionId=self.session_id, path="direct", directBytesSent=counts[0],
                                      directBytesReceived=counts[1]))
        except ChuantouError:  # the control channel is down: the relay's page misses these bytes
            return
        self._reported = counts


def local_candidate(sock: socket.socket, relay: tuple) -> str | None:
    """This socket's address on its own network: the interface address that routes to the
    relay, with the socket's port (for two clients behind one NAT)."""
    port = sock.getsockname()[1]
    if port == 0:  # not bound yet: it has sent nothing, so it has no address to offer
        return None
    probe = socket.socket(sock.family, socket.SOCK_DGRAM)
    try:
        probe.connect(relay)  # no packet is sent: it only picks the route
        ip = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        close_quietly(probe)
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    try:
        return d.format_candidate(ip, port)
    except ValueError:
        return None
