"""The UDP relay: one socket on the relay's port number, one thread, keyed by (ip, port).

An address becomes part of a session by proving its side's secret over a challenge the relay
handed to that very address (see ``common.frames``); from then on every datagram from it goes
to the other side's registered address. A side moves to a new address (NAT rebinding) only
with a fresh proof from that address, so a registration copied off the wire is worth nothing
elsewhere. Datagrams that arrive before the other side registers wait in a queue bounded in
bytes per session and overall. Registration-shaped datagrams are rate-limited per source, and
nothing the relay sends a stranger is bigger than what the stranger sent.
"""

from __future__ import annotations

import collections
import logging
import secrets
import socket
import threading
import time

from common.frames import (
    UDP_REGISTER_SIZE, UDP_WHO_ARE_YOU, FrameError, JoinStatus, address_challenge, is_udp_register, pack_udp_ack,
    pack_udp_challenge, udp_proof_matches, unpack_udp_register,
)
from common.direct import is_filter_probe, is_probe, pack_probe_answer
from common.limits import LimitLog, TokenBucket, source_key
from common.net import TIMED_OUT, kernel_timeout

log = logging.getLogger("chuantou.server")

MAX_DATAGRAM = 65535
EARLY_QUEUE_BYTES = 256 * 1024  # per session, held until the other side registers
EARLY_QUEUE_TOTAL_BYTES = 64 * 1024 * 1024  # all sessions together
REGISTRATIONS_PER_SECOND = 1000.0  # per source (IPv4 address or IPv6 /64); a gateway opens one per flow
CHALLENGE_WINDOW = 30.0  # seconds a challenge stays valid (this window and the one before)
MAX_BUCKETS = 4096  # sources tracked at once by the rate limit
MAX_SOURCE_KEYS = 65536  # addresses whose source key is remembered (parsing one costs ~10 us)
# Why a datagram was dropped (UdpRelay.drops, and the metrics' reason label):
RATE_LIMITED = "rate_limited"  # over udpRegistrationsPerSecond from its source
UNKNOWN_SENDER = "unknown_sender"  # from an address in no session, and not a registration
MALFORMED = "malformed"  # registration-shaped but not a valid one
EARLY_QUEUE_FULL = "early_queue_full"  # the other side had not registered and the queue was full
SEND_FAILED = "send_failed"  # sendto() failed
BANDWIDTH_LIMITED = "bandwidth_limited"  # over bandwidthPerClient or bandwidthTotal
DROP_REASONS = (RATE_LIMITED, UNKNOWN_SENDER, MALFORMED, EARLY_QUEUE_FULL, SEND_FAILED, BANDWIDTH_LIMITED)


class UdpRelay:
    def __init__(self, sock: socket.socket, sessions, stopping: threading.Event, *,
                 early_queue_bytes: int = EARLY_QUEUE_BYTES,
                 early_queue_total_bytes: int = EARLY_QUEUE_TOTAL_BYTES,
                 registrations_per_second: float = REGISTRATIONS_PER_SECOND,
                 limit_log: LimitLog | None = None, bandwidth=None):
        self.sock = sock
        self.sessions = sessions
        self.stopping = stopping
        self.early_queue_bytes = early_queue_bytes
        self.early_queue_total_bytes = early_queue_total_bytes
        self.registrations_per_second = registrations_per_second
        self.limits = limit_log or LimitLog(log)
        self.bandwidth = bandwidth  # BandwidthLimits, or None: no limit
        self.probe_sock: socket.socket | None = None  # the --probe-port socket (owned by the Server), if any
        self._key = secrets.token_bytes(32)  # challenges are HMACs under it: no state per stranger
        self._lock = threading.Lock()
        self._addrs: dict[tuple, tuple] = {}  # addr -> (session, side index 0=A 1=B)
        self._early: dict[str, list] = {}  # session id -> [(side index, datagram)]
        self._early_bytes: dict[str, int] = {}  # session id -> bytes queued
        self.early_total = 0
        self._buckets: dict[tuple, TokenBucket] = {}  # (kind, source key) -> bucket
        self._source_keys: dict[str, str] = {}  # ip -> source_key(ip), so a flood is cheap to drop
        # reason -> datagrams, written by run() only; every key present from the start, so a
        # scrape reading it from another thread never sees the dict change size
        self.drops: collections.Counter[str] = collections.Counter(dict.fromkeys(DROP_REASONS, 0))
        self.relayed_bytes = 0  # payload forwarded between sides (the direct path's tests read it)

    def run(self) -> None:
        kernel_timeout(self.sock, 0.25)  # lets the loop notice stop(), without a poll() per datagram
        recvfrom_into = self.sock.recvfrom_into
        sendto = self.sock.sendto
        addrs = self._addrs
        bandwidth = self.bandwidth if self.bandwidth is not None and self.bandwidth.active else None
        # one buffer for every datagram: no 64 KiB allocation per datagram, and a session's
        # payload goes out as a slice of it, uncopied (only what is kept is copied: early queue)
        buffer = bytearray(MAX_DATAGRAM)
        view = memoryview(buffer)
        while not self.stopping.is_set():
            try:
                size, addr = recvfrom_into(buffer)
            except TIMED_OUT:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                continue
            if addr is None:  # the socket was shut down: the loop's check notices the stop
                continue
            key = addr[:2]
            entry = addrs.get(key)
            if entry is None or (size == UDP_REGISTER_SIZE and is_udp_register(bytes(view[:size]))):
                self._from_stranger_or_registration(bytes(view[:size]), key)
                continue
            session, side = entry
            if bandwidth is not None and not bandwidth.udp_allowed(session, side, size):
                self.drops[BANDWIDTH_LIMITED] += 1
                continue
            session.last_active = time.monotonic()
            session.udp_bytes[side] += size
            peer = session.udp_b if side == 0 else session.udp_a
            if peer is None:
                self._hold_early(session, side, bytes(view[:size]), key)
                continue
            try:
                sendto(view[:size], peer)
                self.relayed_bytes += size
            except OSError:
                self.drops[SEND_FAILED] += 1

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    # --- registrations ----------------------------------------------------------------------

    def _from_stranger_or_registration(self, data: bytes, addr: tuple) -> None:
        if is_probe(data):
            self.answer_probe(data, addr)
            return
        if is_filter_probe(data):  # the NAT filtering test: answered from the other port, or not at all
            if self.probe_sock is not None:
                self.answer_probe(data, addr, self.probe_sock)
            return
        registration = is_udp_register(data)
        source = self._source(addr[0])
        if not self._allowed("register" if registration else "notice", source):
            self.drops[RATE_LIMITED] += 1
            if registration:
                self.limits.bit("udpRegistrationsPerSecond", source,
                                "UDP registrations from %s exceed udpRegistrationsPerSecond (%g); dropping them",
                                source, self.registrations_per_second)
            return
        if not registration:
            self.drops[UNKNOWN_SENDER] += 1
            if len(data) >= len(UDP_WHO_ARE_YOU):  # never more than the stranger sent
                self._send(UDP_WHO_ARE_YOU, addr)
            return
        try:
            register = unpack_udp_register(data)
        except FrameError:
            self.drops[MALFORMED] += 1
            return
        session = self.sessions.get(register.session_id)
        if session is None or session.closed:
            self._send(pack_udp_ack(register.session_id, JoinStatus.UNKNOWN_SESSION), addr)
            return
        if not self._challenge_is_current(register, addr):
            fresh = self._challenge(addr, register.session_id, register.side, self._epoch())
            self._send(pack_udp_challenge(register.session_id, fresh), addr)
            return
        status = self._check_proof(session, register)
        if status == JoinStatus.JOINED:
            self._bind(session, 0 if register.side == "A" else 1, addr)
        self._send(pack_udp_ack(register.session_id, status), addr)
        if status == JoinStatus.JOINED:
            self._flush_early(session)

    def answer_probe(self, data: bytes, addr: tuple, sock: socket.socket | None = None) -> None:
        """A NAT probe (common.direct): tell the sender the address we saw, rate-limited per
        source like registrations; the answer is smaller than the probe, and goes to the probe's
        own source only (``sock``: from the probe port, for the filtering test; sending on a UDP
        socket another thread reads is safe)."""
        if not self._allowed("probe", self._source(addr[0])):
            self.drops[RATE_LIMITED] += 1
            return
        try:
            (sock or self.sock).sendto(pack_probe_answer(data, addr), addr)
        except OSError:
            self.drops[SEND_FAILED] += 1

    def _check_proof(self, session, register) -> JoinStatus:
        if not udp_proof_matches(session.secret_for(register.side), register):
            return JoinStatus.BAD_SECRET
        if session.protocol != "udp":
            return JoinStatus.WRONG_PROTOCOL
        return JoinStatus.JOINED

    def _bind(self, session, side: int, addr: tuple) -> None:
        with self._lock:
            old = session.udp_a if side == 0 else session.udp_b
            if old == addr:
                if None not in session.candidates:
                    # a keepalive of a flow that may be going direct: the relay sees none of its
                    # payload, so this is what keeps the session from expiring as idle here
                    session.last_active = time.monotonic()
                return  # a repeated registration (lost ack, or a check after a notice)
            if old is not None:
                self._addrs.pop(old, None)  # the side moved (NAT rebinding) and proved it: follow it
                log.debug("UDP session %s: side %s moved to %s:%s", session.id[:8], "AB"[side], *addr)
            if side == 0:
                session.udp_a = addr
            else:
                session.udp_b = addr
            self._addrs[addr] = (session, side)
            session.last_active = time.monotonic()

    def _epoch(self) -> int:
        return int(time.time() // CHALLENGE_WINDOW)

    def _challenge(self, addr: tuple, session_id: str, side: str, epoch: int) -> bytes:
        return address_challenge(self._key, addr, session_id, side, epoch)

    def _challenge_is_current(self, register, addr: tuple) -> bool:
        epoch = self._epoch()
        return any(register.challenge == self._challenge(addr, register.session_id, register.side, e)
                   for e in (epoch, epoch - 1))

    def _source(self, ip: str) -> str:
        key = self._source_keys.get(ip)
        if key is None:
            if len(self._source_keys) >= MAX_SOURCE_KEYS:
                self._source_keys.clear()
            key = self._source_keys[ip] = source_key(ip)
        return key

    def _allowed(self, kind: str, source: str) -> bool:
        key = (kind, source)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune_buckets()
            rate = self.registrations_per_second
            bucket = self._buckets[key] = TokenBucket(rate, max(1.0, rate))
        return bucket.take()

    def _prune_buckets(self) -> None:
        """Forget buckets that have refilled (they would start full anyway)."""
        now = time.monotonic()
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.stamp < b.burst / max(b.rate, 1e-9)}
        if len(self._buckets) >= MAX_BUCKETS:
            self._buckets.clear()

    # --- the early queue --------------------------------------------------------------------

    def _hold_early(self, session, side: int, data: bytes, addr: tuple) -> None:
        size = len(data)
        with self._lock:
            held = self._early_bytes.get(session.id, 0)
            if held + size > self.early_queue_bytes:
                limit, value = "udpEarlyQueueBytes", self.early_queue_bytes
            elif self.early_total + size > self.early_queue_total_bytes:
                limit, value = "udpEarlyQueueTotalBytes", self.early_queue_total_bytes
            else:
                self._early.setdefault(session.id, []).append((side, data))
                self._early_bytes[session.id] = held + size
                self.early_total += size
                return
        self.drops[EARLY_QUEUE_FULL] += 1
        source = self._source(addr[0])
        self.limits.bit(limit, source,
                        "UDP datagrams from %s dropped before the other side joined: %s (%d bytes) is full",
                        source, limit, value)

    def _take_early(self, session_id: str) -> list:
        with self._lock:
            self.early_total -= self._early_bytes.pop(session_id, 0)
            return self._early.pop(session_id, [])

    def _flush_early(self, session) -> None:
        """Both sides have proved their secret from their addresses: deliver what waited."""
        if not session.joined:
            return
        for from_side, datagram in self._take_early(session.id):
            self._send(datagram, session.udp_b if from_side == 0 else session.udp_a)
            self.relayed_bytes += len(datagram)

    def _send(self, data: bytes, addr) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.drops[SEND_FAILED] += 1

    def forget(self, session) -> None:
        with self._lock:
            for addr in (session.udp_a, session.udp_b):
                if addr is not None and self._addrs.get(addr, (None,))[0] is session:
                    del self._addrs[addr]
        self._take_early(session.id)


class ProbeResponder:
    """The --probe-port socket: it answers NAT probes and nothing else, so that a client can tell
    whether its NAT maps one socket to the same port toward two relay ports. Its own thread,
    with its own per-source rate limit (the relay's buckets belong to the relay's thread)."""

    def __init__(self, sock: socket.socket, stopping: threading.Event, per_second: float = REGISTRATIONS_PER_SECOND):
        self.sock = sock
        self.stopping = stopping
        self.per_second = per_second
        self._buckets: dict[str, TokenBucket] = {}
        self.answered = 0

    def run(self) -> None:
        kernel_timeout(self.sock, 0.25)  # lets the loop notice stop()
        while not self.stopping.is_set():
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except TIMED_OUT:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                continue
            if addr is None:  # the socket was shut down
                continue
            if not is_probe(data) or not self._allowed(source_key(addr[0])):
                continue
            try:
                self.sock.sendto(pack_probe_answer(data, addr[:2]), addr)
                self.answered += 1
            except OSError:
                pass

    def _allowed(self, source: str) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.clear()  # they would start full anyway
            bucket = self._buckets[source] = TokenBucket(self.per_second, max(1.0, self.per_second))
        return bucket.take()
