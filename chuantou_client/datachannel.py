"""Joining a relay session from the client: the TCP data channel and the UDP registration."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from typing import cast

from common import protocol as p
from common.errors import ChuantouError
from common.frames import JoinRequest, JoinStatus, pack_data_header
from common.net import close_quietly, recv_exact, tune_tcp
from common.tls import TlsError, TlsStream, check_pin

from .udpjoin import UdpRegistrar, register_blocking


class JoinError(ChuantouError):
    pass


class ChannelLost(JoinError):
    """The channel broke before the relay answered (for a pooled one: try a new channel)."""


@dataclass(frozen=True)
class TlsSettings:
    context: ssl.SSLContext
    fingerprint: str | None = None  # pinned SHA-256 of the relay's certificate


def open_data_channel(addr: p.RelayAddr, session_id: str, secret: str, side: str,
                      timeout: float = 10.0, tls: TlsSettings | None = None) -> socket.socket:
    """Connect to the relay, present the session header, and return the joined socket (blocking)."""
    deadline = time.monotonic() + timeout
    sock = connect_channel(addr, deadline, tls)
    return join_on(sock, addr, session_id, secret, side, deadline)


def connect_channel(addr: p.RelayAddr, deadline: float, tls: TlsSettings | None = None) -> socket.socket:
    """A new connection to the relay's data port (TLS, its pin checked, with ``tls``); JoinError if not.

    Every data channel, pooled or not, comes from a port other sockets of ours may bind too
    (SO_REUSEADDR + SO_REUSEPORT), so a direct attempt can dial the peer from the very port the
    relay saw the channel come from (directtcp.py)."""
    try:
        sock = connect_reusable((addr.host, addr.port), max(0.01, deadline - time.monotonic()))
    except OSError as exc:
        raise JoinError(f"data channel to relay {addr.host}:{addr.port} failed: {exc}") from None
    try:
        tune_tcp(sock)
        if tls is not None:
            stream = TlsStream.handshake(sock, tls.context, False, deadline, server_hostname=addr.host)
            sock = cast(socket.socket, stream)  # TlsStream has the socket methods the pipe uses
            check_pin(stream.peer_certificate(), tls.fingerprint)
    except (OSError, ValueError, TlsError) as exc:
        close_quietly(sock)
        raise JoinError(f"data channel to relay {addr.host}:{addr.port} failed: {exc}") from None
    return sock


def send_join(sock: socket.socket, session_id: str, secret: str, side: str) -> None:
    """Write the join header (a fresh or pooled channel's send buffer is empty: this does not block)."""
    sock.sendall(pack_data_header(JoinRequest(side, session_id, secret)))


def join_on(sock: socket.socket, addr: p.RelayAddr, session_id: str, secret: str, side: str,
            deadline: float, header_sent: bool = False) -> socket.socket:
    """Join a session over the connected channel ``sock`` and return it; JoinError (and ``sock``
    closed) if the relay refuses. ``header_sent``: send_join already ran (on another thread)."""
    try:
        if not header_sent:
            send_join(sock, session_id, secret, side)
        status = JoinStatus(recv_exact(sock, 1, deadline)[0])
    except (OSError, ValueError, TlsError) as exc:
        close_quietly(sock)
        raise ChannelLost(f"data channel to relay {addr.host}:{addr.port} failed: {exc}") from None
    if status != JoinStatus.JOINED:
        close_quietly(sock)
        raise JoinError(f"relay refused the data channel: {status.describe()}")
    sock.settimeout(None)
    return sock


def reusable_socket(family: int) -> socket.socket:
    """A TCP socket whose port others of ours may bind as well (one per remote address)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except (OSError, AttributeError):  # no SO_REUSEPORT here: the socket still works, direct attempts fail
        pass
    return sock


def connect_reusable(address: tuple, timeout: float) -> socket.socket:
    """create_connection's loop over the addresses, from a reusable port."""
    error: OSError | None = None
    try:
        infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(f"cannot resolve {address[0]}: {exc.strerror or exc}") from None
    for family, _, _, _, sockaddr in infos:
        sock = reusable_socket(family)
        try:
            sock.settimeout(timeout)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            close_quietly(sock)
    assert error is not None  # getaddrinfo gives at least one address or raises
    raise error


def register_udp(sock: socket.socket, relay: tuple, session_id: str, secret: str, side: str,
                 timeout: float = 10.0, retry_every: float = 0.2) -> UdpRegistrar:
    """Register ``sock``'s address with the relay for this session, retrying until acknowledged,
    and return the registrar (the flow answers the relay's later notices with it)."""
    registrar = UdpRegistrar(sock, relay, session_id, secret, side)
    status = register_blocking(registrar, timeout, retry_every)
    if status is None:
        raise JoinError(f"relay {relay[0]}:{relay[1]} did not acknowledge the UDP registration "
                        f"within {timeout:g} s (is UDP to that port blocked?)")
    if status != JoinStatus.JOINED:
        raise JoinError(f"relay refused the UDP registration: {status.describe()}")
    return registrar


def resolve_udp(addr: p.RelayAddr) -> tuple:
    """The relay's UDP address as recvfrom reports it, for comparing sources."""
    info = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = info[0]
    return family, sockaddr[:2]
