"""Helpers for the UDP hardening and IPv6 tests: speaking the UDP registration by hand."""

from __future__ import annotations

import socket
import threading

from helpers import TcpService, UdpEchoService
from common.frames import UDP_WHO_ARE_YOU, JoinRequest, JoinStatus, pack_udp_register, unpack_udp_ack, unpack_udp_challenge


def relay_answer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """The next challenge or ack (notices for earlier strangers' datagrams are skipped)."""
    sock.settimeout(timeout)
    while True:
        data = sock.recvfrom(65535)[0]
        if data != UDP_WHO_ARE_YOU:
            return data


def fetch_challenge(sock: socket.socket, relay: tuple, join: JoinRequest) -> bytes:
    """Send a hello and return the challenge the relay hands this socket's address."""
    sock.sendto(pack_udp_register(join), relay)
    answer = relay_answer(sock)
    challenge = unpack_udp_challenge(answer)
    assert challenge is not None, f"expected a challenge, got {answer!r}"
    return challenge[1]


def register_by_hand(sock: socket.socket, relay: tuple, join: JoinRequest) -> JoinStatus:
    """The whole exchange (hello, challenge, proof) from ``sock``; the relay's status."""
    sock.sendto(pack_udp_register(join), relay)
    answer = relay_answer(sock)
    challenge = unpack_udp_challenge(answer)
    if challenge is not None:
        sock.sendto(pack_udp_register(join, challenge[1]), relay)
        answer = relay_answer(sock)
    ack = unpack_udp_ack(answer)
    assert ack is not None, f"expected an ack, got {answer!r}"
    return ack[1]


class UdpTap:
    """A UDP forwarder in front of the relay that records what clients send it: the wire an
    observer sees. Each client address gets its own upstream socket, so the relay sees one
    address per client socket, as it would through a NAT."""

    def __init__(self, relay: tuple, host: str = "127.0.0.1"):
        self.relay = relay
        self.sent: list[bytes] = []  # client -> relay, in order
        self._front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._front.bind((host, 0))
        self._front.settimeout(0.05)
        self.port = self._front.getsockname()[1]
        self._upstreams: dict[tuple, socket.socket] = {}
        self._retired: list[socket.socket] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "UdpTap":
        self._spawn("front", self._front_loop)
        return self

    def _spawn(self, name: str, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=f"chuantou-test-tap-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _front_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                data, client = self._front.recvfrom(65535)
            except OSError:
                continue
            self.sent.append(data)
            upstream = self._upstreams.get(client)
            if upstream is None:
                upstream = self._upstreams[client] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                upstream.settimeout(0.05)
                self._spawn(f"up-{client[1]}", self._back_loop, upstream, client)
            upstream.sendto(data, self.relay)

    def _back_loop(self, upstream: socket.socket, client: tuple) -> None:
        while not self._stopping.is_set() and self._upstreams.get(client) is upstream:
            try:
                data, _ = upstream.recvfrom(65535)
                self._front.sendto(data, client)
            except OSError:
                continue

    def rebind(self) -> None:
        """Give every client a new upstream address, as a NAT that forgot its mappings would."""
        self._retired += self._upstreams.values()
        self._upstreams = {}

    def registrations(self) -> list[bytes]:
        return [d for d in self.sent if d[:2] == b"\xfd\x02"]

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(5)
        for sock in (self._front, *self._upstreams.values()):
            sock.close()
        for sock in self._retired:
            sock.close()


class HostUdpEchoService(UdpEchoService):
    """A UdpEchoService on ``host`` (::1, say) instead of 127.0.0.1."""

    def __init__(self, host: str, name: str = "udp-echo"):
        super().__init__(name)
        self.host = host

    def start(self) -> "HostUdpEchoService":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind((self.host, 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._threads.spawn("loop", self._loop)
        return self


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


class FamilyTcpService(TcpService):
    """A TcpService on ``host`` of either family (the stock one listens on 127.0.0.1)."""

    def __init__(self, handler, host: str, name: str = "tcp"):
        super().__init__(handler, name)
        self.host = host

    def start(self) -> "FamilyTcpService":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, 0), family=family, backlog=256)
        self.port = self._listener.getsockname()[1]
        self._threads.spawn("accept", self._accept_loop)
        return self
