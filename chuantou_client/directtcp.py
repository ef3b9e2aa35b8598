"""The direct path for TCP sessions: TCP simultaneous open from the port each side's data
channel uses toward the relay, timed through the relay as libp2p's DCUtR does, and sealed
exactly like a relayed session.

Both sides first join the relay's data channel from a reusable port (SO_REUSEADDR +
SO_REUSEPORT, datachannel.connect_reusable). That channel is the fallback and the probe at
once: the relay adds the address it sees it come from (what the side's NAT maps that port to)
to the side's offer (path_candidates). Once both have offered (peer_candidates)::

    A --path_sync ping--> relay --> B --path_sync pong--> relay --> A    (A: the round trip)
    A --path_sync sync--> relay --> B, which dials at once; A dials after half the round trip

Each side dials every candidate of the other from that same port until its deadline, dialing
again whenever a SYN was refused; a SYN that meets the other side's SYN (or its socket still
waiting) makes one connection of both. Over it A and B run the sealed handshake as over the
relay (sealing.py: A the TLS client, the proven keys held to the pins), and each side must
also prove the very key the relay named for it (sealing.hinted_key): whoever answers at a
candidate's address, or connects to B's port, cannot get its own key pinned as the peer's.

B also listens on that port while it dials: a SYN that finds no socket of B's dialing its
sender (on a path without NAT, such as loopback, every SYN arrives before the other side's
socket exists) is accepted rather than refused. Who decides, and how: directchoice.py.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from typing import Any

from common import direct as d
from common import protocol as p
from common.threads import Task
from common.errors import ChuantouError
from common.net import arm_reset, close_quietly, keep_alive, reset_connection, shutdown_quietly, tune_tcp

from .datachannel import reusable_socket
from .directreport import liveness
from .sealing import SealError, hinted_key

log = logging.getLogger("chuantou.client")

HANDSHAKE_TIME = 1.0  # the sealed handshake over a fresh direct connection gets at most this long
HANDSHAKE_MIN = 0.3  # and A's at least this, even when its connection came just before the deadline
GRACE = 0.5  # B dials this much longer than the deadline (A's clock started first)
RETRY_GAP = 0.02  # seconds between two dials of one candidate when the first was refused
MAX_ARRIVALS = 4  # B: direct connections queued for their handshake (A makes one; others are strangers')


class NoDirectPath(ChuantouError):
    pass


class TcpAttempt:
    """One TCP session's attempt at a direct connection, on side A or B. ``relay`` is the
    session's joined data channel: the direct connection is dialed from its local port."""

    def __init__(self, client, session_id: str, side: str, relay, deadline: float):
        self.client = client
        self.session_id = session_id
        self.side = side
        self.deadline = deadline
        local = relay.getsockname()
        self.family = socket.AF_INET6 if len(local) == 4 else socket.AF_INET
        self.bind_to = ("::" if self.family == socket.AF_INET6 else "0.0.0.0", local[1])
        self.local = local[:2]
        self.answered = threading.Event()  # the relay handed us the peer's candidates
        self.steps = {step: threading.Event() for step in p.PATH_SYNC_STEPS}
        self.stopped = threading.Event()
        self.targets: list[tuple] = []
        self.heard = False  # the relay answered our offer (else the peer never offered: an older one?)
        self.result = None  # B: the sealed direct stream, once its thread made one
        self._lock = threading.Lock()
        self._dialing: set[socket.socket] = set()  # dialing or listening: stop() wakes them
        self.abandoned = False  # B: A's choice is known, a stream made from now on is dropped
        self._arrivals: queue.Queue = queue.Queue(MAX_ARRIVALS + 1)  # B: direct connections (None: stop)
        self._thread: Task | None = None

    @property
    def tried(self) -> bool:
        """The peer offered candidates: a real attempt (not one side choosing the relay)."""
        return bool(self.targets)

    # --- messages (on the control reader thread: nothing here blocks) -------------------------

    def peer_offered(self, msg: p.PeerCandidates) -> None:
        targets = []
        for text in msg.candidates:
            try:
                targets.append(d.for_socket(self.family == socket.AF_INET6, *d.parse_candidate(text)))
            except d.DirectFrameError:
                continue
        self.targets = targets
        self.heard = True
        log.debug("TCP session %s... (%s): the peer's candidates are %s", self.session_id[:8], self.side,
                  ", ".join(msg.candidates) or "none (it takes the relay)")
        self.answered.set()

    def synced(self, step: str) -> None:
        self.steps[step].set()

    def stop(self) -> None:
        """End the attempt now: wakes every wait, dial and accept (not a connection made)."""
        with self._lock:
            self.stopped.set()
            dialing = list(self._dialing)
        self.answered.set()
        for event in self.steps.values():
            event.set()
        for sock in dialing:
            shutdown_quietly(sock)  # a connect() or accept() in progress returns at once
        try:
            self._arrivals.put_nowait(None)  # and B's wait for a connection to seal
        except queue.Full:  # it is not waiting: it has connections to look at first
            pass

    # --- the two sides ------------------------------------------------------------------------

    def offer(self, path: str) -> None:
        ip = self.local[0][7:] if self.local[0].startswith("::ffff:") else self.local[0]
        candidates = [d.format_candidate(ip, self.local[1])] if ip not in ("0.0.0.0", "::") else []
        self._send(p.PathCandidates(sessionId=self.session_id, candidates=candidates,
                                    path="relay" if path == "relay" else "auto"))

    def run_a(self, proxy, reply):
        """A: offer, time the dial with B through the relay, dial, seal; the sealed stream or None."""
        end = time.monotonic() + self.deadline
        self.offer(self.client.direct.path)
        if not self._wait(self.answered, end) or not self.targets:
            return None
        began = time.monotonic()
        self._send(p.PathSync(sessionId=self.session_id, step="ping"))
        if not self._wait(self.steps["pong"], end):
            return None
        round_trip = time.monotonic() - began
        self._send(p.PathSync(sessionId=self.session_id, step="sync"))
        if self.stopped.wait(round_trip / 2):  # B dials as our sync arrives: half a round trip from now
            return None
        sock = self._dial(end)
        if sock is None:
            return None
        now = time.monotonic()  # the handshake may run past the deadline, but not by much
        try:
            return self.client.sealing.seal_a(sock, proxy.target_client_id, proxy.target_fingerprint,
                                              self.session_id, reply.peerPublicKey,
                                              deadline=min(now + HANDSHAKE_TIME, max(end, now + HANDSHAKE_MIN)),
                                              expected=hinted_key(reply.peerPublicKey))
        except SealError as exc:  # whoever answered there did not prove B's key, or broke off
            log.info("TCP session %s...: the direct connection to %s:%s failed its sealed handshake (%s); "
                     "the relay carries it", self.session_id[:8], *sock_peer(sock), exc)
            return None

    def start_b(self, msg: p.ConnectOffer) -> None:
        """B: offer, then answer A's timing and dial on a thread of our own (see module docstring)."""
        self.offer(self.client.direct.path)
        self._thread = self.client.threads.spawn(f"direct-{self.session_id[:8]}", self._run_b, msg)

    def _run_b(self, msg: p.ConnectOffer) -> None:
        end = time.monotonic() + self.deadline + GRACE + HANDSHAKE_TIME  # for A's ping and sync to come
        if not self._wait(self.steps["ping"], end):
            return
        self._send(p.PathSync(sessionId=self.session_id, step="pong"))
        if not self._wait(self.steps["sync"], end) or not self._wait(self.answered, end) or not self.targets:
            return
        arrivals = self._arrivals
        end = time.monotonic() + self.deadline + GRACE
        workers = self._start_dialing(end, self._arrived, listen=True)
        try:
            stream = self._seal_first(msg, arrivals, end)
        finally:
            self.stop()
            for worker in workers:
                worker.join(max(0.0, end - time.monotonic()) + 1.0)
            _drain(arrivals)
        if stream is None:
            return
        with self._lock:
            if self.abandoned:  # A chose the relay meanwhile
                reset_connection(stream)
                return
            self.result = stream

    def _arrived(self, sock: socket.socket) -> None:
        try:
            self._arrivals.put_nowait(sock)
        except queue.Full:  # strangers knocking: A's connection is among those already queued
            reset_connection(sock)

    def _seal_first(self, msg: p.ConnectOffer, arrivals: queue.Queue, end: float):
        """B: seal the first connection over which A proves its key (A resets any other it made;
        a stranger's connection to our port fails its handshake and the next one is tried)."""
        while not self.stopped.is_set() and (remaining := end - time.monotonic()) > 0:
            try:
                sock = arrivals.get(timeout=remaining)
            except queue.Empty:
                return None
            if sock is None or self._own(sock) is None:  # stop() woke us
                return None
            prepare(sock, liveness(self.client.direct.keepalive))
            try:
                return self.client.sealing.seal_b(sock, msg.fromClientId, msg.sessionId, msg.peerPublicKey,
                                                  deadline=time.monotonic() + HANDSHAKE_TIME + GRACE,
                                                  expected=hinted_key(msg.peerPublicKey))
            except SealError as exc:
                log.debug("TCP session %s...: a direct connection failed its sealed handshake: %s",
                          self.session_id[:8], exc)
            finally:
                self._disown(sock)  # (stop() wakes a handshake still waiting: A chose the relay)
        return None

    def finish_b(self, timeout: float):
        """B, once A's choice is known: wait for our thread; its direct stream (or None)."""
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            stream, self.result = self.result, None
            self.abandoned = True
        self.stop()
        return stream

    def abandon_b(self) -> None:
        """B, when A chose the relay: stop the thread, and drop any direct stream it made."""
        with self._lock:
            self.abandoned = True
        self.stop()
        stream = self.finish_b(HANDSHAKE_TIME + GRACE)
        if stream is not None:
            reset_connection(stream)

    # --- dialing ------------------------------------------------------------------------------

    def _dial(self, end: float) -> socket.socket | None:
        """A: dial every target from our port at once (a thread each) until one connects or
        ``end``; the first connection, tuned as a data channel (any later one is reset), or None."""
        won: list[socket.socket] = []

        def take(sock: socket.socket) -> None:
            with self._lock:
                first = not won and not self.stopped.is_set()
                if first:
                    won.append(sock)
            if not first:
                reset_connection(sock)
                return
            self.stop()  # the other dials end

        for worker in self._start_dialing(end, take, listen=False):
            worker.join(max(0.0, end - time.monotonic()) + 1.0)
        if not won:
            return None
        prepare(won[0], liveness(self.client.direct.keepalive))
        log.debug("TCP session %s... (%s): connected directly %s:%s -> %s:%s", self.session_id[:8], self.side,
                  *won[0].getsockname()[:2], *sock_peer(won[0]))
        return won[0]

    def _start_dialing(self, end: float, deliver, listen: bool) -> list[threading.Thread]:
        """Threads that dial each target until ``end`` (and, with ``listen``, accept on our port:
        a SYN that finds no socket of ours dialing its sender would otherwise be refused, which
        on a path without NAT, such as loopback, happens to every one); ``deliver(sock)`` gets
        each connection."""
        workers = []
        jobs: list[tuple[str, Any, Any]] = [(f"dial-{self.session_id[:8]}-{i}", self._dial_one, target) for i, target in
                enumerate(self.targets[:d.MAX_CANDIDATES])]
        if listen:
            jobs.append((f"accept-{self.session_id[:8]}", self._accept, None))
        for name, job, target in jobs:
            try:
                workers.append(self.client.threads.spawn(name, job, target, end, deliver))
            except RuntimeError:
                break
        return workers

    def _dial_one(self, target: tuple, end: float, deliver) -> None:
        while not self.stopped.is_set() and (remaining := end - time.monotonic()) > 0:
            sock = self._own(reusable_socket(self.family))
            if sock is None:
                return
            try:
                sock.bind(self.bind_to)
                sock.settimeout(remaining)
                sock.connect(target)
            except socket.timeout:
                self._drop(sock)
                return
            except OSError:  # refused (no socket of the peer's there yet) or unreachable: dial again
                self._drop(sock)
                self.stopped.wait(RETRY_GAP)
                continue
            self._disown(sock)
            deliver(sock)
            return

    def _accept(self, _target, end: float, deliver) -> None:
        listener = self._own(reusable_socket(self.family))
        if listener is None:
            return
        try:
            listener.bind(self.bind_to)
            listener.listen(MAX_ARRIVALS)
            while not self.stopped.is_set() and (remaining := end - time.monotonic()) > 0:
                listener.settimeout(remaining)
                try:
                    sock, _ = listener.accept()
                except socket.timeout:
                    return
                deliver(sock)
        except OSError:  # stopped (shut down), or no listening on this port here: dialing still works
            return
        finally:
            self._drop(listener)

    def _own(self, sock: socket.socket) -> socket.socket | None:
        """Track ``sock`` so that stop() can wake it; None (and closed) once stopped."""
        with self._lock:
            if not self.stopped.is_set():
                self._dialing.add(sock)
                return sock
        close_quietly(sock)
        return None

    def _disown(self, sock: socket.socket) -> None:
        with self._lock:
            self._dialing.discard(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._disown(sock)
        close_quietly(sock)

    # --- helpers ------------------------------------------------------------------------------

    def _wait(self, event: threading.Event, end: float) -> bool:
        return event.wait(max(0.0, end - time.monotonic())) and not self.stopped.is_set()

    def _send(self, msg) -> None:
        try:
            self.client.control.send(msg)
        except ChuantouError as exc:  # the control channel is down: the relay carries this session
            log.debug("TCP session %s...: no direct attempt: %s", self.session_id[:8], exc)
            self.stop()


def prepare(sock: socket.socket, silence: float) -> None:
    """A direct connection, tuned like a data channel and watched as closely as a direct UDP
    flow: the kernel's keepalive probes (while idle) and TCP_USER_TIMEOUT (while data goes
    unacknowledged) end it with ETIMEDOUT after about ``silence`` seconds of a dead path
    (directreport.py), so a cut path fails the session instead of hanging it."""
    tune_tcp(sock)
    arm_reset(sock)  # should this process die, the peer sees a reset, not an end of stream
    keep_alive(sock, silence)
    sock.settimeout(None)


def _drain(arrivals: queue.Queue) -> None:
    while True:
        try:
            sock = arrivals.get_nowait()
        except queue.Empty:
            return
        reset_connection(sock)


def sock_peer(sock) -> tuple:
    try:
        return tuple(sock.getpeername()[:2])
    except OSError:
        return ("?", 0)
