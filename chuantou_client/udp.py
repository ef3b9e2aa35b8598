"""UDP through the relay, on both clients.

Gateway (A): one socket on the proxy's port; each user address (ip, port) becomes a flow
with its own relay session and its own socket towards the relay. Target (B): per session
one socket that talks to both the relay and the local service, told apart by source
address. Idle flows end after ``udp_idle_timeout`` on each side.

Every session is sealed (udpseal.py): both sides exchange keys over the control channel while
their sockets register with the relay, and only then pass datagrams, each sealed on the way in
and opened (or dropped and counted) on the way out. With a peer that cannot seal, allowed by
--allow-unsealed, datagrams pass as they are.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from common import protocol as p
from common.errors import ChuantouError
from common.frames import JoinStatus
from common.net import TIMED_OUT, close_quietly, enlarge_udp_buffers, kernel_timeout

from .datachannel import register_udp, resolve_udp
from .direct import POLL, Puncher
from .udpjoin import PAYLOAD

log = logging.getLogger("chuantou.client")

MAX_DATAGRAM = 65535
EARLY_QUEUE = 64  # datagrams a new flow holds while its session is being set up
GATEWAY_END = p.NORMAL_END + ": the UDP flow went idle on the gateway"
TARGET_END = p.NORMAL_END + ": the UDP flow went idle on the target"


class NoDirectPath(ChuantouError):
    """``--path direct`` and the attempt failed: the flow ends rather than use the relay."""


class DirectPathDead(ChuantouError):
    """A live flow's direct path went silent (direct.Puncher.watch): the flow ends with this
    reason, since live flows do not move between paths; the user's next datagram opens a new
    flow, and the memory of paths sends that one to the relay."""


class SessionGone(ChuantouError):
    """The relay answered a fresh registration: it no longer knows this session (it restarted,
    or expired it). The flow ends; the user's next datagram opens a new session."""


class UdpGateway:
    """The UDP half of a proxy on A."""

    def __init__(self, proxy, sock: socket.socket):
        self.proxy = proxy
        self.sock = sock
        enlarge_udp_buffers(sock)
        self.flows: dict[tuple, UdpFlow] = {}
        self.bytes = [0, 0]  # user->target, target->user
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def active_flows(self) -> int:
        return len(self.flows)

    def run(self) -> None:
        kernel_timeout(self.sock, 0.5)  # lets the loop notice close(), without a poll() per datagram
        while not self._closed.is_set():
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except TIMED_OUT:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                continue
            if addr is None:  # close() shut the socket down, which wakes this blocking recvfrom
                continue
            if not self.proxy.udp_allowed(0, len(data)):
                continue
            self.bytes[0] += len(data)
            flow = self.flows.get(addr)
            if flow is None:
                flow = self._start_flow(addr)
                if flow is None:
                    continue
            flow.send(data)

    def _start_flow(self, addr: tuple) -> UdpFlow | None:
        flow = UdpFlow(self, addr)
        with self._lock:
            self.flows[addr] = flow
        try:
            self.proxy.threads.spawn(f"udp-{addr[1]}", flow.run)
        except RuntimeError:
            self._forget(flow)
            return None
        return flow

    def _forget(self, flow: UdpFlow) -> None:
        with self._lock:
            if self.flows.get(flow.user) is flow:
                del self.flows[flow.user]

    def reply(self, data: bytes, user: tuple) -> None:
        if not self.proxy.udp_allowed(1, len(data)):
            return
        try:
            self.sock.sendto(data, user)
            self.bytes[1] += len(data)
        except OSError:
            pass

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            flows = list(self.flows.values())
        for flow in flows:
            flow.close()
        close_quietly(self.sock)


class UdpFlow:
    """One user address on A, with its own relay session and socket."""

    def __init__(self, gateway: UdpGateway, user: tuple):
        self.gateway = gateway
        self.user = user
        self.sock: socket.socket | None = None
        self.relay: tuple | None = None
        self.dest: tuple | None = None  # where payload goes: the relay, or the peer on a direct path
        self.puncher: Puncher | None = None
        self.ready = False
        self.session_id: str | None = None
        self.seal = None  # the session's udpseal.SealedUdp, or None while setting up / when unsealed
        self.last_active = time.monotonic()
        self._early: list[bytes] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def send(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.ready:
            self._send_now(data)
            return
        with self._lock:
            if self.ready:
                self._send_now(data)
            elif len(self._early) < EARLY_QUEUE:
                self._early.append(data)

    def _send_now(self, data: bytes) -> None:
        """Seal and send to the relay or, on a direct path, to the peer (the same datagrams either way)."""
        assert self.sock is not None and self.dest is not None  # _serve sets both before ready
        counts = self.puncher.direct_bytes if self.puncher is not None and self.dest != self.relay else None
        for datagram in self.seal.seal(data) if self.seal is not None else (data,):
            try:
                self.sock.sendto(datagram, self.dest)
            except OSError:
                continue
            if counts is not None:
                counts[0] += len(datagram)

    def close(self) -> None:
        self._closed.set()
        if self.session_id is not None:
            self.gateway.proxy.client.udp_keys.cancel(self.session_id)
        close_quietly(self.sock)

    def run(self) -> None:
        proxy = self.gateway.proxy
        client = proxy.client
        session_id = None
        end = GATEWAY_END
        try:
            reply = client.control.request(
                proxy.connect_request("udp"),
                timeout=client.request_timeout,
            )
            session_id = self.session_id = reply.sessionId
            with client.sessions.track(session_id, "A", handle=self, **proxy.session_facts("udp")) as record:
                self._serve(reply, record)
        except SessionGone as exc:
            log.info("proxy %s: UDP flow from %s:%s ended: %s", proxy.description, self.user[0], self.user[1], exc)
        except DirectPathDead as exc:
            end = str(exc)
            log.warning("proxy %s: UDP flow from %s:%s ended: %s", proxy.description, self.user[0], self.user[1], exc)
            proxy.record_failure(end)
        except (ChuantouError, OSError) as exc:
            if self._closed.is_set():  # closed here (proxy closed, client stopping): a normal end
                end = p.NORMAL_END + ": the proxy closed the UDP flow"
            else:
                end = f"the UDP flow failed on the gateway: {exc}"
                log.warning("proxy %s: UDP from %s:%s dropped: %s", proxy.description, self.user[0], self.user[1], exc)
                proxy.record_failure(str(exc))
        finally:
            self.close()
            self.gateway._forget(self)
            if self.seal is not None:
                client.udp_seal_stats.add(self.seal.stats)
            if session_id:
                client.end_session(session_id, end)

    def _serve(self, reply, record) -> None:
        """Register with the relay, send what came early, then relay replies until idle."""
        family, self.relay = resolve_udp(reply.relayAddr)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        enlarge_udp_buffers(self.sock)
        if self._closed.is_set():
            return
        proxy = self.gateway.proxy
        direct = proxy.client.direct
        registered = []
        self.seal = proxy.client.seal_udp(
            "A", reply.sessionId, proxy.target_client_id, reply.peerPublicKey, pinned=proxy.target_fingerprint,
            allow_unsealed=proxy.allow_unsealed,
            meanwhile=lambda: registered.append(register_udp(self.sock, self.relay, reply.sessionId,
                                                             reply.secret, "A")))
        registrar = registered[0]
        record.sealed = self.seal is not None
        try:
            self._try_direct(registrar, reply.sessionId)
            with self._lock:
                self.dest = self.puncher.direct if self.puncher and self.puncher.direct else self.relay
                for data in self._early:  # held until the path was chosen, so none crosses the relay needlessly
                    self._send_now(data)
                self._early.clear()
                self.ready = True
            self._pump_replies(registrar, self.gateway.proxy.client.udp_idle_timeout)
        finally:
            if self.puncher is not None:
                self.puncher.report(proxy.client.control, time.monotonic(), final=True)  # before session_closed
                direct.end(self.puncher)

    @property
    def path(self) -> str:
        return self.puncher.path if self.puncher is not None else "relay"

    @property
    def direct_counts(self) -> tuple[int, int] | None:
        """(sent, received) on the direct path, or None on the relay."""
        return self.puncher.direct_counts if self.puncher is not None else None

    def _try_direct(self, registrar, session_id: str) -> None:
        """Punch toward B for at most the deadline while the user's first datagrams wait; no
        puncher, or one that gave up, means the relay carries this flow."""
        assert self.sock is not None and self.relay is not None  # _serve made them
        proxy = self.gateway.proxy
        direct, peer = proxy.client.direct, proxy.target_client_id
        if not direct.relay_knows:
            return
        if not direct.wants_to_try(peer):  # tell B, so that it stops waiting for us
            try:
                proxy.client.control.send(p.PathCandidates(sessionId=session_id, candidates=[], path="relay"))
            except ChuantouError:
                pass  # B stops waiting after its deadline anyway
            return
        puncher = self.puncher = Puncher(self.sock, session_id, "A", direct.deadline, direct.keepalive)
        direct.begin(puncher)
        puncher.offer(proxy.client.control, self.relay, direct.path)
        deadline = time.monotonic() + direct.deadline
        kernel_timeout(self.sock, POLL)
        while not self._closed.is_set() and puncher.direct is None and not puncher.refused:
            now = time.monotonic()
            if now >= deadline:
                break
            puncher.tick(now)
            try:
                data, src = self.sock.recvfrom(MAX_DATAGRAM)
            except (*TIMED_OUT, ConnectionRefusedError):  # refused: ICMP from a dead candidate
                continue
            if src is None:  # close() shut the socket down: the loop's check ends the flow
                continue
            self._receive(registrar, data, src[:2])
        if puncher.direct is not None:
            direct.memory.succeeded(peer)
            log.info("proxy %s: UDP flow from %s:%s goes direct to %s:%s", proxy.description, *self.user[:2],
                     *puncher.direct)
            return
        puncher.gave_up = True
        if puncher.key is not None:  # a real attempt (not the peer choosing the relay)
            direct.memory.failed(peer)
            log.info("proxy %s: no direct path to %s within %g s; the relay carries this flow",
                     proxy.description, peer, direct.deadline)
        if direct.path == "direct":
            raise NoDirectPath(f"no direct path to {peer} within {direct.deadline:g} s (--path direct)")

    def _receive(self, registrar, data: bytes, src: tuple) -> None:
        """One datagram on the flow's socket: the relay's, a punch packet, or the peer's payload
        (sealed the same whichever way it came)."""
        puncher = self.puncher
        if src == self.relay:
            answer = registrar.handle(data, src)
            if answer == PAYLOAD:
                self._deliver(data)
            else:
                check_still_known(answer)
        elif puncher is not None and not puncher.handle(data, src) and puncher.is_peer(src):
            puncher.direct_bytes[1] += len(data)  # counted before the user can see the reply
            if self._deliver(data):
                puncher.peer_payload(src)  # authentic, straight from B: the path is alive

    def _deliver(self, data: bytes) -> bool:
        """Payload from B (through the relay or direct): opened, then passed to the user. False
        for a datagram dropped (forged, altered or replayed: counted by the seal)."""
        if self.seal is not None and (data := self.seal.open(data)) is None:
            return False
        self.last_active = time.monotonic()
        self.gateway.reply(data, self.user)
        return True

    def _pump_replies(self, registrar, idle_timeout: float) -> None:
        assert self.sock is not None  # _serve made it
        proxy = self.gateway.proxy
        keepalive = proxy.client.udp_keepalive
        resting = min(1.0, idle_timeout / 2, keepalive)
        puncher = self.puncher
        control = self.gateway.proxy.client.control
        kernel_timeout(self.sock, puncher.poll_interval(resting) if puncher is not None else resting)
        next_chores = 0.0
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= next_chores:  # housekeeping, not per datagram
                next_chores = now + POLL
                registrar.keep_alive(keepalive)
                if puncher is not None:
                    puncher.report(control, now)
                    if (silent := puncher.watch(now)) is not None:
                        proxy.client.direct.memory.failed(proxy.target_client_id)  # the next flow takes the relay
                        raise DirectPathDead(puncher.dead_reason(proxy.target_client_id, silent))
            try:
                data, src = self.sock.recvfrom(MAX_DATAGRAM)
            except TIMED_OUT:
                if time.monotonic() - self.last_active > idle_timeout:
                    return
                continue
            except ConnectionRefusedError:  # ICMP: the relay is down (restarting); its notice will come
                continue
            if src is None:  # close() shut the socket down: the loop's check ends the flow
                continue
            # only the relay, and a peer that proved the punch key, may answer on this socket
            self._receive(registrar, data, src[:2])

    def abort(self) -> None:
        self.close()


def check_still_known(answer) -> None:
    """A control datagram from the relay: end the flow if it says the session is gone."""
    if isinstance(answer, JoinStatus) and answer != JoinStatus.JOINED:
        raise SessionGone(f"the relay no longer knows the session ({answer.describe()})")
