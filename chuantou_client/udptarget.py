"""UDP through the relay on the target (B): per session one socket that talks to both the relay
and the local service, told apart by source address; sealed like the gateway's flows (udp.py)."""

from __future__ import annotations

import logging
import socket
import threading
import time

from common import protocol as p
from common.errors import ChuantouError
from common.net import TIMED_OUT, close_quietly, enlarge_udp_buffers, kernel_timeout, udp_socket_for

from .datachannel import register_udp, resolve_udp
from .direct import POLL, Puncher
from .sealing import SealError
from .udpjoin import PAYLOAD

log = logging.getLogger("chuantou.client")

from .udp import MAX_DATAGRAM, TARGET_END, DirectPathDead, SessionGone, check_still_known

class UdpTarget:
    """One UDP session on B: relay <-> local service through a single socket.

    The socket has the relay's family when the service's is the same, else it is a dual-stack
    IPv6 socket that reaches both (IPv4 addresses as ::ffff:a.b.c.d)."""

    def __init__(self, client, msg: p.ConnectOffer, service: tuple):
        self.client = client
        self.msg = msg
        self.service = service
        self.sock: socket.socket | None = None
        self.puncher: Puncher | None = None
        self.seal = None  # the session's udpseal.SealedUdp (None: unsealed, allowed)
        self.record = None  # its SessionRecord, given by the caller
        self._closed = threading.Event()
        self._service_failed = False

    @property
    def path(self) -> str:
        return self.puncher.path if self.puncher is not None else "relay"

    @property
    def direct_counts(self) -> tuple[int, int] | None:
        """(sent, received) on the direct path, or None on the relay."""
        return self.puncher.direct_counts if self.puncher is not None else None

    def abort(self) -> None:
        self._closed.set()
        self.client.udp_keys.cancel(self.msg.sessionId)
        close_quietly(self.sock)

    def run(self) -> None:
        msg = self.msg
        end = TARGET_END
        try:
            relay_family, relay = resolve_udp(msg.relayAddr)
            service_family, service = resolve_service(*self.service)
        except OSError as exc:
            log.warning("UDP session from %s refused: cannot resolve %s:%s: %s", msg.fromClientId,
                        self.service[0], self.service[1], exc.strerror or exc)
            self._reject("the target cannot reach that UDP service")  # the detail stays in this log
            return
        if self.client.self_guard.reaches_self(service, "udp"):
            log.warning("UDP session from %s to %s:%d refused: it is one of this client's own ports (a proxy), "
                        "which no session may reach", msg.fromClientId, self.service[0], self.service[1])
            self._reject("that UDP service is not allowed by the target client")
            return
        try:
            self.sock, (relay, service) = udp_socket_for(relay_family, relay, service_family, service)
            enlarge_udp_buffers(self.sock)
            registered = []
            try:
                self.seal = self.client.seal_udp(
                    "B", msg.sessionId, msg.fromClientId, msg.peerPublicKey,
                    meanwhile=lambda: registered.append(register_udp(self.sock, relay, msg.sessionId, msg.secret, "B")))
            except SealError as exc:
                if not self._closed.is_set():
                    log.warning("UDP session %s... from %s refused: %s", msg.sessionId[:8], msg.fromClientId, exc)
                    self._reject(exc.peer_reason)
                return
            if self.record is not None:
                self.record.sealed = self.seal is not None
            self.client.control.send(p.AcceptSession(sessionId=msg.sessionId))
            self._offer_direct(relay)
            self._pump(registered[0], relay, service, self.client.udp_idle_timeout)
        except SessionGone as exc:
            log.info("UDP session %s... for port %d ended: %s", msg.sessionId[:8], msg.remotePort, exc)
        except DirectPathDead as exc:
            end = str(exc)
            log.warning("UDP session %s... for port %d ended: %s", msg.sessionId[:8], msg.remotePort, exc)
        except (ChuantouError, OSError) as exc:
            if self._closed.is_set():  # aborted here (session closed, client stopping): a normal end
                end = p.NORMAL_END + ": the target closed the UDP flow"
            else:
                end = f"the UDP flow failed on the target: {exc}"
                log.warning("UDP session %s... for port %d ended: %s", msg.sessionId[:8], msg.remotePort, exc)
        finally:
            if self.puncher is not None:
                self.puncher.report(self.client.control, time.monotonic(), final=True)  # before session_closed
                self.client.direct.end(self.puncher)
            self.abort()
            if self.seal is not None:
                self.client.udp_seal_stats.add(self.seal.stats)
            self.client.end_session(msg.sessionId, end)

    def _offer_direct(self, relay: tuple) -> None:
        """Offer a direct path (or say we want the relay, so A does not wait for us)."""
        assert self.sock is not None  # run() made it
        direct = self.client.direct
        if not direct.relay_knows:
            return
        self.puncher = Puncher(self.sock, self.msg.sessionId, "B", direct.deadline, direct.keepalive)
        direct.begin(self.puncher)
        self.puncher.offer(self.client.control, relay, direct.path)

    def _reject(self, reason: str) -> None:
        try:
            self.client.control.send(p.RejectSession(sessionId=self.msg.sessionId, reason=reason))
        except ChuantouError as exc:
            log.info("could not tell the relay reject_session: %s", exc)

    def _pump(self, registrar, relay: tuple, service: tuple, idle_timeout: float) -> None:
        sock = self.sock
        assert sock is not None  # run() made it
        keepalive = self.client.udp_keepalive
        resting = min(1.0, idle_timeout / 2, keepalive)
        timeout = resting
        kernel_timeout(sock, timeout)  # no poll() per datagram, as Python's own timeout would cost
        last_active = time.monotonic()
        puncher = self.puncher
        next_chores = 0.0
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= next_chores:  # not per datagram: at most every POLL (pings stay on time)
                next_chores = now + POLL
                timeout = self._chores(registrar, keepalive, resting, timeout, now)
            try:
                data, src = sock.recvfrom(MAX_DATAGRAM)
            except TIMED_OUT:
                if time.monotonic() - last_active > idle_timeout:
                    return
                continue
            except ConnectionRefusedError:  # ICMP: the local service is not listening (yet)
                continue
            if src is None:  # abort() shut the socket down: the loop's check ends the session
                continue
            src = src[:2]
            if src == relay:
                answer = registrar.handle(data, src)
                if answer != PAYLOAD:
                    check_still_known(answer)
                    continue
                if self.seal is not None and (data := self.seal.open(data)) is None:
                    continue  # forged, altered or replayed: dropped and counted
                last_active = time.monotonic()
                self._send(data, service, to_service=True)
            elif src == service:
                last_active = time.monotonic()
                direct = puncher.direct if puncher is not None else None
                counts = puncher.direct_bytes if puncher is not None and direct is not None else None
                for datagram in self.seal.seal(data) if self.seal is not None else (data,):
                    if self._send(datagram, direct or relay, to_service=False) and counts is not None:
                        counts[0] += len(datagram)
            elif puncher is not None and not puncher.handle(data, src) and puncher.is_peer(src):
                puncher.direct_bytes[1] += len(data)
                if self.seal is not None and (data := self.seal.open(data)) is None:
                    continue  # forged, altered or replayed: dropped and counted, and proves no path
                puncher.peer_payload(src)  # A sends straight to us: it had our pong, the way back works
                last_active = time.monotonic()
                self._send(data, service, to_service=True)

    def _chores(self, registrar, keepalive: float, resting: float, timeout: float, now: float) -> float:
        """The pump's housekeeping: keepalive registration, the direct path's pings, reports and
        watch. Returns the socket's timeout (short while pinging)."""
        registrar.keep_alive(keepalive)
        puncher = self.puncher
        if puncher is None:
            return timeout
        puncher.tick(now)
        puncher.report(self.client.control, now)
        wanted = POLL if puncher.busy else puncher.poll_interval(resting)  # ping on time
        if wanted != timeout:
            assert self.sock is not None  # only _pump calls
            kernel_timeout(self.sock, wanted)
        if (silent := puncher.watch(now)) is not None:
            raise DirectPathDead(puncher.dead_reason(self.msg.fromClientId, silent))
        return wanted

    def _send(self, data: bytes, addr: tuple, to_service: bool) -> bool:
        """True if the datagram went out."""
        assert self.sock is not None  # only _pump sends
        try:
            self.sock.sendto(data, addr)
            return True
        except OSError as exc:
            if to_service and not self._service_failed:  # say it once per flow, not per datagram
                self._service_failed = True
                log.warning("UDP session %s... cannot send to the service %s:%s: %s",
                            self.msg.sessionId[:8], addr[0], addr[1], exc.strerror or exc)
            return False


def resolve_service(host: str, port: int) -> tuple:
    """The service's (family, address), resolved once (a name such as localhost included)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    return family, sockaddr[:2]
