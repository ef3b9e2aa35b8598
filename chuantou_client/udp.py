"""UDP through the relay, on both clients.

Gateway (A): one socket on the proxy's port; each user address (ip, port) becomes a flow
with its own relay session and its own socket towards the relay. Target (B): per session
one socket that talks to both the relay and the local service, told apart by source
address. Idle flows end after ``udp_idle_timeout`` on each side.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from common import protocol as p
from common.errors import ChuantouError
from common.net import close_quietly, enlarge_udp_buffers

from .datachannel import register_udp, resolve_udp

log = logging.getLogger("chuantou.client")

MAX_DATAGRAM = 65535
EARLY_QUEUE = 64  # datagrams a new flow holds while its session is being set up


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
        self.sock.settimeout(0.5)  # lets the loop notice close()
        while not self._closed.is_set():
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except socket.timeout:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                continue
            self.bytes[0] += len(data)
            flow = self.flows.get(addr)
            if flow is None:
                flow = self._start_flow(addr)
                if flow is None:
                    continue
            flow.send(data)

    def _start_flow(self, addr: tuple):
        flow = UdpFlow(self, addr)
        with self._lock:
            self.flows[addr] = flow
        try:
            self.proxy.threads.spawn(f"udp-{addr[1]}", flow.run)
        except RuntimeError:
            self._forget(flow)
            return None
        return flow

    def _forget(self, flow) -> None:
        with self._lock:
            if self.flows.get(flow.user) is flow:
                del self.flows[flow.user]

    def reply(self, data: bytes, user: tuple) -> None:
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
        self.ready = False
        self.last_active = time.monotonic()
        self._early: list[bytes] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def send(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.ready:
            try:
                self.sock.sendto(data, self.relay)
            except OSError:
                pass
            return
        with self._lock:
            if self.ready:
                self.sock.sendto(data, self.relay)
            elif len(self._early) < EARLY_QUEUE:
                self._early.append(data)

    def close(self) -> None:
        self._closed.set()
        close_quietly(self.sock)

    def run(self) -> None:
        proxy = self.gateway.proxy
        client = proxy.client
        session_id = None
        try:
            reply = client.control.request(
                proxy.connect_request("udp"),
                timeout=client.request_timeout,
            )
            session_id = reply.sessionId
            client.note_session_owner(session_id, proxy)
            client._track_session(session_id, self)
            family, self.relay = resolve_udp(reply.relayAddr)
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            enlarge_udp_buffers(self.sock)
            if self._closed.is_set():
                return
            register_udp(self.sock, self.relay, reply.sessionId, reply.secret, "A")
            with self._lock:
                for data in self._early:
                    self.sock.sendto(data, self.relay)
                self._early.clear()
                self.ready = True
            self._pump_replies(client.udp_idle_timeout)
        except (ChuantouError, OSError) as exc:
            if not self._closed.is_set():
                log.warning("proxy %s: UDP from %s:%s dropped: %s", proxy.description, self.user[0], self.user[1], exc)
                proxy.record_failure(str(exc))
        finally:
            self.close()
            self.gateway._forget(self)
            if session_id:
                client._untrack_session(session_id)
                client.end_session(session_id, "the UDP flow ended on the gateway")

    def _pump_replies(self, idle_timeout: float) -> None:
        self.sock.settimeout(min(1.0, idle_timeout / 2))
        relay = self.relay
        while not self._closed.is_set():
            try:
                data, src = self.sock.recvfrom(MAX_DATAGRAM)
            except socket.timeout:
                if time.monotonic() - self.last_active > idle_timeout:
                    return
                continue
            if src[:2] != relay:
                continue  # only the relay may answer on this socket
            self.last_active = time.monotonic()
            self.gateway.reply(data, self.user)

    def abort(self) -> None:
        self.close()


class UdpTarget:
    """One UDP session on B: relay <-> local service through a single socket."""

    def __init__(self, client, msg: p.ConnectRequest, service: tuple):
        self.client = client
        self.msg = msg
        self.service = service
        self.sock: socket.socket | None = None
        self._closed = threading.Event()

    def abort(self) -> None:
        self._closed.set()
        close_quietly(self.sock)

    def run(self) -> None:
        msg = self.msg
        family, relay = resolve_udp(msg.relayAddr)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        enlarge_udp_buffers(self.sock)
        try:
            register_udp(self.sock, relay, msg.sessionId, msg.secret, "B")
            self.client.control.send(p.AcceptSession(sessionId=msg.sessionId))
            self._pump(relay, self.client.udp_idle_timeout)
        except (ChuantouError, OSError) as exc:
            if not self._closed.is_set():
                log.warning("UDP session %s... for port %d ended: %s", msg.sessionId[:8], msg.remotePort, exc)
        finally:
            self.abort()
            self.client.end_session(msg.sessionId, "the UDP flow ended on the target")

    def _pump(self, relay: tuple, idle_timeout: float) -> None:
        sock = self.sock
        service = self.service
        sock.settimeout(min(1.0, idle_timeout / 2))
        last_active = time.monotonic()
        while not self._closed.is_set():
            try:
                data, src = sock.recvfrom(MAX_DATAGRAM)
            except socket.timeout:
                if time.monotonic() - last_active > idle_timeout:
                    return
                continue
            except ConnectionRefusedError:  # ICMP: the local service is not listening (yet)
                continue
            last_active = time.monotonic()
            src = src[:2]
            try:
                if src == relay:
                    sock.sendto(data, service)
                elif src == service:
                    sock.sendto(data, relay)
            except OSError:
                pass
